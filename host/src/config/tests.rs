//! Parsing and validation, one bad key at a time.

use super::*;
use std::time::Duration;

const MINIMAL: &str = r#"
    [[backends]]
    name = "vm01"
    url = "http://127.0.0.1:9001"
    models = ["glm4-9b"]
"#;

fn error_of(extra: &str) -> String {
    let text = format!("{MINIMAL}\n{extra}");
    match Config::parse(&text).and_then(|c| c.validate().map(|_| c)) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    c.validate().unwrap();
    assert_eq!(c.server.max_body_bytes, 16 << 20);
    assert_eq!(c.backends[0].weight, 1);
    assert_eq!(c.policy_chain()[0].module, "builtin:model-router");
}

#[test]
fn errors_name_the_key() {
    assert!(error_of("[server]\nlisten = 5").contains("listen"));
    assert!(error_of("[server]\nmax_body_bytes = \"12 parsecs\"").contains("parsecs"));
    assert!(error_of("[server]\nbogus = 1").contains("bogus"));
    let e = error_of("[[backends]]\nname = \"vm01\"\nurl = \"http://x:1\"\nmodels = [\"m\"]");
    assert!(e.contains("backends[1].name"), "{e}");
    let e = error_of("[[backends]]\nname = \"b\"\nurl = \"ftp://x\"\nmodels = [\"m\"]");
    assert!(e.contains("backends[1].url"), "{e}");
    let e = error_of("[[policies]]\nname = \"p\"\nmodule = \"builtin:nope\"");
    assert!(
        e.contains("policies[0].module") && e.contains("model-router"),
        "{e}"
    );
}

/// vllm-router's servers.toml (seed 001), unchanged.
#[test]
fn a_vllm_router_servers_file_is_read_as_backends() {
    let c = Config::parse(
        r#"
        [servers]
        servers = [
            { url = "http://gpu-server-1:8081", max_concurrent_requests = 8 },
            { url = "http://backup-server-1:8081" },
        ]
        "#,
    )
    .unwrap();
    c.validate().unwrap();
    let seen: Vec<(&str, u32, bool)> = c
        .backends
        .iter()
        .map(|b| {
            (
                b.name.as_str(),
                b.max_concurrent_requests,
                b.models.is_empty(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("gpu-server-1:8081", 8, true),
            ("backup-server-1:8081", 0, true)
        ]
    );
    let both = Config::parse(&format!(
        "{MINIMAL}
[servers]
servers = [{{ url = \"http://10.0.0.2:8000\" }}]"
    ))
    .unwrap();
    assert_eq!(both.backends.len(), 2);

    let e = error_of("[servers]\nservers = [{ url = \"http://a:1\" }, { url = \"ftp://b\" }]");
    assert!(e.contains("servers.servers[1].url"), "{e}");
    let e = error_of("[servers]\nservers = [{ url = \"http://a:1\" }, { url = \"http://a:1/\" }]");
    assert!(
        e.contains("servers.servers[1].url") && e.contains("twice"),
        "{e}"
    );
    let e = error_of("[servers]\nservers = [{ url = \"http://a:1\", weight = 2 }]");
    assert!(e.contains("weight"), "{e}");
}

#[test]
fn worker_routes_and_hosts_are_checked() {
    let worker = |extra: &str| format!("[[workers]]\nname = \"w\"\nmodule = \"w.wasm\"\n{extra}");
    for (extra, key) in [
        ("route = \"tools/*\"", "workers[0].route"),
        ("route = \"/v1/*\"", "workers[0].route"),
        ("route = \"/*\"", "workers[0].route"),
        ("route = \"/health\"", "workers[0].route"),
        ("route = \"/tools*\"", "workers[0].route"),
        ("route = \"/a/*/b\"", "workers[0].route"),
        (
            "route = \"/t/*\"\nallowed_hosts = [\"https://x\"]",
            "workers[0].allowed_hosts[0]",
        ),
        ("route = \"/t/*\"\ntimeout = \"0s\"", "workers[0].timeout"),
        (
            "route = \"/t/*\"\nmemory_limit = \"1KiB\"",
            "workers[0].memory_limit",
        ),
    ] {
        let e = error_of(&worker(extra));
        assert!(e.contains(key), "{extra}: {e}");
    }
    let twice = format!(
        "{}\n{}",
        worker("route = \"/a/*\""),
        worker("route = \"/b/*\"")
    );
    assert!(error_of(&twice).contains("workers[1].name"));
    let c = Config::parse(&format!(
        "{MINIMAL}\n{}",
        worker("route = \"/tools/*\"\nallowed_hosts = [\"127.0.0.1:8080\", \"api.example.com\"]")
    ))
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.workers[0].max_concurrent_requests, 64);
}

#[test]
fn usage_sharing_is_checked() {
    for (extra, key) in [
        ("[usage]\nredis_url = \"http://x:6379\"", "usage.redis_url"),
        (
            "[usage]\ndisabled = true\nredis_url = \"redis://x:6379/0\"",
            "usage.redis_url",
        ),
        ("[usage]\nredis_max_records = 10", "usage.redis_max_records"),
        ("[usage]\nsync_interval = \"0s\"", "usage.sync_interval"),
        ("[usage]\nreplica = \"\"", "usage.replica"),
        ("[usage]\nredis_key = \"\"", "usage.redis_key"),
    ] {
        let e = error_of(extra);
        assert!(e.contains(key), "{extra}: {e}");
    }
    let c = Config::parse(&format!(
        "{MINIMAL}\n[usage]\nredis_url = \"redis://127.0.0.1:6379/0\"\nreplica = \"gw-1\""
    ))
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.usage.sync_interval, Duration::from_secs(1));
}

#[test]
fn engine_keys_are_checked() {
    let backend = |extra: &str| {
        format!("[[backends]]\nname = \"e\"\nurl = \"http://127.0.0.1:9002\"\nmodels = [\"m\"]\n{extra}")
    };
    for (extra, key) in [
        (
            backend("engine = \"vllm\"\nmetrics_url = \"ftp://x\""),
            "backends[1].metrics_url",
        ),
        (
            backend("metrics_url = \"/metrics\""),
            "backends[1].metrics_url",
        ),
        (backend("engine = \"triton\""), "engine"),
        (
            "[engine_metrics]\ninterval = \"1ms\"".into(),
            "engine_metrics.interval",
        ),
        (
            "[engine_metrics]\ntimeout = \"0s\"".into(),
            "engine_metrics.timeout",
        ),
        (
            "[engine_metrics]\nmax_bytes = 10".into(),
            "engine_metrics.max_bytes",
        ),
        (
            "[engine_metrics]\nstale_after = \"100ms\"".into(),
            "engine_metrics.stale_after",
        ),
        (
            "[engine_metrics.names.vllm]\nwaiting = \"bad name\"".into(),
            "engine_metrics.names.vllm.waiting",
        ),
        (
            "[engine_metrics.names.ollama]\nwaiting = \"x\"".into(),
            "ollama",
        ),
        ("[engine_metrics.names.tgi]\nqueue = \"x\"".into(), "queue"),
    ] {
        let e = error_of(&extra);
        assert!(e.contains(key), "{extra}: {e}");
    }
    let c = Config::parse(&format!(
        "{MINIMAL}\n{}\n[engine_metrics]\ninterval = \"100ms\"\n[engine_metrics.names.sglang]\nkv_usage = \"sglang:kv_used\"",
        backend("engine = \"sglang\"")
    ))
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.backends[0].engine, EngineKind::None);
    assert_eq!(c.backends[1].engine, EngineKind::Sglang);
    let rules = c.health_rules();
    assert_eq!(rules.engine.stale_after(), Duration::from_millis(400));
    assert_eq!(rules.engine.timeout, Duration::from_secs(1));
    assert_eq!(
        rules.engine.names.sglang.kv_usage.as_deref(),
        Some("sglang:kv_used")
    );
}

#[test]
fn sizes_and_durations_parse() {
    assert_eq!(parse_bytes("16MiB"), Ok(16 << 20));
    assert_eq!(parse_bytes("100"), Ok(100));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("soon").is_err());
}
