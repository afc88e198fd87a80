//! Text the gateway writes about things it did not choose: error chains
//! from libraries, rendered on one line.

/// An error and its sources on one line, `outer: inner: innermost`:
/// "connect error: Connection refused (os error 111)" rather than just
/// "client error (Connect)".
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A value a client chose (a model name, a header), safe to put in a log
/// line: written as it is when it is plain (or empty) — no spaces, quotes, backslashes,
/// `=`, control or invisible characters — and otherwise quoted with those
/// escaped (`"a\nb"`, `"\u{1b}[31m"`). So a newline cannot forge a second
/// line, an escape sequence cannot reach a terminal, and `key=value`
/// fields cannot be faked in the text format.
pub struct LogSafe<'a>(pub &'a str);

impl std::fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plain = self.0.chars().all(|c| {
            c.escape_debug().len() == 1 && !c.is_whitespace() && !matches!(c, '"' | '\\' | '=')
        });
        if plain {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_are_written_as_they_are() {
        for plain in ["", "glm4-9b", "qwen2.5:7b", "org/model@v1", "mé", "机密"] {
            assert_eq!(LogSafe(plain).to_string(), plain);
        }
    }

    #[test]
    fn other_values_are_quoted_on_one_line() {
        let cases = [
            ("a\nb", r#""a\nb""#),
            ("\u{1b}[31mred", r#""\u{1b}[31mred""#),
            ("bell\u{7}", r#""bell\u{7}""#),
            ("m status=200", r#""m status=200""#),
            ("say \"hi\"", r#""say \"hi\"""#),
            ("\r", r#""\r""#),
            ("zero\u{200b}width", r#""zero\u{200b}width""#),
        ];
        for (value, logged) in cases {
            let text = LogSafe(value).to_string();
            assert_eq!(text, logged);
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
    }
}
