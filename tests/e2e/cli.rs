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
