//! Live config reload: an edit of the config file (checked on an interval)
//! or SIGHUP applies the fleet's sections — backends, health checks,
//! ejection, retries — without dropping a request in flight. A file that
//! does not load is refused with the key at fault, and the running config
//! stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::dataplane::server::Gateway;

/// Watches `path` and applies its changes to `gateway` until the process
/// ends. `running` is the config the gateway started with.
pub async fn watch(path: PathBuf, gateway: Arc<Gateway>, mut running: Config) {
    let interval = running.server.reload_interval;
    let mut last_text = std::fs::read_to_string(&path).ok();
    let mut hangup = hangup_signal();
    loop {
        let forced = tokio::select! {
            _ = hangup.recv() => true,
            () = pause(interval) => false,
        };
        let text = std::fs::read_to_string(&path).ok();
        if !forced && text == last_text {
            continue;
        }
        last_text = text;
        let why = if forced { "SIGHUP" } else { "file changed" };
        match Config::load(&path) {
            Ok(next) => {
                apply(&gateway, &running, next.clone(), why);
                running = keep_overrides(next, &running);
            }
            Err(e) => {
                tracing::error!(file = %path.display(), reason = why, "config reload refused, the running config stays: {e}");
            }
        }
    }
}

/// SIGHUP as a stream; one that never fires where it cannot be installed.
fn hangup_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut signal) => {
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "SIGHUP reload unavailable"),
    }
    rx
}

async fn pause(interval: Duration) {
    if interval.is_zero() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(interval).await;
}

/// The addresses given on the command line win over the file's, now as at
/// start.
fn keep_overrides(mut next: Config, running: &Config) -> Config {
    next.server.listen = running.server.listen;
    next.server.admin_listen = running.server.admin_listen;
    next
}

fn apply(gateway: &Gateway, running: &Config, next: Config, why: &str) {
    let next = keep_overrides(next, running);
    match gateway.fleet.reload(&next.backends, next.health_rules()) {
        Ok((summary, added)) => {
            for backend in added {
                gateway.checker.watch(backend);
            }
            gateway.upstream.set_retry(next.retry.clone());
            if let Err(e) = gateway.consumers.set_configured(&next.consumers) {
                tracing::error!(
                    reason = why,
                    "config reload: [[consumers]] refused, the running ones stay: {e}"
                );
            }
            tracing::info!(
                reason = why,
                added = ?summary.added,
                removed = ?summary.removed,
                kept = ?summary.kept,
                "config reloaded: fleet, health checks, ejection, retries and consumers applied"
            );
        }
        Err(e) => {
            tracing::error!(
                reason = why,
                "config reload refused, the running config stays: {e}"
            );
            return;
        }
    }
    let needs_restart = [
        ("server", differs(&running.server, &next.server)),
        (
            "policy_runtime",
            differs(&running.policy_runtime, &next.policy_runtime),
        ),
        (
            "policy_store",
            differs(&running.policy_store, &next.policy_store),
        ),
        ("usage", differs(&running.usage, &next.usage)),
        ("policies", differs(&running.policies, &next.policies)),
        ("auth", differs(&running.auth, &next.auth)),
        ("limits", differs(&running.limits, &next.limits)),
        ("workers", differs(&running.workers, &next.workers)),
    ];
    for (section, changed) in needs_restart {
        if changed {
            let hint = match section {
                "policies" => "deploy policies through the admin API (`sluice policy deploy`); the file's [[policies]] seed the chain at first start",
                "workers" => "a worker's module is replaced live with PUT /admin/workers/NAME; its route, hosts, env and bounds take effect at the next restart",
                _ => "takes effect at the next restart",
            };
            tracing::warn!(
                section,
                "config reload: this section changed but is not applied live: {hint}"
            );
        }
    }
}

fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}
