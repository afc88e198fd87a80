//! Shared helpers: start the binary with a config, start mock backends,
//! and check OpenAI-shaped errors. Raw-TCP fakes for backends that
//! misbehave are in [`fake_backend`].

pub mod config;
pub mod fake_backend;

pub use config::{Backend, Config, Consumer, Policy, Worker};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sluice::tools::mock::{Flavor, MockBackend, MockConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A directory that is removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "sluice-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running `sluice serve`, killed when dropped.
pub struct Sluice {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: TempDir,
    env: Vec<(String, String)>,
}

impl Sluice {
    /// Starts `sluice serve` with this config on ephemeral ports and waits
    /// until it listens. Panics with its stderr if it does not start.
    pub fn start(config: &str) -> Sluice {
        Sluice::start_with(config, &[])
    }

    /// [`Sluice::start`] with extra environment variables.
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Sluice {
        let dir = TempDir::new();
        dir.write("sluice.toml", config);
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Sluice::spawn(dir, env)
    }

    fn spawn(dir: TempDir, env: Vec<(String, String)>) -> Sluice {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.0.join("stderr.log"))
            .unwrap();
        let mut child = serve_command(&dir.0.join("sluice.toml"), "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            // The tests read /health, /load-stats and /metrics off the data
            // port; the default (`summary`) is tested on its own in abuse.rs.
            .env("SLUICE_STATUS_ENDPOINTS", "data-plane")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting sluice");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut admin = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("admin listening on http://") {
                    admin = addr.parse::<SocketAddr>().ok();
                }
                if let Some(addr) = line.strip_prefix("sluice listening on http://") {
                    let _ = tx.send((addr.parse::<SocketAddr>().unwrap(), admin.unwrap()));
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((addr, admin)) => Sluice {
                child,
                addr,
                admin,
                dir,
                env,
            },
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.0.join("stderr.log")).unwrap_or_default();
                panic!("sluice did not start:\n{log}");
            }
        }
    }

    /// Stops the process and starts it again with the same config and
    /// state directory.
    pub fn restart(mut self) -> Sluice {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = TempDir(std::mem::take(&mut self.dir.0));
        let env = std::mem::take(&mut self.env);
        Sluice::spawn(dir, env)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs `body` to `/v1/chat/completions`.
    pub async fn post_chat(
        &self,
        client: &reqwest::Client,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        client
            .post(self.url("/v1/chat/completions"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Sends SIGTERM and waits for the process to exit; its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    /// Waits for the process to exit (after a signal sent some other way).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Sends `signal` (e.g. "TERM", "HUP") without waiting.
    pub fn signal(&self, signal: &str) {
        Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// The process id, to read its memory use.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sluice serve` with the config at `config`, its data port on an
/// ephemeral port of 127.0.0.1 and its admin listener on `admin_listen`.
pub fn serve_command(config: &Path, admin_listen: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen"])
        .arg(admin_listen)
        .arg("--config")
        .arg(config);
    command
}

/// Runs `sluice ARGS…` to completion.
pub fn run_sluice(args: &[&str], config: Option<&Path>) -> Output {
    let mut command = Command::new(BIN);
    command.args(args);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.output().expect("running sluice")
}

/// `sluice policy ARGS` against `sluice`'s admin API with `token`: whether
/// it succeeded, and its stdout then stderr.
pub fn policy_cli(sluice: &Sluice, token: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(BIN)
        .arg("policy")
        .args(args)
        .env("SLUICE_ADMIN_URL", sluice.admin_url(""))
        .env("SLUICE_ADMIN_TOKEN", token)
        .output()
        .expect("running sluice policy");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// Starts an in-process simulated backend on an ephemeral port.
pub async fn mock(name: &str, models: &[&str]) -> MockBackend {
    mock_with(MockConfig::new(name, models)).await
}

pub async fn mock_with(config: MockConfig) -> MockBackend {
    MockBackend::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

pub fn paced(
    name: &str,
    models: &[&str],
    flavor: Flavor,
    interval_ms: u64,
    tokens: u32,
) -> MockConfig {
    let mut config = MockConfig::new(name, models);
    config.flavor = flavor;
    config.token_interval = Duration::from_millis(interval_ms);
    config.answer_tokens = tokens;
    config
}

/// A `[[backends]]` entry with `extra` lines of TOML after its keys; see
/// [`Backend`] for a typed one.
pub fn backend(name: &str, url: &str, models: &[&str], extra: &str) -> String {
    let entry = Backend::new(name, url).models(models.iter().copied());
    format!("{}{extra}\n", entry.to_toml())
}

/// The path of a test guest built from `tests/guests/` by the build script.
pub fn test_guest(name: &str) -> String {
    format!(
        "{}/{}.wasm",
        env!("SLUICE_TEST_GUESTS"),
        name.replace('-', "_")
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

/// A chat request for `model` with `stream: true`.
pub fn stream_chat(model: &str) -> serde_json::Value {
    let mut body = chat(model);
    body["stream"] = serde_json::json!(true);
    body
}

/// Asserts an OpenAI-shaped error with this status and code.
pub async fn expect_error(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].as_str().is_some(), "{body}");
    assert_eq!(error["code"], code, "{body}");
    body
}

/// The `data:` payloads of an SSE body, in order.
pub fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// The text of a streamed chat answer, from its events.
pub fn content(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// POSTs one chat request for `model` to `url`, expects 200, reads the
/// answer, and returns the backend that served it (`x-sluice-backend`).
pub async fn chat_backend(client: &reqwest::Client, url: &str, model: &str) -> String {
    let response = client.post(url).json(&chat(model)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let backend = response.headers()["x-sluice-backend"]
        .to_str()
        .unwrap()
        .to_string();
    response.bytes().await.unwrap();
    backend
}

/// GETs `url` and reads the answer as JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// The value of an unlabelled metric in Prometheus' text exposition.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// GETs `url` and reads the answer as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
