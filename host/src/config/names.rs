//! The rules for names and addresses an operator writes — in the config file
//! and in admin URLs alike — kept in one place so the file and the API
//! accept the same things.

/// The one pattern for the names of policies, consumers and workers —
/// what appears in admin URLs (`/admin/policies/NAME`), CLI arguments,
/// state-directory file names and the config file.
pub const NAME_PATTERN: &str = "1 to 64 of [A-Za-z0-9_.@-], starting with a letter or a digit";

/// Whether `name` follows [`NAME_PATTERN`]. Starting with a letter or digit
/// rules out `.` and `..` (which URL-normalising clients rewrite, so such a
/// name could not be addressed afterwards), hidden file names, and names
/// that read as command-line flags.
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{kind} name `{name}` must be {NAME_PATTERN}"))
    }
}

/// A consumer's name: [`NAME_PATTERN`].
pub fn check_consumer_name(name: &str) -> Result<(), String> {
    check_name("consumer", name)
}

/// A worker's name: [`NAME_PATTERN`].
pub fn check_worker_name(name: &str) -> Result<(), String> {
    check_name("worker", name)
}

/// A policy's name: [`NAME_PATTERN`].
pub fn check_policy_name(name: &str) -> Result<(), String> {
    check_name("policy", name)
}

/// What a path must start with for a worker's `route` (`/tools/*` covers
/// `/tools/` and below; a route without `*` is matched exactly).
pub fn route_prefix(route: &str) -> Result<&str, String> {
    let bad = |why: &str| format!("`{route}` {why}");
    if !route.starts_with('/') {
        return Err(bad("must start with /"));
    }
    if route.contains(['?', '#', ' ', '\t']) {
        return Err(bad("must be a path (no query, fragment or spaces)"));
    }
    let prefix = route.strip_suffix('*').unwrap_or(route);
    if prefix.contains('*') {
        return Err(bad("may only end with * (as in /tools/*)"));
    }
    if route.ends_with('*') && !prefix.ends_with('/') {
        return Err(bad("must end with /* to cover a path and what is under it"));
    }
    Ok(prefix)
}

/// `host` or `host:port` (IPv6 in brackets), as in
/// `workers[].allowed_hosts`: the host in lower case, and the port if one
/// was given.
pub fn host_and_port(text: &str) -> Result<(String, Option<u16>), String> {
    let bad = || format!("`{text}` must be `host` or `host:port` (no scheme, no path)");
    if text.is_empty() || text.contains('/') || text.contains('*') || text.contains('@') {
        return Err(bad());
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port))
            if !host.ends_with(':') && (!host.contains(':') || host.ends_with(']')) =>
        {
            (host, Some(port.parse::<u16>().map_err(|_| bad())?))
        }
        Some(_) if text.starts_with('[') => return Err(bad()),
        Some(_) => return Err(bad()),
        None => (text, None),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_pattern() {
        for good in [
            "router",
            "team-a",
            "a.b",
            "ops@corp",
            "v1_2",
            "A",
            &"x".repeat(64),
        ] {
            assert!(check_name("policy", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-flag",
            "_x",
            "a/b",
            "a b",
            "a%2e",
            &"x".repeat(65),
        ] {
            let e = check_name("policy", bad).unwrap_err();
            assert!(e.contains(NAME_PATTERN), "{e}");
        }
    }
}
