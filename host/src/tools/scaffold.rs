//! `sluice policy new NAME`: a policy crate that builds and passes its own
//! test on the first try, so an author starts from something that works and
//! changes one function.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Where the SDK was when this binary was built; used when the author does
/// not say where it is (`--sdk`).
pub fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("guest")
}

/// Writes the crate `dir/NAME` and returns its path. Refuses a name that is
/// not a valid crate name and a directory that already exists.
pub fn create(name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        anyhow::bail!(
            "`{name}` is not a policy name: use lower-case letters, digits, `-` and `_`, starting with a letter"
        );
    }
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the guest SDK is not at {} (pass --sdk PATH)",
            sdk.display()
        )
    })?;
    if !sdk.join("Cargo.toml").is_file() {
        anyhow::bail!(
            "{} is not the guest SDK (no Cargo.toml); pass --sdk PATH",
            sdk.display()
        );
    }
    let root = dir.join(name);
    if root.exists() {
        anyhow::bail!("{} already exists", root.display());
    }
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("creating {}", root.display()))?;
    let crate_name = name.replace('-', "_");
    let files = [
        ("Cargo.toml", cargo_toml(name, &sdk)),
        ("src/lib.rs", lib_rs(name, &crate_name)),
        (".gitignore", "/target\n".to_string()),
    ];
    for (file, text) in files {
        let path = root.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(root)
}

fn cargo_toml(name: &str, sdk: &Path) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# A WebAssembly component for the host; the tests run natively.
crate-type = ["cdylib"]

[dependencies]
sluice-guest = {{ path = {sdk:?} }}
serde = {{ version = "1", features = ["derive"] }}

# Policies run once per request: small and fast.
[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true

# A crate of its own, even when created inside another workspace.
[workspace]
"#,
        sdk = sdk.display().to_string()
    )
}

fn lib_rs(name: &str, crate_name: &str) -> String {
    format!(
        r#"//! `{name}`: a Sluice routing policy.
//!
//! - test:   `cargo test`
//! - build:  `cargo build --target wasm32-wasip2 --release`
//! - deploy: `sluice policy deploy {name} target/wasm32-wasip2/release/{crate_name}.wasm`
//!
//! The host calls `init` once when it loads the policy, snapshots the
//! result, and calls `on_request` for every request in a fresh copy of that
//! snapshot. Other hooks (`on_response_text`, `on_failure`) have defaults
//! that do nothing; turn them on in `hooks`.

use serde::Deserialize;
use sluice_guest::{{export_policy, fleet, select, Backend, Decision, Policy, Request}};

/// The deploy-time configuration: the `config` table of the policy's entry
/// in `sluice.toml`, or the JSON given with `sluice policy deploy --config`.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {{
    /// Backends this policy never sends traffic to (e.g. being drained).
    avoid: Vec<String>,
}}

struct Router {{
    config: Config,
}}

impl Policy for Router {{
    fn init() -> Result<Self, String> {{
        // An error here refuses the deploy with this message.
        let config = sluice_guest::config()
            .map_err(|e| format!("{name}: invalid configuration: {{e}}"))?;
        Ok(Router {{ config }})
    }}

    fn on_request(&self, request: Request) -> Decision {{
        // Everything the host knows about the backends serving this model:
        // health, in-flight requests, limits, weights, latency.
        let backends = fleet::backends_for_model(&request.model);
        choose(&self.config, backends, request.id)
    }}
}}

/// The decision, apart from the host calls, so the tests below can run it
/// natively. `select::rank` orders healthy backends best first (by weight
/// and live load, reproducibly for one request id); the host tries them in
/// that order when one is full or unreachable.
fn choose(config: &Config, backends: Vec<Backend>, seed: u64) -> Decision {{
    let usable = backends
        .into_iter()
        .filter(|b| !config.avoid.contains(&b.name))
        .collect();
    let ranked = select::rank(usable, seed);
    if ranked.is_empty() {{
        return Decision::reject(503, "no_backend_available", "no usable backend serves this model");
    }}
    Decision::route(ranked.iter().map(|b| sluice_guest::Target::new(&b.name)).collect())
}}

export_policy!(Router);

#[cfg(test)]
mod tests {{
    use super::*;

    fn backend(name: &str, healthy: bool) -> Backend {{
        Backend {{
            name: name.into(),
            models: vec!["m".into()],
            healthy,
            in_flight: 0,
            max_concurrent: 0,
            weight: 1,
            latency_us: 0,
        }}
    }}

    fn targets(decision: Decision) -> Vec<String> {{
        match decision {{
            Decision::Route(targets) => targets.into_iter().map(|t| t.backend).collect(),
            other => panic!("expected a route, got {{other:?}}"),
        }}
    }}

    #[test]
    fn avoided_and_unhealthy_backends_get_nothing() {{
        let config = Config {{ avoid: vec!["vm01".into()] }};
        let fleet = vec![backend("vm01", true), backend("vm02", false), backend("vm03", true)];
        for seed in 0..100 {{
            assert_eq!(targets(choose(&config, fleet.clone(), seed)), ["vm03"]);
        }}
    }}

    #[test]
    fn nothing_usable_is_a_503() {{
        let config = Config {{ avoid: vec!["vm01".into()] }};
        match choose(&config, vec![backend("vm01", true)], 1) {{
            Decision::Reject(r) => assert_eq!(r.status, 503),
            other => panic!("expected a rejection, got {{other:?}}"),
        }}
    }}
}}
"#
    )
}
