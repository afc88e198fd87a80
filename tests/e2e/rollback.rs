//! Rollback undoes the last change: after deploy A, rollback, deploy B, a
//! rollback brings back what served before B (version 1), never the
//! rejected A. Over real sockets, plain and streamed, on one replica and
//! across two sharing a state directory, after a restart; activation by
//! number; edge workers likewise, across replicas too.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::tools::mock::MockBackend;

use crate::common::*;

/// `router` is `builtin:model-router` as version 1; `m` resolves to
/// `only1`, which only vm01 serves. Versions deployed later are the
/// pinning guest, sending everything to their `default`.
fn router_config(backends: &[&MockBackend]) -> Config {
    Config::new()
        .backend(Backend::new("vm01", &backends[0].url()).models(["m", "only1"]))
        .backend(Backend::new("vm02", &backends[1].url()).models(["m"]))
        .backend(Backend::new("vm03", &backends[2].url()).models(["m"]))
        .policy(Policy::builtin("model-router").config(json!({"aliases": {"m": "only1"}})))
}

async fn three_backends() -> [MockBackend; 3] {
    [
        mock("vm01", &["m", "only1"]).await,
        mock("vm02", &["m"]).await,
        mock("vm03", &["m"]).await,
    ]
}

/// The backends a plain request and a streamed one went to; the stream
/// must end whole.
async fn served_by(client: &reqwest::Client, sluice: &Sluice) -> (String, String) {
    let plain = sluice.post_chat(client, &chat("m")).await;
    assert_eq!(plain.status(), 200);
    let plain_backend = plain.headers()["x-sluice-backend"]
        .to_str()
        .unwrap()
        .to_string();
    let streamed = sluice.post_chat(client, &stream_chat("m")).await;
    assert_eq!(streamed.status(), 200);
    let stream_backend = streamed.headers()["x-sluice-backend"]
        .to_str()
        .unwrap()
        .to_string();
    let text = streamed.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!content(&events(&text)).is_empty(), "{text}");
    (plain_backend, stream_backend)
}

/// The backend serving `m` on a replica whose policy is not changing:
/// plain and streamed must agree.
async fn serving(client: &reqwest::Client, sluice: &Sluice) -> String {
    let (plain, streamed) = served_by(client, sluice).await;
    assert_eq!(plain, streamed, "plain and streamed disagree");
    plain
}

/// Waits (up to 5 s) until `sluice` serves from `backend`, plain and
/// streamed. While a replica is following another's change, the two
/// requests may straddle the switch, so they are only compared once the
/// switch is seen.
async fn until_serving(client: &reqwest::Client, sluice: &Sluice, backend: &str) {
    let started = Instant::now();
    loop {
        let (plain, streamed) = served_by(client, sluice).await;
        if plain == backend && streamed == backend {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still served by {plain} (plain) and {streamed} (streamed), expected {backend}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pin_query(default: &str) -> String {
    let config = json!({"default": default}).to_string();
    format!(
        "?config={}",
        form_urlencoded::byte_serialize(config.as_bytes()).collect::<String>()
    )
}

/// Deploys the pinning guest as a new version of `router`; its number.
async fn deploy_pin(client: &reqwest::Client, sluice: &Sluice, default: &str) -> u64 {
    let response = client
        .put(sluice.admin_url(&format!("/admin/policies/router{}", pin_query(default))))
        .body(std::fs::read(test_guest("pin-backend")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let version: Value = response.json().await.unwrap();
    version["version"].as_u64().unwrap()
}

async fn post(client: &reqwest::Client, sluice: &Sluice, path: &str) -> reqwest::Response {
    client.post(sluice.admin_url(path)).send().await.unwrap()
}

/// Rolls `router` back; the version it returned to.
async fn rollback(client: &reqwest::Client, sluice: &Sluice) -> u64 {
    let response = post(client, sluice, "/admin/policies/router/rollback").await;
    assert_eq!(response.status(), 200);
    let version: Value = response.json().await.unwrap();
    version["version"].as_u64().unwrap()
}

async fn router_listing(client: &reqwest::Client, sluice: &Sluice) -> Value {
    let list = get_json(client, &sluice.admin_url("/admin/policies")).await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "router")
        .cloned()
        .unwrap()
}

/// (version, how) of each activation, oldest first.
fn activations(listing: &Value) -> Vec<(u64, String)> {
    let mut list: Vec<(u64, String)> = listing["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["version"].as_u64().unwrap(),
                a["how"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    list.reverse();
    list
}

fn steps(list: &[(u64, &str)]) -> Vec<(u64, String)> {
    list.iter().map(|(v, h)| (*v, h.to_string())).collect()
}

/// The sequence on one replica: v1 (builtin) → deploy A (v2) →
/// rollback (v1) → deploy B (v3) → rollback: v1 again, not A; a third
/// rollback is refused with 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_a_rejected_deploy_returns_to_what_served_before() {
    let backends = three_backends().await;
    let sluice = Sluice::start(&router_config(&backends.each_ref()).to_toml());
    let client = client();
    assert_eq!(serving(&client, &sluice).await, "vm01", "v1: the builtin");

    assert_eq!(deploy_pin(&client, &sluice, "vm02").await, 2);
    assert_eq!(serving(&client, &sluice).await, "vm02", "v2: A");
    assert_eq!(rollback(&client, &sluice).await, 1);
    assert_eq!(serving(&client, &sluice).await, "vm01", "rolled back to v1");
    assert_eq!(deploy_pin(&client, &sluice, "vm03").await, 3);
    assert_eq!(serving(&client, &sluice).await, "vm03", "v3: B");
    assert_eq!(rollback(&client, &sluice).await, 1, "not A (v2)");
    assert_eq!(serving(&client, &sluice).await, "vm01", "rolled back to v1");
    let refused = post(&client, &sluice, "/admin/policies/router/rollback").await;
    expect_error(refused, 409, "conflict").await;
    assert_eq!(serving(&client, &sluice).await, "vm01");

    let listing = router_listing(&client, &sluice).await;
    assert_eq!(listing["active_version"], 1, "{listing}");
    assert_eq!(listing["rollback_to"], Value::Null, "{listing}");
    assert_eq!(
        activations(&listing),
        steps(&[
            (1, "config"),
            (2, "deploy"),
            (1, "rollback"),
            (3, "deploy"),
            (1, "rollback"),
        ]),
        "{listing}"
    );
    let history = listing["history"].as_array().unwrap();
    assert_eq!(history[0]["until_ms"], Value::Null, "{listing}");
    assert_eq!(history[0]["undid"], 3, "{listing}");
    assert!(
        history[1..].iter().all(|a| a["until_ms"].is_u64()),
        "{listing}"
    );
    assert!(history.iter().all(|a| a["followed"] == false), "{listing}");

    // A second rollback walks further back: B' (v4), C (v5) → v4 → v1.
    assert_eq!(deploy_pin(&client, &sluice, "vm02").await, 4);
    assert_eq!(deploy_pin(&client, &sluice, "vm03").await, 5);
    assert_eq!(serving(&client, &sluice).await, "vm03");
    assert_eq!(rollback(&client, &sluice).await, 4);
    assert_eq!(serving(&client, &sluice).await, "vm02");
    assert_eq!(rollback(&client, &sluice).await, 1);
    assert_eq!(serving(&client, &sluice).await, "vm01");
}

/// The same sequence across two replicas sharing a state directory, each
/// change made on the other replica: both serve each step, and both list
/// the same history (each marking what the other did as followed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_a_state_directory_agree_on_the_history() {
    let backends = three_backends().await;
    let state = TempDir::new();
    let config = router_config(&backends.each_ref())
        .set("policy_store", "state_dir", state.0.display().to_string())
        .set("policy_store", "sync_interval", "100ms")
        .to_toml();
    let replicas = [Sluice::start(&config), Sluice::start(&config)];
    let client = client();
    for r in &replicas {
        assert_eq!(serving(&client, r).await, "vm01");
    }
    let both = |backend: &'static str| {
        let client = client.clone();
        let replicas = &replicas;
        async move {
            for r in replicas {
                until_serving(&client, r, backend).await;
            }
        }
    };
    assert_eq!(deploy_pin(&client, &replicas[0], "vm02").await, 2);
    both("vm02").await;
    assert_eq!(rollback(&client, &replicas[1]).await, 1);
    both("vm01").await;
    assert_eq!(deploy_pin(&client, &replicas[0], "vm03").await, 3);
    both("vm03").await;
    assert_eq!(rollback(&client, &replicas[1]).await, 1, "not A (v2)");
    both("vm01").await;
    let refused = post(&client, &replicas[0], "/admin/policies/router/rollback").await;
    expect_error(refused, 409, "conflict").await;

    let listings = [
        router_listing(&client, &replicas[0]).await,
        router_listing(&client, &replicas[1]).await,
    ];
    let strip = |listing: &Value| -> Vec<Value> {
        listing["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let mut a = a.clone();
                a.as_object_mut().unwrap().remove("followed");
                a
            })
            .collect()
    };
    assert_eq!(strip(&listings[0]), strip(&listings[1]), "{listings:?}");
    // Both replicas started (one first from the config, the other resumed
    // what the first had saved), then the four changes.
    let changes: Vec<(u64, String)> = activations(&listings[0])
        .into_iter()
        .filter(|(_, how)| how != "restart")
        .collect();
    assert_eq!(
        changes,
        steps(&[
            (1, "config"),
            (2, "deploy"),
            (1, "rollback"),
            (3, "deploy"),
            (1, "rollback"),
        ]),
        "{listings:?}"
    );
    // The newest is replica 1's rollback: replica 0 followed it.
    assert_eq!(listings[0]["history"][0]["followed"], true, "{listings:?}");
    assert_eq!(listings[1]["history"][0]["followed"], false, "{listings:?}");
    let replica = |i: usize| listings[0]["history"][i]["replica"].clone();
    assert_ne!(replica(0), replica(1), "{listings:?}");
}

/// Rollback after a restart walks the history saved before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_a_restart_walks_the_saved_history() {
    let backends = three_backends().await;
    let sluice = Sluice::start(&router_config(&backends.each_ref()).to_toml());
    let client = client();
    assert_eq!(deploy_pin(&client, &sluice, "vm02").await, 2);
    assert_eq!(rollback(&client, &sluice).await, 1);
    assert_eq!(deploy_pin(&client, &sluice, "vm03").await, 3);
    let sluice = sluice.restart();
    assert_eq!(
        serving(&client, &sluice).await,
        "vm03",
        "v3 after the restart"
    );
    let listing = router_listing(&client, &sluice).await;
    assert_eq!(listing["rollback_to"], 1, "{listing}");
    assert_eq!(
        activations(&listing).last().unwrap(),
        &(3, "restart".to_string())
    );
    assert_eq!(rollback(&client, &sluice).await, 1, "not A (v2)");
    assert_eq!(serving(&client, &sluice).await, "vm01");
    expect_error(
        post(&client, &sluice, "/admin/policies/router/rollback").await,
        409,
        "conflict",
    )
    .await;
    // And after a second restart, v1 still serves and there is still
    // nothing to roll back to.
    let sluice = sluice.restart();
    assert_eq!(serving(&client, &sluice).await, "vm01");
    expect_error(
        post(&client, &sluice, "/admin/policies/router/rollback").await,
        409,
        "conflict",
    )
    .await;
}

/// An older version activated by number, over the API and the CLI; a
/// rollback then returns to what served before the activation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_is_activated_by_number() {
    let backends = three_backends().await;
    let sluice = Sluice::start_with(
        &router_config(&backends.each_ref()).to_toml(),
        &[("SLUICE_ADMIN_TOKEN", "tok")],
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                "Bearer tok".parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    assert_eq!(deploy_pin(&client, &sluice, "vm02").await, 2);
    assert_eq!(deploy_pin(&client, &sluice, "vm03").await, 3);
    let activated = post(&client, &sluice, "/admin/policies/router/activate/1").await;
    assert_eq!(activated.status(), 200);
    let activated: Value = activated.json().await.unwrap();
    assert_eq!(activated["version"], 1, "{activated}");
    assert_eq!(serving(&client, &sluice).await, "vm01");
    assert_eq!(rollback(&client, &sluice).await, 3, "back to before it");
    assert_eq!(serving(&client, &sluice).await, "vm03");

    let cli = |args: &[&str]| policy_cli(&sluice, "tok", args);
    let (ok, out) = cli(&["activate", "router", "2"]);
    assert!(ok, "{out}");
    assert_eq!(serving(&client, &sluice).await, "vm02");
    let (ok, out) = cli(&["activate", "router", "2"]);
    assert!(!ok && out.contains("already active"), "{out}");
    let (ok, out) = cli(&["list"]);
    assert!(ok && out.contains("\"how\": \"activate\""), "{out}");
    expect_error(
        post(&client, &sluice, "/admin/policies/router/activate/9").await,
        404,
        "version_not_found",
    )
    .await;
    expect_error(
        post(&client, &sluice, "/admin/policies/router/activate/two").await,
        400,
        "invalid_parameter",
    )
    .await;
    expect_error(
        post(&client, &sluice, "/admin/policies/nobody/activate/1").await,
        404,
        "policy_not_found",
    )
    .await;
    let listing = router_listing(&client, &sluice).await;
    assert_eq!(
        activations(&listing),
        steps(&[
            (1, "config"),
            (2, "deploy"),
            (3, "deploy"),
            (1, "activate"),
            (3, "rollback"),
            (2, "activate"),
        ]),
        "{listing}"
    );
    assert_eq!(listing["rollback_to"], 3, "{listing}");
}

/// vm01 serving `m` and the `tools` worker on `/tools/*` (the spin guest).
fn tools_config(vm01: &MockBackend) -> Config {
    Config::new()
        .backend(Backend::new("vm01", &vm01.url()).models(["m"]))
        .worker(Worker::guest("tools", "/tools/*", "spin-tools"))
}

async fn hello(client: &reqwest::Client, sluice: &Sluice) -> String {
    let response = client.get(sluice.url("/tools/hello")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// PUTs the p2 or spin tools component as the next worker version.
async fn deploy_tools(client: &reqwest::Client, sluice: &Sluice, guest: &str) -> u64 {
    let response = client
        .put(sluice.admin_url("/admin/workers/tools"))
        .body(std::fs::read(test_guest(guest)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let v: Value = response.json().await.unwrap();
    v["version"].as_u64().unwrap()
}

async fn worker_call(client: &reqwest::Client, sluice: &Sluice, path: &str) -> Value {
    let response = post(client, sluice, path).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Workers follow the same rule: spin (v1) → p2 (v2) → rollback (v1) →
/// p2 (v3) → rollback: v1, and a second rollback is refused (it used to
/// bring the rolled-away version back). Two deploys roll back two steps;
/// the history survives a restart; a version is activated by number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_rollback_undoes_the_last_deploy() {
    let vm01 = mock("vm01", &["m"]).await;
    let sluice = Sluice::start(&tools_config(&vm01).to_toml());
    let client = client();
    let (spin, p2) = ("hello from spin", "hello from p2");
    let rollback = "/admin/workers/tools/rollback";
    assert_eq!(hello(&client, &sluice).await, spin);
    assert_eq!(deploy_tools(&client, &sluice, "p2-tools").await, 2);
    assert_eq!(hello(&client, &sluice).await, p2);
    assert_eq!(worker_call(&client, &sluice, rollback).await["version"], 1);
    assert_eq!(hello(&client, &sluice).await, spin);
    assert_eq!(deploy_tools(&client, &sluice, "p2-tools").await, 3);
    assert_eq!(hello(&client, &sluice).await, p2);
    assert_eq!(worker_call(&client, &sluice, rollback).await["version"], 1);
    assert_eq!(hello(&client, &sluice).await, spin);
    expect_error(
        post(&client, &sluice, rollback).await,
        409,
        "nothing_to_roll_back",
    )
    .await;
    assert_eq!(hello(&client, &sluice).await, spin);

    // Two deploys, then a restart: two rollbacks walk back through them.
    assert_eq!(deploy_tools(&client, &sluice, "p2-tools").await, 4);
    assert_eq!(deploy_tools(&client, &sluice, "spin-tools").await, 5);
    let sluice = sluice.restart();
    assert_eq!(hello(&client, &sluice).await, spin);
    let listing = get_json(&client, &sluice.admin_url("/admin/workers")).await;
    assert_eq!(listing[0]["version"], 5, "{listing}");
    assert_eq!(listing[0]["rollback_to"], 4, "{listing}");
    assert_eq!(listing[0]["history"][0]["how"], "restart", "{listing}");
    assert_eq!(worker_call(&client, &sluice, rollback).await["version"], 4);
    assert_eq!(hello(&client, &sluice).await, p2);
    assert_eq!(worker_call(&client, &sluice, rollback).await["version"], 1);
    assert_eq!(hello(&client, &sluice).await, spin);

    // Activation by number, then a rollback back from it.
    let activated = worker_call(&client, &sluice, "/admin/workers/tools/activate/2").await;
    assert_eq!(activated["version"], 2, "{activated}");
    assert_eq!(hello(&client, &sluice).await, p2);
    expect_error(
        post(&client, &sluice, "/admin/workers/tools/activate/2").await,
        409,
        "conflict",
    )
    .await;
    expect_error(
        post(&client, &sluice, "/admin/workers/tools/activate/99").await,
        404,
        "version_not_found",
    )
    .await;
    assert_eq!(worker_call(&client, &sluice, rollback).await["version"], 1);
    assert_eq!(hello(&client, &sluice).await, spin);
    let listing = get_json(&client, &sluice.admin_url("/admin/workers")).await;
    let hows: Vec<(u64, String)> = listing[0]["history"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|a| {
            (
                a["version"].as_u64().unwrap(),
                a["how"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        hows,
        steps(&[
            (1, "config"),
            (2, "deploy"),
            (1, "rollback"),
            (3, "deploy"),
            (1, "rollback"),
            (4, "deploy"),
            (5, "deploy"),
            (5, "restart"),
            (4, "rollback"),
            (1, "rollback"),
            (2, "activate"),
            (1, "rollback"),
        ]),
        "{listing}"
    );
}

/// Waits until `sluice` answers `/tools/hello` with `answer` (a replica
/// follows the shared state directory within its sync interval).
async fn until_hello(client: &reqwest::Client, sluice: &Sluice, answer: &str) {
    let started = Instant::now();
    loop {
        let now = hello(client, sluice).await;
        if now == answer {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still {now:?}, not {answer:?}, 5 s after the change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Worker deploys reach every replica sharing the state directory: a
/// worker deployed on replica A answers on B; rolled back on B, A follows;
/// both list the same history and the next version number is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_deployed_on_one_replica_serves_on_every_replica() {
    let vm01 = mock("vm01", &["m"]).await;
    let state = TempDir::new();
    let config = tools_config(&vm01)
        .set("policy_store", "state_dir", state.0.display().to_string())
        .set("policy_store", "sync_interval", "100ms")
        .to_toml();
    let [a, b] = [Sluice::start(&config), Sluice::start(&config)];
    let client = client();
    let (spin, p2) = ("hello from spin", "hello from p2");
    let rollback = "/admin/workers/tools/rollback";
    assert_eq!(hello(&client, &a).await, spin);
    assert_eq!(hello(&client, &b).await, spin);

    assert_eq!(deploy_tools(&client, &a, "p2-tools").await, 2);
    assert_eq!(hello(&client, &a).await, p2);
    until_hello(&client, &b, p2).await;

    assert_eq!(worker_call(&client, &b, rollback).await["version"], 1);
    assert_eq!(hello(&client, &b).await, spin);
    until_hello(&client, &a, spin).await;

    // B deploys next: version 3 (it took in A's version 2), and A follows.
    assert_eq!(deploy_tools(&client, &b, "p2-tools").await, 3);
    until_hello(&client, &a, p2).await;
    let listings = [
        get_json(&client, &a.admin_url("/admin/workers")).await,
        get_json(&client, &b.admin_url("/admin/workers")).await,
    ];
    for listing in &listings {
        assert_eq!(listing[0]["version"], 3, "{listing}");
        assert_eq!(listing[0]["rollback_to"], 1, "{listing}");
    }
    let changes = |listing: &Value| -> Vec<(u64, String)> {
        listing[0]["history"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|a| {
                (
                    a["version"].as_u64().unwrap(),
                    a["how"].as_str().unwrap().to_string(),
                )
            })
            .filter(|(_, how)| how != "restart")
            .collect()
    };
    assert_eq!(changes(&listings[0]), changes(&listings[1]), "{listings:?}");
    assert_eq!(
        changes(&listings[0]),
        steps(&[(1, "config"), (2, "deploy"), (1, "rollback"), (3, "deploy")]),
        "{listings:?}"
    );
    assert_eq!(
        listings[0][0]["history"][0]["followed"], true,
        "{listings:?}"
    );
    assert_eq!(
        listings[1][0]["history"][0]["followed"], false,
        "{listings:?}"
    );
}
