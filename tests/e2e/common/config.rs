//! A typed builder for the `sluice.toml` a test starts the gateway with, so
//! that a test says which backends, consumers and policies it wants and
//! the builder writes (and escapes) the TOML:
//!
//! ```ignore
//! let config = Config::new()
//!     .server("queue_timeout", "2s")
//!     .backend(Backend::new("vm01", &vm01.url()).models(["m"]).weight(3))
//!     .policy(Policy::builtin("sensitive-words").config(json!({"words": ["secret"]})))
//!     .policy(Policy::builtin("model-router"))
//!     .to_toml();
//! ```
//!
//! Values are written by the `toml` crate, so any string is quoted
//! correctly (keys are the config's own, bare, names). Sections appear in
//! a fixed order (raw text, tables, consumers, backends, policies,
//! workers); entries of one kind keep the order they were added in, which
//! is the policy chain's order.

use toml::Value;

/// Keys of one TOML table (or one entry of an array of tables), in the
/// order they were set.
#[derive(Clone, Default)]
struct Keys(Vec<(String, Value)>);

impl Keys {
    /// The first keys of an entry.
    fn of<const N: usize>(keys: [(&str, Value); N]) -> Keys {
        Keys(keys.map(|(k, v)| (k.to_string(), v)).into())
    }

    fn set(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) => *old = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn write(&self, out: &mut String) {
        for (key, value) in &self.0 {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
}

/// A whole `sluice.toml`.
#[derive(Clone, Default)]
pub struct Config {
    raw: Vec<String>,
    tables: Vec<(String, Keys)>,
    consumers: Vec<Consumer>,
    backends: Vec<Backend>,
    policies: Vec<Policy>,
    workers: Vec<Worker>,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// `key = value` in the table `[table]` (e.g. `"server"`,
    /// `"health_check"`); setting a key twice keeps the last value.
    pub fn set(mut self, table: &str, key: &str, value: impl Into<Value>) -> Config {
        let value = value.into();
        match self.tables.iter_mut().find(|(name, _)| name == table) {
            Some((_, keys)) => keys.set(key, value),
            None => {
                let mut keys = Keys::default();
                keys.set(key, value);
                self.tables.push((table.to_string(), keys));
            }
        }
        self
    }

    /// `key = value` in `[server]`.
    pub fn server(self, key: &str, value: impl Into<Value>) -> Config {
        self.set("server", key, value)
    }

    /// `[auth] required = true`.
    pub fn auth_required(self) -> Config {
        self.set("auth", "required", true)
    }

    /// No health probes and no ejection: a backend that fails on purpose
    /// stays in the fleet.
    pub fn steady(self) -> Config {
        self.set("health_check", "enabled", false)
            .set("ejection", "after_failures", 0)
    }

    pub fn consumer(mut self, consumer: Consumer) -> Config {
        self.consumers.push(consumer);
        self
    }

    pub fn backend(mut self, backend: Backend) -> Config {
        self.backends.push(backend);
        self
    }

    /// Backends `vm01` and `vm02` at these URLs, both serving `m` with
    /// `slots` concurrent requests each: the fleet of the queueing tests.
    pub fn two_backends(self, vm01: &str, vm02: &str, slots: u32) -> Config {
        let slotted = |name: &str, url: &str| {
            Backend::new(name, url)
                .models(["m"])
                .max_concurrent_requests(slots)
        };
        self.backend(slotted("vm01", vm01))
            .backend(slotted("vm02", vm02))
    }

    /// Adds a policy at the end of the chain.
    pub fn policy(mut self, policy: Policy) -> Config {
        self.policies.push(policy);
        self
    }

    pub fn worker(mut self, worker: Worker) -> Config {
        self.workers.push(worker);
        self
    }

    /// TOML written as is, before everything the builder writes: for a
    /// section the builder does not cover. It must not open a table the
    /// builder writes too.
    pub fn raw(mut self, toml: &str) -> Config {
        self.raw.push(toml.to_string());
        self
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for raw in &self.raw {
            out.push_str(raw);
            if !raw.ends_with('\n') {
                out.push('\n');
            }
        }
        for (name, keys) in &self.tables {
            out.push_str(&format!("[{name}]\n"));
            keys.write(&mut out);
        }
        for (array, entries) in [
            ("consumers", self.consumers.iter().map(|c| &c.0).collect()),
            ("backends", self.backends.iter().map(|b| &b.0).collect()),
            ("policies", self.policies.iter().map(|p| &p.0).collect()),
            (
                "workers",
                self.workers.iter().map(|w| &w.0).collect::<Vec<_>>(),
            ),
        ] {
            for keys in entries {
                out.push_str(&format!("[[{array}]]\n"));
                keys.write(&mut out);
            }
        }
        out
    }
}

/// One `[[backends]]` entry.
#[derive(Clone)]
pub struct Backend(Keys);

impl Backend {
    pub fn new(name: &str, url: &str) -> Backend {
        Backend(Keys::of([("name", name.into()), ("url", url.into())]))
    }

    pub fn models<S: Into<String>>(self, models: impl IntoIterator<Item = S>) -> Backend {
        self.set("models", strings(models))
    }

    pub fn max_concurrent_requests(self, n: u32) -> Backend {
        self.set("max_concurrent_requests", n)
    }

    pub fn weight(self, weight: u32) -> Backend {
        self.set("weight", weight)
    }

    /// Any other key of the entry.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Backend {
        self.0.set(key, value.into());
        self
    }

    /// This entry alone, as TOML.
    pub fn to_toml(&self) -> String {
        Config::new().backend(self.clone()).to_toml()
    }
}

/// One `[[consumers]]` entry.
#[derive(Clone)]
pub struct Consumer(Keys);

impl Consumer {
    /// A consumer whose one API key is `key` (its hash is what is written).
    pub fn new(name: &str, key: &str) -> Consumer {
        let hash = sluice::accounts::consumers::hash_key(key);
        Consumer(Keys::of([
            ("name", name.into()),
            ("key_hashes", vec![hash].into()),
        ]))
    }

    pub fn models<S: Into<String>>(self, models: impl IntoIterator<Item = S>) -> Consumer {
        self.set("models", strings(models))
    }

    /// Any other key of the entry (`disabled`, `requests_per_minute`, …).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Consumer {
        self.0.set(key, value.into());
        self
    }
}

/// One `[[policies]]` entry.
#[derive(Clone)]
pub struct Policy(Keys);

impl Policy {
    /// A policy named `name` loaded from `module` (a path or `builtin:…`).
    pub fn new(name: &str, module: &str) -> Policy {
        Policy(Keys::of([("name", name.into()), ("module", module.into())]))
    }

    /// A bundled policy under a short name: `model-router` is named
    /// `router`, `sensitive-words` `words`, any other its own name.
    pub fn builtin(module: &str) -> Policy {
        let name = match module {
            "model-router" => "router",
            "sensitive-words" => "words",
            other => other,
        };
        Policy::new(name, &format!("builtin:{module}"))
    }

    /// A test guest built from `tests/guests/` (see [`super::test_guest`]).
    pub fn guest(name: &str, guest: &str) -> Policy {
        Policy::new(name, &super::test_guest(guest))
    }

    /// The policy's `config`, given as JSON (written as an inline table).
    pub fn config(self, config: serde_json::Value) -> Policy {
        let value = Value::try_from(config).expect("a policy config TOML can hold");
        self.set("config", value)
    }

    /// `on_error` (`fail-open` or `fail-closed`).
    pub fn on_error(self, on_error: &str) -> Policy {
        self.set("on_error", on_error)
    }

    /// Any other key of the entry.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Policy {
        self.0.set(key, value.into());
        self
    }
}

/// One `[[workers]]` entry (an edge worker).
#[derive(Clone)]
pub struct Worker(Keys);

impl Worker {
    /// A worker named `name` serving `route`, built from the test guest
    /// `guest` (see [`super::test_guest`]).
    pub fn guest(name: &str, route: &str, guest: &str) -> Worker {
        Worker(Keys::of([
            ("name", name.into()),
            ("route", route.into()),
            ("module", super::test_guest(guest).into()),
        ]))
    }

    /// Any other key of the entry (`timeout`, `allowed_hosts`, …).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Worker {
        self.0.set(key, value.into());
        self
    }
}

fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
    Value::Array(items.into_iter().map(|s| Value::String(s.into())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the builder writes is TOML that reads back as what was set,
    /// whatever the strings hold, with raw text before the tables it opens.
    #[test]
    fn the_builder_writes_toml_that_reads_back() {
        let awkward = "a \"quoted\" \\ back\\slash\nnew line, tab\t and 敏感词";
        let text = Config::new()
            .raw("[policy_runtime]\ntimeout = \"1s\"")
            .server("queue_timeout", "2s")
            .steady()
            .consumer(Consumer::new("alice", "sk-alice").models(["m"]))
            .backend(
                Backend::new("vm01", awkward)
                    .models(["m", awkward])
                    .weight(3),
            )
            .policy(
                Policy::builtin("sensitive-words").config(serde_json::json!({"words": [awkward]})),
            )
            .policy(Policy::builtin("model-router"))
            .worker(Worker::guest("tools", "/tools/*", "spin-tools").set("timeout", "5s"))
            .to_toml();
        let read: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        assert_eq!(read["policy_runtime"]["timeout"].as_str(), Some("1s"));
        assert_eq!(read["server"]["queue_timeout"].as_str(), Some("2s"));
        assert_eq!(read["ejection"]["after_failures"].as_integer(), Some(0));
        let backend = &read["backends"][0];
        assert_eq!(backend["url"].as_str(), Some(awkward));
        assert_eq!(backend["models"][1].as_str(), Some(awkward));
        assert_eq!(backend["weight"].as_integer(), Some(3));
        let key_hash = sluice::accounts::consumers::hash_key("sk-alice");
        assert_eq!(
            read["consumers"][0]["key_hashes"][0].as_str(),
            Some(key_hash.as_str())
        );
        let policies = read["policies"].as_array().unwrap();
        assert_eq!(policies[0]["name"].as_str(), Some("words"));
        assert_eq!(policies[0]["config"]["words"][0].as_str(), Some(awkward));
        assert_eq!(policies[1]["module"].as_str(), Some("builtin:model-router"));
        assert_eq!(read["workers"][0]["route"].as_str(), Some("/tools/*"));
    }
}
