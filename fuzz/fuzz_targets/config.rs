//! The configuration reader (`sluice::config`): any text is parsed and
//! validated without panicking, and the size and duration syntax never
//! overflows into a wrong value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::{parse_bytes, parse_duration, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        if config.validate().is_ok() {
            let _ = config.policy_chain();
            let _ = config.health_rules();
            assert!(!config.backends.is_empty());
            assert!(config.server.max_body_bytes > 0);
        }
    }
    // The value syntax alone, on the whole text.
    if let Ok(bytes) = parse_bytes(text) {
        let digits: String = text
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let n: u64 = digits.parse().unwrap();
        assert!(bytes >= n, "{text:?} gave {bytes} bytes");
    }
    if let Ok(duration) = parse_duration(text) {
        let digits: String = text
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let n: u64 = digits.parse().unwrap();
        let ms = text.trim()[digits.len()..].trim() == "ms";
        let floor = if ms {
            u128::from(n)
        } else {
            u128::from(n) * 1000
        };
        assert!(duration.as_millis() >= floor, "{text:?} gave {duration:?}");
    }
});
