//! The bundled policies, compiled from `policies/` by the build script and
//! embedded so `module = "builtin:NAME"` works with no files around.

const BUILTINS: &[(&str, &[u8])] = &[
    (
        "model-router",
        include_bytes!(concat!(env!("OUT_DIR"), "/model_router.wasm")),
    ),
    (
        "sensitive-words",
        include_bytes!(concat!(env!("OUT_DIR"), "/sensitive_words.wasm")),
    ),
    (
        "fallback",
        include_bytes!(concat!(env!("OUT_DIR"), "/fallback.wasm")),
    ),
];

/// The component bytes of a bundled policy.
pub fn find(name: &str) -> Option<&'static [u8]> {
    BUILTINS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| *bytes)
}

/// The names of every bundled policy.
pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}
