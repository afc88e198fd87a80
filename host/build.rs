//! Builds the guests with a nested cargo in its own target directory (so it
//! never waits on the outer build's lock): the test guests and the bundled
//! policies for `wasm32-wasip2` (used by the end-to-end and browser tests),
//! and the bundled policies once more for `wasm32-unknown-unknown`, turned
//! into components here — those are embedded. Without std's WASI imports
//! (~20 functions its panic and stderr paths pull in) a fresh instance per
//! request is cheaper: the three-policy chain measured ~20% faster.

use std::path::{Path, PathBuf};
use std::process::Command;

const BUNDLED: &[&str] = &["model-router", "sensitive-words", "fallback"];
const TEST_GUESTS: &[&str] = &[
    "pin-backend",
    "misbehave",
    "legacy-router",
    "spin-tools",
    "p2-tools",
];

/// Lists the operator console's files (`console/`, plain HTML, CSS and
/// JavaScript with no build step) for `include_bytes!`, so the binary serves
/// them with nothing installed beside it.
fn embed_console(dir: &Path, out_dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut code = String::from("pub const ASSETS: &[(&str, &[u8])] = &[\n");
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        code.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            file.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out_dir.join("console_assets.rs"), code).expect("writing console_assets.rs");
}

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root = manifest_dir
        .parent()
        .expect("host/ sits in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for dir in ["wit", "guest", "policies", "tests/guests", "console"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    embed_console(&root.join("console"), &out_dir);
    let target_dir = root.join("target").join("guests");

    let all: Vec<&str> = BUNDLED.iter().chain(TEST_GUESTS).copied().collect();
    let wasip2 = nested_build(&root, &target_dir, "wasm32-wasip2", &all);
    let bare = nested_build(&root, &target_dir, "wasm32-unknown-unknown", BUNDLED);
    for package in BUNDLED {
        componentize(&bare, &out_dir, package);
    }
    let tests_out = out_dir.join("test-guests");
    std::fs::create_dir_all(&tests_out).expect("creating the test guest directory");
    for package in TEST_GUESTS {
        copy(&wasip2, &tests_out, package);
    }
    println!("cargo:rustc-env=SLUICE_TEST_GUESTS={}", tests_out.display());
}

/// Builds `packages` for `target` with the `guest` profile; returns where
/// the `.wasm` files are.
fn nested_build(root: &Path, target_dir: &Path, target: &str, packages: &[&str]) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .args(["build", "--profile", "guest", "--target", target])
        .arg("--target-dir")
        .arg(target_dir);
    for package in packages {
        command.args(["-p", package]);
    }
    // The outer build's settings are for the host target; keep them out.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let outer = key.starts_with("CARGO_")
            && key != "CARGO_HOME"
            && key != "CARGO_MAKEFLAGS"
            && !key.starts_with("CARGO_NET")
            && !key.starts_with("CARGO_REGISTR")
            && !key.starts_with("CARGO_HTTP");
        if outer || key == "RUSTFLAGS" || key == "RUSTC_WORKSPACE_WRAPPER" || key == "RUSTC_WRAPPER"
        {
            command.env_remove(key.as_ref());
        }
    }
    let status = command.status().expect("running cargo to build the guests");
    if !status.success() {
        panic!(
            "building the wasm guests for {target} failed (see above). If the target is \
             missing: `rustup target add {target}`"
        );
    }
    target_dir.join(target).join("guest")
}

/// Wraps a core module built by wit-bindgen (its component type is in a
/// custom section) into a component, as `wasm-tools component new` does.
fn componentize(from: &Path, to: &Path, package: &str) {
    let file = format!("{}.wasm", package.replace('-', "_"));
    let module = std::fs::read(from.join(&file)).unwrap_or_else(|e| panic!("reading {file}: {e}"));
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|encoder| encoder.validate(true).encode())
        .unwrap_or_else(|e| panic!("making {file} a component: {e:#}"));
    std::fs::write(to.join(&file), component).unwrap_or_else(|e| panic!("writing {file}: {e}"));
}

fn copy(from: &Path, to: &Path, package: &str) {
    let file = format!("{}.wasm", package.replace('-', "_"));
    std::fs::copy(from.join(&file), to.join(&file))
        .unwrap_or_else(|e| panic!("copying {file}: {e}"));
}
