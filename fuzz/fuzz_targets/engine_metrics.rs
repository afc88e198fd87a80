//! The engine-metrics reader (`sluice::fleet::engine`): whatever a metrics
//! endpoint answers — an engine's Prometheus text, Ollama's `/api/ps` JSON,
//! or garbage — is read into signals or refused with an error, never a
//! panic, and the signals it gives are in range: KV usage within 0..1, and
//! counts that only come from samples the text has.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::EngineKind;
use sluice::fleet::engine::names::{from_ollama_ps, from_prometheus, NameSet};
use sluice::fleet::engine::parse::samples;

fuzz_target!(|data: &[u8]| {
    if let Ok(signals) = from_ollama_ps(data) {
        assert!(signals.waiting.is_none() && signals.kv_usage.is_none());
    }
    let text = String::from_utf8_lossy(data);
    for sample in samples(&text, |_| true).flatten() {
        assert!(!sample.name.is_empty(), "a sample without a name");
        assert!(text.contains(sample.name));
        for (label, _) in &sample.labels {
            assert!(text.contains(label), "label {label:?} is not in the text");
        }
    }
    for engine in [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::Llamacpp,
        EngineKind::Tgi,
    ] {
        let names = NameSet::of(engine, None).expect("a Prometheus engine has names");
        let Ok(signals) = from_prometheus(&text, &names) else {
            continue;
        };
        if let Some(kv) = signals.kv_usage {
            assert!((0.0..=1.0).contains(&kv), "{engine:?}: KV usage {kv}");
        }
        assert!(
            signals.waiting.is_some() || signals.running.is_some() || signals.kv_usage.is_some(),
            "{engine:?}: signals read from nothing"
        );
        if let Some(lora) = &signals.lora {
            for adapter in lora.running.iter().chain(&lora.waiting) {
                assert!(!adapter.is_empty(), "{engine:?}: an empty adapter name");
            }
        }
    }
});
