//! Each engine's metric names (checked against the engines' own source; see
//! the README's "Engine signals"), the operator's overrides, and turning a
//! scraped body into [`EngineSignals`].

use serde_json::Value;

use super::parse::{looks_like_metrics, samples, Sample};
use super::{EngineKind, EngineSignals, LoraState, ScrapeError};
use crate::config::MetricNames;

/// The names one engine's signals are read from. Where a list has several,
/// the first present wins (an older name as fallback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameSet {
    pub waiting: Vec<String>,
    pub running: Vec<String>,
    pub kv_usage: Vec<String>,
    pub lora_info: Vec<String>,
}

fn list(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

impl NameSet {
    /// The engine's defaults with `overrides` applied; `None` for engines
    /// without Prometheus metrics (Ollama, `none`).
    pub fn of(engine: EngineKind, overrides: Option<&MetricNames>) -> Option<NameSet> {
        let mut set = match engine {
            // vllm/v1/metrics/loggers.py
            EngineKind::Vllm => NameSet {
                waiting: list(&["vllm:num_requests_waiting"]),
                running: list(&["vllm:num_requests_running"]),
                kv_usage: list(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
                lora_info: list(&["vllm:lora_requests_info"]),
            },
            // python/sglang/srt/metrics/collector.py
            EngineKind::Sglang => NameSet {
                waiting: list(&["sglang:num_queue_reqs"]),
                running: list(&["sglang:num_running_reqs"]),
                kv_usage: list(&["sglang:token_usage"]),
                lora_info: Vec::new(),
            },
            // tools/server/README.md (`--metrics`)
            EngineKind::Llamacpp => NameSet {
                waiting: list(&["llamacpp:requests_deferred"]),
                running: list(&["llamacpp:requests_processing"]),
                kv_usage: list(&["llamacpp:kv_cache_usage_ratio"]),
                lora_info: Vec::new(),
            },
            // router/src/ (text-generation-inference)
            EngineKind::Tgi => NameSet {
                waiting: list(&["tgi_queue_size"]),
                running: list(&["tgi_batch_current_size"]),
                kv_usage: Vec::new(),
                lora_info: Vec::new(),
            },
            EngineKind::Ollama | EngineKind::None => return None,
        };
        if let Some(o) = overrides {
            for (field, name) in [
                (&mut set.waiting, &o.waiting),
                (&mut set.running, &o.running),
                (&mut set.kv_usage, &o.kv_usage),
                (&mut set.lora_info, &o.lora_info),
            ] {
                if let Some(name) = name {
                    *field = vec![name.clone()];
                }
            }
        }
        Some(set)
    }

    fn all(&self) -> impl Iterator<Item = &String> {
        self.waiting
            .iter()
            .chain(&self.running)
            .chain(&self.kv_usage)
            .chain(&self.lora_info)
    }

    fn wants(&self, name: &str) -> bool {
        self.all().any(|n| n == name)
    }
}

/// Reads the signals out of a Prometheus exposition. Data-parallel engines
/// (several `engine` label values) add up their waiting and running
/// requests; KV usage is the fullest engine's.
pub fn from_prometheus(text: &str, names: &NameSet) -> Result<EngineSignals, ScrapeError> {
    let mut found: Vec<Sample<'_>> = Vec::new();
    for sample in samples(text, |n| names.wants(n)) {
        found.push(sample.map_err(|e| ScrapeError::Parse(e.to_string()))?);
    }
    // The first name of a list that has series; NaN and negative values
    // are dropped (a gauge not set yet).
    let series = |candidates: &[String]| -> Option<Vec<&Sample<'_>>> {
        candidates.iter().find_map(|name| {
            let of: Vec<&Sample<'_>> = found
                .iter()
                .filter(|s| s.name == name && s.value.is_finite() && s.value >= 0.0)
                .collect();
            (!of.is_empty()).then_some(of)
        })
    };
    let count = |candidates: &[String]| {
        series(candidates).map(|s| {
            s.iter()
                .fold(0u64, |sum, s| sum.saturating_add(s.value.round() as u64))
        })
    };
    let signals = EngineSignals {
        waiting: count(&names.waiting),
        running: count(&names.running),
        kv_usage: series(&names.kv_usage)
            .map(|s| s.iter().map(|s| s.value.min(1.0)).fold(0.0, f64::max)),
        lora: series(&names.lora_info).map(|s| lora_state(&s)),
        models_loaded: None,
    };
    if signals.waiting.is_none() && signals.running.is_none() && signals.kv_usage.is_none() {
        if !looks_like_metrics(text) {
            return Err(ScrapeError::Parse(
                "not the Prometheus text format".to_string(),
            ));
        }
        let expected: Vec<&str> = names.all().map(String::as_str).collect();
        return Err(ScrapeError::Missing(expected.join(", ")));
    }
    Ok(signals)
}

/// vLLM's `lora_requests_info`: an info gauge whose value is the time it
/// was set, so old label sets linger; the current one is the series with
/// the highest value — per engine, when data-parallel engines report their
/// own.
fn lora_state(series: &[&Sample<'_>]) -> LoraState {
    let mut latest: Vec<&Sample<'_>> = Vec::new();
    for s in series {
        match latest
            .iter_mut()
            .find(|l| l.label("engine") == s.label("engine"))
        {
            Some(l) if s.value > l.value => *l = s,
            Some(_) => {}
            None => latest.push(s),
        }
    }
    let mut state = LoraState::default();
    for s in latest {
        for (label, into) in [
            ("running_lora_adapters", &mut state.running),
            ("waiting_lora_adapters", &mut state.waiting),
        ] {
            for adapter in s.label(label).unwrap_or_default().split(',') {
                let adapter = adapter.trim();
                if !adapter.is_empty() && !into.iter().any(|a| a == adapter) {
                    into.push(adapter.to_string());
                }
            }
        }
        if let Some(max) = s
            .label("max_lora")
            .and_then(|m| m.trim().parse::<u32>().ok())
        {
            state.max = Some(state.max.map_or(max, |m| m.max(max)));
        }
    }
    state
}

/// Ollama's `GET /api/ps`: `{"models":[{"name":…,"model":…},…]}`, the
/// models loaded in memory.
pub fn from_ollama_ps(body: &[u8]) -> Result<EngineSignals, ScrapeError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ScrapeError::Parse(format!("/api/ps is not JSON: {e}")))?;
    let models = value["models"]
        .as_array()
        .ok_or_else(|| ScrapeError::Missing("`models` in /api/ps".to_string()))?;
    let loaded = models
        .iter()
        .filter_map(|m| m["name"].as_str().or(m["model"].as_str()))
        .map(str::to_string)
        .collect();
    Ok(EngineSignals {
        models_loaded: Some(loaded),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(engine: EngineKind, text: &str) -> Result<EngineSignals, ScrapeError> {
        from_prometheus(text, &NameSet::of(engine, None).unwrap())
    }

    #[test]
    fn vllm_with_data_parallel_engines_and_lora() {
        let text = r#"
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 4.0
vllm:num_requests_running{engine="1",model_name="llama"} 3.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 10.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.875
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7000000e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="math"} 1.7000002e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.7000001e+09
vllm:prompt_tokens_total{engine="0",model_name="llama"} 12345.0
"#;
        let s = read(EngineKind::Vllm, text).unwrap();
        assert_eq!(s.waiting, Some(12));
        assert_eq!(s.running, Some(7));
        assert_eq!(s.kv_usage, Some(0.875));
        assert_eq!(
            s.lora,
            Some(LoraState {
                running: vec!["sql".into(), "chat".into()],
                waiting: vec!["math".into()],
                max: Some(4),
            })
        );
    }

    #[test]
    fn vllm_falls_back_to_the_older_kv_name() {
        let text = "vllm:num_requests_waiting{model_name=\"m\"} 0\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n";
        let s = read(EngineKind::Vllm, text).unwrap();
        assert_eq!(s.kv_usage, Some(0.5));
        assert_eq!(s.waiting, Some(0));
        assert_eq!(s.running, None);
        assert_eq!(s.lora, None);
    }

    #[test]
    fn sglang_llamacpp_and_tgi() {
        let s = read(
            EngineKind::Sglang,
            "sglang:num_queue_reqs{model_name=\"q\"} 5\nsglang:num_running_reqs{model_name=\"q\"} 8\nsglang:token_usage{model_name=\"q\"} 0.62\n",
        )
        .unwrap();
        assert_eq!(
            (s.waiting, s.running, s.kv_usage),
            (Some(5), Some(8), Some(0.62))
        );
        // Some llama.cpp builds have no KV gauge: unknown, not an error.
        let s = read(
            EngineKind::Llamacpp,
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\nllamacpp:requests_deferred 2\n",
        )
        .unwrap();
        assert_eq!((s.waiting, s.running, s.kv_usage), (Some(2), Some(1), None));
        let s = read(
            EngineKind::Tgi,
            "tgi_queue_size 4\ntgi_batch_current_size 2\ntgi_request_count 99\n",
        )
        .unwrap();
        assert_eq!((s.waiting, s.running, s.kv_usage), (Some(4), Some(2), None));
    }

    #[test]
    fn overrides_replace_the_defaults() {
        let overrides = MetricNames {
            waiting: Some("vllm:queue_depth".into()),
            ..Default::default()
        };
        let names = NameSet::of(EngineKind::Vllm, Some(&overrides)).unwrap();
        assert_eq!(names.waiting, ["vllm:queue_depth"]);
        assert_eq!(names.running, ["vllm:num_requests_running"]);
        let s =
            from_prometheus("vllm:queue_depth 9\nvllm:num_requests_waiting 1\n", &names).unwrap();
        assert_eq!(s.waiting, Some(9));
        assert!(NameSet::of(EngineKind::Ollama, None).is_none());
    }

    #[test]
    fn garbage_and_missing_metrics_are_told_apart() {
        let e = read(EngineKind::Vllm, "<html>502 Bad Gateway</html>").unwrap_err();
        assert_eq!(e.reason(), "parse", "{e}");
        let e = read(EngineKind::Vllm, "process_cpu_seconds_total 1\n").unwrap_err();
        assert_eq!(e.reason(), "missing", "{e}");
        let e = read(EngineKind::Vllm, "vllm:num_requests_waiting{x=1} 1\n").unwrap_err();
        assert_eq!(e.reason(), "parse", "{e}");
    }

    #[test]
    fn ollama_lists_its_loaded_models() {
        let s = from_ollama_ps(
            br#"{"models":[{"name":"llama3:latest","model":"llama3:latest","size_vram":1}]}"#,
        )
        .unwrap();
        assert_eq!(s.models_loaded, Some(vec!["llama3:latest".to_string()]));
        assert!(from_ollama_ps(b"nope").is_err());
    }
}
