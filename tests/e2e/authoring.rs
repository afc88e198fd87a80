//! The policy author's tools: `sluice policy new` scaffolds a crate that
//! works as is, `[recording]` samples live requests, and `sluice policy
//! test` replays them offline against a described fleet.

use std::process::Command;

use crate::common::*;

/// The README's "write your first policy" walkthrough, command by command:
/// `sluice policy new` makes a crate whose own tests pass, which builds for
/// `wasm32-wasip2`, and which deploys with `sluice policy deploy` and
/// routes (its config steers traffic away from vm01). Prints the time from
/// `policy new` to the first request it routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_policy_builds_tests_and_deploys_as_scaffolded() {
    let started = std::time::Instant::now();
    let dir = TempDir::new();
    let root = env!("CARGO_MANIFEST_DIR").to_string() + "/..";
    // Shared between runs, so dependencies are built once per machine.
    let target = format!("{root}/target/scaffold");
    let new = Command::new(BIN)
        .args(["policy", "new", "my-router", "--dir"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(
        new.status.success(),
        "{}",
        String::from_utf8_lossy(&new.stderr)
    );
    let crate_dir = dir.0.join("my-router");
    let again = Command::new(BIN)
        .args(["policy", "new", "my-router", "--dir"])
        .arg(&dir.0)
        .output()
        .unwrap();
    assert!(!again.status.success(), "it overwrote an existing crate");
    let cargo = |args: &[&str]| {
        let output = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(&crate_dir)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_TARGET")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "cargo {args:?} failed:\n{text}");
        text
    };
    let tested = cargo(&["test"]);
    assert!(tested.contains("2 passed"), "{tested}");
    cargo(&["build", "--target", "wasm32-wasip2", "--release"]);
    let module = format!("{target}/wasm32-wasip2/release/my_router.wasm");

    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start_with(
        &Config::new()
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .to_toml(),
        &[("SLUICE_ADMIN_TOKEN", "tok")],
    );
    let config = dir.write("avoid.json", r#"{"avoid": ["vm01"]}"#);
    let deployed = Command::new(BIN)
        .args(["policy", "deploy", "my-router", &module, "--config"])
        .arg(&config)
        .args(["--position", "0"])
        .env("SLUICE_ADMIN_URL", sluice.admin_url(""))
        .env("SLUICE_ADMIN_TOKEN", "tok")
        .output()
        .unwrap();
    assert!(
        deployed.status.success(),
        "{}",
        String::from_utf8_lossy(&deployed.stderr)
    );
    let client = client();
    for _ in 0..20 {
        let response = sluice.post_chat(&client, &chat("m")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-sluice-backend"], "vm02");
    }
    println!(
        "policy new → tested → built → deployed → routing: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs `sluice policy test` and returns (success, stdout, stderr).
fn policy_test(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .args(["policy", "test"])
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Live requests are sampled to a JSON-lines file without credentials
/// (bodies over the bound reduced to `model` and `stream`); `sluice policy
/// test` replays that file offline against a described fleet, prints the
/// decisions, passes with `--expect` on its own output and fails on a
/// planted difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_traffic_replays_offline_and_pins_decisions() {
    let vm01 = mock("vm01", &["m"]).await;
    let vm02 = mock("vm02", &["m"]).await;
    let sluice = Sluice::start(
        &Config::new()
            .auth_required()
            .consumer(Consumer::new("alice", "sk-rec-secret"))
            .set("recording", "path", "recorded.jsonl")
            .set("recording", "sample", 1.0)
            .set("recording", "max_body_bytes", "2KiB")
            .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
            .backend(Backend::new("vm02", &vm02.url()).models(["m"]))
            .policy(
                Policy::guest("pin", "pin-backend").config(serde_json::json!({"default": "vm01"})),
            )
            .to_toml(),
    );
    let client = client();
    for pin in ["vm01", "vm02", "vm02,vm01"] {
        let response = client
            .post(sluice.url("/v1/chat/completions"))
            .bearer_auth("sk-rec-secret")
            .header("x-pin-backend", pin)
            .header("cookie", "session=rec-cookie")
            .json(&chat("m"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let big = serde_json::json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let response = client
        .post(sluice.url("/v1/chat/completions"))
        .bearer_auth("sk-rec-secret")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.text().await;

    let path = sluice.dir.0.join("recorded.jsonl");
    let started = std::time::Instant::now();
    let recorded = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() == 4 {
            break text;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "four recorded requests expected: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(
        !recorded.contains("sk-rec-secret") && !recorded.contains("rec-cookie"),
        "a credential was recorded: {recorded}"
    );
    let lines: Vec<serde_json::Value> = recorded
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["consumer"], "alice");
    assert_eq!(lines[1]["headers"]["x-pin-backend"], "vm02");
    assert_eq!(lines[0]["body"]["messages"][0]["content"], "Say hello");
    assert_eq!(
        lines[3]["body"],
        serde_json::json!({"model": "m", "stream": true}),
        "an over-bound body is reduced to what routing needs"
    );

    let fleet = sluice.dir.write(
        "fleet.toml",
        Config::new()
            .backend(Backend::new("vm01", "http://10.0.0.1:8000").models(["m"]))
            .backend(Backend::new("vm02", "http://10.0.0.2:8000").models(["m"]))
            .to_toml(),
    );
    let config = sluice.dir.write("pin.json", r#"{"default": "vm01"}"#);
    let module = test_guest("pin-backend");
    let args = [
        module.as_str(),
        "--requests",
        path.to_str().unwrap(),
        "--fleet",
        fleet.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let (ok, decisions, stderr) = policy_test(&args);
    assert!(ok, "{stderr}");
    let backends: Vec<Vec<String>> = decisions
        .lines()
        .map(|l| {
            let d: serde_json::Value = serde_json::from_str(l).unwrap();
            d["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["backend"].as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    assert_eq!(
        backends,
        [
            vec!["vm01"],
            vec!["vm02"],
            vec!["vm02", "vm01"],
            vec!["vm01"]
        ]
    );

    let expected = sluice.dir.write("expected.jsonl", &decisions);
    let with_expect = [&args[..], &["--expect", expected.to_str().unwrap()]].concat();
    let (ok, _, stderr) = policy_test(&with_expect);
    assert!(ok, "its own output did not pass --expect: {stderr}");

    let planted = sluice
        .dir
        .write("expected.jsonl", decisions.replacen("vm02", "vm03", 1));
    let with_planted = [&args[..], &["--expect", planted.to_str().unwrap()]].concat();
    let (ok, _, stderr) = policy_test(&with_planted);
    assert!(!ok, "a planted difference passed");
    assert!(stderr.contains("request 2: expected"), "{stderr}");
}
