//! The fuzz targets of `fuzz/fuzz_targets/` run without libFuzzer, as
//! tests of the root workspace: each target's body, unchanged, over the
//! target's seed corpus (`fuzz/corpus/TARGET/`), then over generated and
//! mutated inputs until a time budget is spent. No coverage guidance: this
//! is the smoke run CI can afford (it reuses the release build of the host
//! instead of compiling wasmtime a second time with instrumentation); the
//! coverage-guided run is `scripts/fuzz.sh` (cargo-fuzz).
//!
//! Each target file is included as a module. Its `use
//! libfuzzer_sys::fuzz_target;` finds this crate (`extern crate self as
//! libfuzzer_sys` below) and so [`fuzz_target!`] here, which turns the body
//! into two functions, `__smoke_init` and `__smoke_run(&[u8])`; typed inputs
//! are decoded from the bytes with `arbitrary` the way libfuzzer-sys does
//! (`arbitrary_take_rest`), so a corpus file means the same to both.
//!
//!   FUZZ_SMOKE_SECONDS   generated inputs per target, in seconds (default 15; 0: seeds only)
//!   FUZZ_SMOKE_SEED      the generator's seed (default: from the clock; printed)
//!   FUZZ_SMOKE_TIMEOUT   seconds one input may take (default 30, like fuzz.sh's -timeout)
//!   FUZZ_SMOKE_CPU       1: FUZZ_SMOKE_SECONDS counts the thread's CPU time, not wall time
//!
//! A panic (a failed assertion of the target included) saves the input as
//! `fuzz/artifacts/TARGET/crash-HASH` and fails the test; an input running
//! over the timeout is saved as `timeout-HASH` and ends the process. Either
//! replays under libFuzzer with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/FILE`.

extern crate self as libfuzzer_sys;
// The targets' `use arbitrary::Arbitrary;` (and the derive's expansion) land
// here too: arbitrary's items and its derive macro, re-exported below.
extern crate self as arbitrary;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use arbitrary_crate::*;
#[doc(hidden)]
pub use derive_arbitrary::Arbitrary;

/// What the derive's expansion calls, which arbitrary only has with its
/// "derive" feature: the same helper as arbitrary 1.5's `details`.
#[doc(hidden)]
pub mod details {
    use arbitrary_crate::{Error, Result, Unstructured};

    pub trait IsEmpty {
        fn is_empty(&self) -> bool;
    }

    impl IsEmpty for Unstructured<'_> {
        fn is_empty(&self) -> bool {
            Unstructured::is_empty(self)
        }
    }

    impl IsEmpty for &mut Unstructured<'_> {
        fn is_empty(&self) -> bool {
            Unstructured::is_empty(self)
        }
    }

    /// Calls `f`, refusing to recurse into a type again once the data is
    /// used up (or recursive types would never end).
    #[inline]
    pub fn with_recursive_count<U: IsEmpty, R>(
        u: U,
        recursive_count: &'static std::thread::LocalKey<std::cell::Cell<u32>>,
        f: impl FnOnce(U) -> Result<R>,
    ) -> Result<R> {
        let guard = u.is_empty();
        if guard {
            recursive_count.with(|count| {
                if count.get() > 0 {
                    return Err(Error::NotEnoughData);
                }
                count.set(count.get() + 1);
                Ok(())
            })?;
        }
        let result = f(u);
        if guard {
            recursive_count.with(|count| count.set(count.get() - 1));
        }
        result
    }
}

/// libfuzzer-sys's `fuzz_target!`, for a plain program: the forms the
/// targets use (raw bytes or an `Arbitrary` type, with or without `init:`).
#[macro_export]
macro_rules! fuzz_target {
    (init: $init:expr, |$data:ident: &[u8]| $body:expr) => {
        pub fn __smoke_init() {
            $init;
        }
        pub fn __smoke_run($data: &[u8]) {
            $body;
        }
    };
    (|$data:ident: &[u8]| $body:expr) => {
        $crate::fuzz_target!(init: (), |$data: &[u8]| $body);
    };
    (init: $init:expr, |$data:ident: $dty:ty| $body:expr) => {
        pub fn __smoke_init() {
            $init;
        }
        pub fn __smoke_run(bytes: &[u8]) {
            let u = $crate::Unstructured::new(bytes);
            let Ok($data) = <$dty as $crate::Arbitrary>::arbitrary_take_rest(u) else {
                return;
            };
            $body;
        }
    };
    (|$data:ident: $dty:ty| $body:expr) => {
        $crate::fuzz_target!(init: (), |$data: $dty| $body);
    };
}

#[allow(unused_attributes, unused_imports)]
// the targets' `#![no_main]`, and their `use libfuzzer_sys::fuzz_target` (the macro above is in scope already)
#[path = "../../fuzz_targets/config.rs"]
pub mod config;
#[allow(unused_attributes, unused_imports)]
#[path = "../../fuzz_targets/decision.rs"]
pub mod decision;
#[allow(unused_attributes, unused_imports)]
#[path = "../../fuzz_targets/engine_metrics.rs"]
pub mod engine_metrics;

#[path = "../../fuzz_targets/request_body.rs"]
pub mod request_body;
#[allow(unused_attributes, unused_imports)]
#[path = "../../fuzz_targets/sse_parser.rs"]
pub mod sse_parser;
#[allow(unused_attributes, unused_imports)]
#[path = "../../fuzz_targets/stream_filter.rs"]
pub mod stream_filter;

/// libFuzzer's `-max_len` in scripts/fuzz.sh.
const MAX_LEN: usize = 65536;

/// Tokens the mutator inserts: the syntax the targets parse.
const TOKENS: &[&[u8]] = &[
    b"data:",
    b"data: ",
    b"\n\n",
    b"\r\n",
    b"\r",
    b"\n",
    b": ping\n\n",
    b"[DONE]",
    b"event:",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud83d",
    b":",
    b",",
    b"null",
    b"true",
    b"false",
    b"0",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\"model\"",
    b"\"stream\"",
    b"\"stream_options\"",
    b"\"include_usage\"",
    b"\"messages\"",
    b"Bearer ",
    b"bEaReR ",
    b"\x1b[",
    b"\x07",
    b"=",
    b"[server]",
    b"[[backends]]",
    b"[[policies]]",
    b"ms",
    b"s",
    b"KiB",
    b"MiB",
    b"GiB",
    b"secret",
    "机密".as_bytes(),
    "é".as_bytes(),
    "😀".as_bytes(),
    b"\xff",
    b"\xc3",
    b"\xe6\x9c",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One random edit of `data`, libFuzzer-style.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next() as u8;
        }
        2 if len > 0 => {
            let i = rng.below(len);
            data[i] = [0u8, 0xff, 0x7f, 0x80, 0x01, 0xfe, b'0', b'9'][rng.below(8)];
        }
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let junk = rng.bytes(n);
            data.splice(at..at, junk);
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            data.drain(at..at + n);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(256));
            let piece = data[at..at + n].to_vec();
            let to = rng.below(len + 1);
            data.splice(to..to, piece);
        }
        6 if !corpus.is_empty() => {
            let other = &corpus[rng.below(corpus.len())];
            if !other.is_empty() {
                let at = rng.below(other.len());
                let n = 1 + rng.below(other.len() - at);
                let to = rng.below(len + 1);
                if rng.below(2) == 0 {
                    data.truncate(to);
                }
                let to = to.min(data.len());
                data.splice(to..to, other[at..at + n].iter().copied());
            }
        }
        7 | 8 => {
            let token = TOKENS[rng.below(TOKENS.len())];
            let at = rng.below(len + 1);
            data.splice(at..at, token.iter().copied());
        }
        9 if len > 0 => {
            data.truncate(rng.below(len));
        }
        10 if len > 0 => {
            let i = rng.below(len);
            let delta = 1 + rng.below(16) as u8;
            data[i] = if rng.below(2) == 0 {
                data[i].wrapping_add(delta)
            } else {
                data[i].wrapping_sub(delta)
            };
        }
        _ => data.push(rng.next() as u8),
    }
    data.truncate(MAX_LEN);
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes `data` to fuzz/artifacts/TARGET/KIND-HASH; returns the path.
fn save(target: &str, kind: &str, data: &[u8]) -> PathBuf {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    let dir = fuzz_dir().join("artifacts").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{kind}-{:016x}", h.finish()));
    let _ = std::fs::write(&path, data);
    path
}

/// The input each target is running and since when, for the watchdog.
fn running() -> &'static Mutex<HashMap<&'static str, (Instant, Vec<u8>)>> {
    static RUNNING: OnceLock<Mutex<HashMap<&'static str, (Instant, Vec<u8>)>>> = OnceLock::new();
    RUNNING.get_or_init(|| {
        let timeout = Duration::from_secs(env("FUZZ_SMOKE_TIMEOUT", 30));
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let map = running().lock().unwrap_or_else(|e| e.into_inner());
            for (target, (since, data)) in map.iter() {
                if since.elapsed() > timeout {
                    let path = save(target, "timeout", data);
                    let _ = writeln!(
                        std::io::stderr(),
                        "fuzz-smoke {target}: one input ran over {timeout:?}; saved as {}",
                        path.display()
                    );
                    std::process::exit(70);
                }
            }
        });
        Mutex::new(HashMap::new())
    })
}

/// Runs `run` over the seed corpus of `target`, then over generated inputs
/// for FUZZ_SMOKE_SECONDS. Panics (failing the test) on the first input
/// that panics, after saving it.
pub fn smoke(target: &'static str, init: fn(), run: fn(&[u8])) {
    let seconds: u64 = env("FUZZ_SMOKE_SECONDS", 15);
    let seed: u64 = env(
        "FUZZ_SMOKE_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the seed corpus {}: {e}", dir.display()))
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).expect("reading a corpus file"))
        .collect();
    assert!(!seeds.is_empty(), "no seed corpus in {}", dir.display());

    init();
    let exec = |data: &[u8], what: &dyn Fn() -> String| {
        running()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target, (Instant::now(), data.to_vec()));
        let outcome = catch_unwind(AssertUnwindSafe(|| run(data)));
        running()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(target);
        if outcome.is_err() {
            let path = save(target, "crash", data);
            panic!(
                "fuzz-smoke {target}: {} panicked (seed {seed}); input saved as {} — replay: \
                 RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a {target} {}",
                what(),
                path.display(),
                path.display()
            );
        }
    };

    for (file, data) in files.iter().zip(&seeds) {
        exec(data, &|| format!("seed {}", file.display()));
    }

    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let cpu_started = thread_cpu();
    let budget = Duration::from_secs(seconds);
    // FUZZ_SMOKE_CPU=1: the budget is this thread's CPU time, so a run on a
    // busy machine fuzzes as long as it says (and takes longer).
    let cpu_budget = env("FUZZ_SMOKE_CPU", 0u64) == 1;
    let mut spent = Duration::ZERO;
    let mut checked = started;
    // Mutants that ran are kept (a bounded pool) so edits compound.
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut generated = 0u64;
    while spent < budget {
        let mut data = match rng.below(16) {
            0 => {
                let max = if rng.below(4) == 0 { 4096 } else { 64 };
                let n = rng.below(max);
                rng.bytes(n)
            }
            1..=7 if !pool.is_empty() => pool[rng.below(pool.len())].clone(),
            _ => seeds[rng.below(seeds.len())].clone(),
        };
        for _ in 0..1 + rng.below(6) {
            mutate(&mut rng, &mut data, &seeds);
        }
        generated += 1;
        exec(&data, &|| format!("generated input #{generated}"));
        if pool.len() < 256 {
            pool.push(data);
        } else {
            let i = rng.below(pool.len());
            pool[i] = data;
        }
        if !cpu_budget {
            spent = started.elapsed();
        } else if checked.elapsed() >= Duration::from_millis(250) {
            checked = Instant::now();
            spent = thread_cpu().saturating_sub(cpu_started);
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "fuzz-smoke {target}: {} seeds + {generated} generated inputs in {:.1}s wall, {:.1}s CPU (seed {seed}), no crash",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        thread_cpu().saturating_sub(cpu_started).as_secs_f64()
    );
}

/// CPU time (user and system) of the calling thread so far, from
/// `/proc/thread-self/stat` (in clock ticks, 100 per second on Linux); zero
/// where that file is missing.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may
    // hold spaces: state is the first, utime the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config() {
        smoke("config", config::__smoke_init, config::__smoke_run);
    }

    #[test]
    fn decision() {
        smoke("decision", decision::__smoke_init, decision::__smoke_run);
    }

    #[test]
    fn engine_metrics() {
        smoke(
            "engine_metrics",
            engine_metrics::__smoke_init,
            engine_metrics::__smoke_run,
        );
    }

    #[test]
    fn request_body() {
        smoke(
            "request_body",
            request_body::__smoke_init,
            request_body::__smoke_run,
        );
    }

    #[test]
    fn sse_parser() {
        smoke(
            "sse_parser",
            sse_parser::__smoke_init,
            sse_parser::__smoke_run,
        );
    }

    #[test]
    fn stream_filter() {
        smoke(
            "stream_filter",
            stream_filter::__smoke_init,
            stream_filter::__smoke_run,
        );
    }
}
