//! The `Authorization: Bearer TOKEN` header (RFC 6750), read the same way by
//! the data plane and the admin API: the scheme is case-insensitive
//! (RFC 9110 §11.1), and the token is bounded before anyone hashes or
//! compares it.

/// The longest token either side reads, in bytes; a longer one is refused
/// as wrong without being hashed. Sluice's keys are 51 bytes.
pub const MAX_TOKEN_BYTES: usize = 512;

/// What an `Authorization` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    /// No header, another scheme, or an empty token.
    Nothing,
    /// A bearer token over [`MAX_TOKEN_BYTES`], or not text: wrong
    /// whatever the keys are.
    Unusable,
    Token(&'a str),
}

/// Reads an `Authorization` header's value (`Bearer`, `bearer`, `BEARER`…,
/// then spaces, then the token; surrounding spaces trimmed).
pub fn presented(value: Option<&[u8]>) -> Presented<'_> {
    let Some(value) = value else {
        return Presented::Nothing;
    };
    let Some((scheme, token)) = value.split_first_chunk::<6>() else {
        return Presented::Nothing;
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") || token.first() != Some(&b' ') {
        return Presented::Nothing;
    }
    let Ok(token) = std::str::from_utf8(token) else {
        return Presented::Unusable;
    };
    let token = token.trim_matches(' ');
    if token.is_empty() {
        Presented::Nothing
    } else if token.len() > MAX_TOKEN_BYTES {
        Presented::Unusable
    } else {
        Presented::Token(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive() {
        for header in ["Bearer k", "bearer k", "BEARER k", "bEaReR   k  "] {
            assert_eq!(
                presented(Some(header.as_bytes())),
                Presented::Token("k"),
                "{header}"
            );
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_nothing() {
        for header in [
            "",
            "Bearer",
            "Bearer ",
            "Bearer    ",
            "Basic a2V5",
            "Bearerk",
            "Token k",
        ] {
            assert_eq!(
                presented(Some(header.as_bytes())),
                Presented::Nothing,
                "{header}"
            );
        }
        assert_eq!(presented(None), Presented::Nothing);
    }

    #[test]
    fn long_tokens_are_refused_unread() {
        let long = format!("Bearer {}", "k".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(presented(Some(long.as_bytes())), Presented::Unusable);
        let fits = format!("Bearer {}", "k".repeat(MAX_TOKEN_BYTES));
        assert!(matches!(
            presented(Some(fits.as_bytes())),
            Presented::Token(_)
        ));
        assert_eq!(presented(Some(b"Bearer \xff")), Presented::Unusable);
    }
}
