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

const GOOD: &str =
    "[[backends]]\nname = \"vm01\"\nurl = \"http://127.0.0.1:9\"\nmodels = [\"m\"]\n";

#[test]
fn check_config_accepts_a_good_file() {
    let dir = TempDir::new();
    let path = dir.write("sluice.toml", GOOD);
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
        &format!("{GOOD}[[backends]]\nname = \"vm02\"\nurl = \"ftp://x\"\nmodels = [\"m\"]\n"),
    );
    assert!(!ok);
    assert!(err.contains("backends[1].url"), "{err}");

    let (ok, err) = stderr_of(
        &["check-config"],
        &format!("[server]\nlisten = \"127.0.0.1:80\"\nmax_body = 5\n{GOOD}"),
    );
    assert!(!ok);
    assert!(err.contains("max_body"), "{err}");
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let dir = TempDir::new();
    let module = dir.write("bad.wasm", "not wasm at all");
    let config = format!(
        "{GOOD}[[policies]]\nname = \"bad\"\nmodule = {:?}\n",
        module.display().to_string()
    );
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
    let config = format!(
        "{GOOD}[[policies]]\nname = \"pin\"\nmodule = {:?}\n",
        test_guest("pin-backend")
    );
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
    let config = format!(
        "{GOOD}[[policies]]\nname = \"quiet\"\nmodule = {:?}\nconfig = {{ undeclared_failure = true }}\n",
        test_guest("misbehave")
    );
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok, "refused");
    assert!(
        err.contains("policy `quiet`") && err.contains("failure: true"),
        "{err}"
    );
    // The same guest, not answering on_failure, is accepted.
    let config = format!(
        "{GOOD}[[policies]]\nname = \"quiet\"\nmodule = {:?}\n",
        test_guest("misbehave")
    );
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(ok, "{err}");
}

/// A guest that traps on the trial request is refused with its panic
/// message, before it can serve a request.
#[test]
fn a_policy_that_traps_on_its_trial_is_refused() {
    let config = format!(
        "{GOOD}[[policies]]\nname = \"bad\"\nmodule = {:?}\nconfig = {{ always = \"trap\" }}\n",
        test_guest("misbehave")
    );
    let (ok, err) = stderr_of(&["check-config"], &config);
    assert!(!ok);
    assert!(
        err.contains("policy `bad`")
            && err.contains("trial request")
            && err.contains("misbehave: deliberate trap"),
        "{err}"
    );

    let config = format!(
        "{GOOD}[[policies]]\nname = \"bad\"\nmodule = {:?}\nconfig = {{ fail_init = true }}\n",
        test_guest("misbehave")
    );
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

/// Starts `sluice serve` on a free data-plane port and no `--admin-listen`,
/// and returns the child and the addresses it printed.
fn serve_with_default_admin(config: &std::path::Path) -> (std::process::Child, String, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .env_remove("SLUICE_ADMIN_LISTEN")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting sluice");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut admin = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("admin listening on http://") {
                admin = addr.to_string();
            }
            if let Some(addr) = line.strip_prefix("sluice listening on http://") {
                let _ = tx.send((addr.to_string(), admin.clone()));
            }
        }
    });
    match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok((addr, admin)) => (child, addr, admin),
        Err(_) => {
            let _ = child.kill();
            panic!("sluice did not start while the default admin port was taken");
        }
    }
}

#[tokio::test]
async fn a_second_gateway_starts_when_the_default_admin_port_is_taken() {
    // Whoever holds 127.0.0.1:8081 (this test, or anything else on the
    // machine), a gateway that was not asked for that port must start.
    let _holder = std::net::TcpListener::bind("127.0.0.1:8081");
    let vm01 = mock("vm01", &["m"]).await;
    let dir = TempDir::new();
    let config = dir.write("sluice.toml", backend("vm01", &vm01.url(), &["m"], ""));
    let (mut child, addr, admin) = serve_with_default_admin(&config);
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
    use std::io::BufRead;
    let mut child = std::process::Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting the demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut gateway = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(addr) = line.strip_prefix("Sluice demo: gateway on http://") {
                gateway = addr.trim().to_string();
            }
            if let Some(rest) = line.strip_prefix("Console: http://") {
                let console = rest.split('/').next().unwrap_or_default().to_string();
                let _ = tx.send((gateway.clone(), console));
            }
        }
    });
    let started = rx.recv_timeout(std::time::Duration::from_secs(60));
    let Ok((gateway, console)) = started else {
        let _ = child.kill();
        panic!("the demo printed no console address");
    };
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
