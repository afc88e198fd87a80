//! `sluice check-config` and start-up refuse bad configs and bad policies
//! with a message naming what is wrong.

use crate::common::*;

fn stderr_of(args: &[&str], config: &str) -> (bool, String) {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", config);
    let output = run_sluice(args, Some(&path));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// One backend, nothing else: a config `check-config` accepts.
fn good() -> Config {
    Config::new().backend(Backend::new("vm01", "http://127.0.0.1:9").models(["m"]))
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", good().to_toml());
    let output = run_sluice(&["check-config"], Some(&path));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));
    let written: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        written,
        ["sluice.toml"],
        "check-config wrote files beside the config"
    );
}

#[test]
fn check_config_names_the_bad_key() {
    let (ok, err) = stderr_of(
        &["check-config"],
        &good()
            .backend(Backend::new("vm02", "ftp://x").models(["m"]))
            .to_toml(),
    );
    assert!(!ok);
    assert!(err.contains("backends[1].url"), "{err}");

    let (ok, err) = stderr_of(
        &["check-config"],
        &good()
            .server("listen", "127.0.0.1:80")
            .server("max_body", 5)
            .to_toml(),
    );
    assert!(!ok);
    assert!(err.contains("max_body"), "{err}");
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let dir = TempDir::new();
    let module = dir.write("bad.wasm", "not wasm at all");
    let config = good()
        .policy(Policy::new("bad", &module.display().to_string()))
        .to_toml();
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok);
    assert!(
        err.contains("policy `bad`") && err.contains("not a valid WebAssembly component"),
        "{err}"
    );
}

/// The pin-backend guest refuses to start without its `default` setting:
/// its `init` error is reported with the guest's own message.
#[test]
fn a_policy_whose_init_refuses_its_config_is_refused() {
    let config = good().policy(Policy::guest("pin", "pin-backend")).to_toml();
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok);
    assert!(
        err.contains("policy `pin`") && err.contains("init refused: config needs `default`"),
        "{err}"
    );
}

/// A policy that answers `on_failure` without declaring the failure hook
/// would be silently never called: it is refused, saying what to change.
#[test]
fn an_undeclared_failure_hook_is_refused() {
    let config = good()
        .policy(
            Policy::guest("quiet", "misbehave")
                .config(serde_json::json!({"undeclared_failure": true})),
        )
        .to_toml();
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok, "refused");
    assert!(
        err.contains("policy `quiet`") && err.contains("failure: true"),
        "{err}"
    );
    // The same guest, not answering on_failure, is accepted.
    let config = good().policy(Policy::guest("quiet", "misbehave")).to_toml();
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(ok, "{err}");
}

/// A guest that traps on the trial request is refused with its panic
/// message, before it can serve a request.
#[test]
fn a_policy_that_traps_on_its_trial_is_refused() {
    let config = good()
        .policy(Policy::guest("bad", "misbehave").config(serde_json::json!({"always": "trap"})))
        .to_toml();
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok);
    assert!(
        err.contains("policy `bad`")
            && err.contains("trial request")
            && err.contains("misbehave: deliberate trap"),
        "{err}"
    );

    let config = good()
        .policy(Policy::guest("bad", "misbehave").config(serde_json::json!({"fail_init": true})))
        .to_toml();
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok);
    assert!(
        err.contains("policy `bad`") && err.contains("misbehave: init refused"),
        "{err}"
    );
}

#[test]
fn serve_without_a_config_says_so() {
    let output = run_sluice(&["serve", "--config", "/nonexistent/sluice.toml"], None);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/sluice.toml"));
}

/// Starts `command` (the binary, stdout piped) and reads its stdout until
/// a line starts with `last` (60 s at most): the child and the lines read.
fn started_until(
    mut command: std::process::Command,
    last: &str,
) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut child = command
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting sluice");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = last.to_string();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let done = line.starts_with(&wanted);
            lines.push(line);
            if done {
                let _ = tx.send(std::mem::take(&mut lines));
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(lines) => (child, lines),
        Err(_) => {
            let _ = child.kill();
            panic!("sluice printed no line starting with `{last}`");
        }
    }
}

/// The text after `prefix` on the first line that has it.
fn after(lines: &[String], prefix: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in {lines:?}"))
        .trim()
        .to_string()
}

#[tokio::test]
async fn a_second_gateway_starts_when_the_default_admin_port_is_taken() {
    // Whoever holds 127.0.0.1:8081 (this test, or anything else on the
    // machine), a gateway that was not asked for that port must start.
    let _holder = std::net::TcpListener::bind("127.0.0.1:8081");
    let vm01 = mock("vm01", &["m"]).await;
    let dir = TempDir::new();
    let config = dir.write("sluice.toml", backend("vm01", &vm01.url(), &["m"], ""));
    let mut serve = std::process::Command::new(BIN);
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env_remove("SLUICE_ADMIN_LISTEN");
    let (mut child, lines) = started_until(serve, "sluice listening on");
    let addr = after(&lines, "sluice listening on http://");
    let admin = after(&lines, "admin listening on http://");
    let client = client();
    let answer = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&chat("m"))
        .send()
        .await
        .unwrap();
    let policies = client
        .get(format!("http://{admin}/admin/policies"))
        .send()
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.status(), 200, "the data plane serves");
    assert!(
        !admin.ends_with(":8081"),
        "admin moved off the taken port: {admin}"
    );
    assert_eq!(policies.status(), 200, "the admin API answers on {admin}");
}

#[tokio::test]
async fn the_demo_serves_its_console_and_prints_where() {
    let mut demo = std::process::Command::new(BIN);
    demo.args(["demo", "--listen", "127.0.0.1:0"]);
    let (mut child, lines) = started_until(demo, "Console: http://");
    let gateway = after(&lines, "Sluice demo: gateway on http://");
    let console = after(&lines, "Console: http://");
    let console = console.split('/').next().unwrap_or_default().to_string();
    let client = client();
    let page = client.get(format!("http://{console}/")).send().await;
    let fleet = client
        .get(format!("http://{console}/admin/fleet"))
        .send()
        .await;
    let answer = client
        .post(format!("http://{gateway}/v1/chat/completions"))
        .json(&chat("glm4-9b"))
        .send()
        .await;
    let _ = child.kill();
    let _ = child.wait();
    let page = page.expect("console page");
    assert_eq!(page.status(), 200);
    assert!(
        page.text().await.unwrap().contains("<html"),
        "the console's page"
    );
    assert_eq!(
        fleet.expect("fleet").status(),
        200,
        "no token needed in the demo"
    );
    assert_eq!(answer.expect("chat").status(), 200);
}
