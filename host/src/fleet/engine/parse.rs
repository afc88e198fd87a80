//! The sample lines of the Prometheus text exposition format (0.0.4, as the
//! engines' `prometheus_client` and llama.cpp write it):
//! `name{label="value",...} value [timestamp]`.
//!
//! Hand-written because no maintained crate fits: `prometheus-parse` (last
//! release 2023) matches names with `\w+`, so vLLM's `vllm:…` names do not
//! parse, and it splits labels on every comma, which breaks vLLM's
//! comma-separated `running_lora_adapters`; `openmetrics-parser` is
//! LGPL-3.0. Only what routing needs is parsed: comments (`# HELP`,
//! `# TYPE`) are skipped and so are timestamps. The parser never panics
//! and never allocates more than the labels of one line it is asked about
//! (a fuzz target and a garbage test hold it to that).

use std::borrow::Cow;

/// One sample: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
}

impl Sample<'_> {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// A malformed sample line, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct LineError {
    pub line: usize,
    pub message: &'static str,
}

/// The samples of `text` whose name `wanted` accepts, in order. A line that
/// is not a comment and whose name is wanted but does not parse is an
/// error; other lines are not looked at beyond their name.
pub fn samples<'a>(
    text: &'a str,
    wanted: impl Fn(&str) -> bool + 'a,
) -> impl Iterator<Item = Result<Sample<'a>, LineError>> + 'a {
    text.lines().enumerate().filter_map(move |(i, line)| {
        let line = line.trim_start_matches([' ', '\t']);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
        let name = &line[..name_end];
        if !wanted(name) {
            return None;
        }
        Some(
            sample(name, &line[name_end..]).map_err(|message| LineError {
                line: i + 1,
                message,
            }),
        )
    })
}

/// Whether `text` has at least one line shaped like a sample (a name, then
/// labels or a value): garbage has none.
pub fn looks_like_metrics(text: &str) -> bool {
    samples(text, |name| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
    })
    .any(|s| s.is_ok())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The rest of a sample line after its name.
fn sample<'a>(name: &'a str, rest: &'a str) -> Result<Sample<'a>, &'static str> {
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("no metric name");
    }
    let mut rest = rest.trim_start_matches([' ', '\t']);
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split([' ', '\t']).filter(|f| !f.is_empty());
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or("the value is not a number")?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| "the timestamp is not an integer")?;
    }
    if fields.next().is_some() {
        return Err("text after the timestamp");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Reads `label="value",...}` and returns what follows the `}`.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Result<&'a str, &'static str> {
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("labels are not closed")?;
        let label = &rest[..name_end];
        if label.is_empty() || label.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("a label has no name");
        }
        rest = rest[name_end..].trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('=').ok_or("a label has no `=`")?;
        rest = rest.trim_start_matches([' ', '\t']);
        rest = rest
            .strip_prefix('"')
            .ok_or("a label value is not quoted")?;
        let (value, after) = quoted(rest)?;
        labels.push((label, value));
        rest = after.trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels are not separated by `,`");
        }
    }
}

/// A label value up to its closing quote, with `\\`, `\"` and `\n`
/// unescaped; returns the value and what follows the quote.
fn quoted(text: &str) -> Result<(Cow<'_, str>, &str), &'static str> {
    let bytes = text.as_bytes();
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let raw = &text[..i];
                let value = if escaped {
                    Cow::Owned(unescape(raw))
                } else {
                    Cow::Borrowed(raw)
                };
                return Ok((value, &text[i + 1..]));
            }
            b'\\' => {
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
    Err("a label value is not closed")
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// A sample value: a float, `NaN`, `+Inf` or `-Inf`.
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if text.contains(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E') => None,
        _ => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Vec<Result<Sample<'_>, LineError>> {
        samples(text, |_| true).collect()
    }

    #[test]
    fn sample_lines_parse() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 7.0\n\
tgi_queue_size 3\n\
x{a=\"1,2\" , b = \"q\\\"uo\\\\te\\n\",} 1e3 1700000000000\n\
y{} +Inf\n";
        let got = all(text);
        assert_eq!(got.len(), 4);
        let first = got[0].as_ref().unwrap();
        assert_eq!(first.name, "vllm:num_requests_waiting");
        assert_eq!(first.label("engine"), Some("0"));
        assert_eq!(first.label("model_name"), Some("m"));
        assert_eq!(first.value, 7.0);
        assert_eq!(got[1].as_ref().unwrap().value, 3.0);
        let third = got[2].as_ref().unwrap();
        assert_eq!(third.label("a"), Some("1,2"));
        assert_eq!(third.label("b"), Some("q\"uo\\te\n"));
        assert_eq!(third.value, 1000.0);
        assert!(got[3].as_ref().unwrap().value.is_infinite());
    }

    #[test]
    fn malformed_wanted_lines_are_errors_with_their_line() {
        for bad in [
            "m{a=\"1\" 2",
            "m{a=1} 2",
            "m{a=\"1\"} two",
            "m",
            "m{a=\"unclosed} 1",
            "m 1 2 3",
            "m{=\"x\"} 1",
        ] {
            let text = format!("# ok\n{bad}\n");
            let got = all(&text);
            assert_eq!(got.len(), 1, "{bad}");
            assert_eq!(got[0].as_ref().unwrap_err().line, 2, "{bad}");
        }
        assert!(samples("garbage line\nm 1", |n| n == "m").all(|s| s.is_ok()));
    }

    #[test]
    fn garbage_does_not_look_like_metrics() {
        assert!(!looks_like_metrics("<html><body>nope</body></html>"));
        assert!(!looks_like_metrics("{\"models\": []}"));
        assert!(!looks_like_metrics(""));
        assert!(looks_like_metrics("# c\nup 1\n"));
    }

    /// Random bytes and mutations of a real exposition: no panic, and only
    /// wanted names come back.
    #[test]
    fn random_input_never_panics() {
        let seed_text = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 2.0\n\
vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"a,b\",waiting_lora_adapters=\"\"} 1.7e9\n";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..5_000 {
            let mut bytes = seed_text.as_bytes().to_vec();
            if round % 2 == 0 {
                for _ in 0..(next() % 8) {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = (next() % 128) as u8;
                }
            } else {
                bytes = (0..(next() % 200)).map(|_| (next() % 256) as u8).collect();
            }
            let text = String::from_utf8_lossy(&bytes);
            for s in samples(&text, |n| n.starts_with("vllm")).flatten() {
                assert!(s.name.starts_with("vllm"));
            }
            let _ = looks_like_metrics(&text);
        }
    }
}
