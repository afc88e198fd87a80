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
