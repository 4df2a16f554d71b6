//! Compiles the seccomp filters in `resources/seccomp/<target>.json` into BPF once, at build
//! time, so that start-up only reads a few kilobytes of ready instructions (compiling the JSON
//! costs more than the rest of mote's start-up: see `resources/seccomp/README.md`).

use std::collections::BTreeMap;
use std::path::PathBuf;

#[path = "src/seccomp/format.rs"]
#[allow(dead_code)] // build.rs only writes the format
mod format;

#[path = "src/seccomp/dispatch.rs"]
mod dispatch;

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let json = manifest_dir
        .join("resources/seccomp")
        .join(format!("{target}.json"));
    println!("cargo:rerun-if-changed={}", json.display());
    // The tests compare the built-in filters with the JSON they came from.
    println!("cargo:rustc-env=MOTE_SECCOMP_JSON={}", json.display());
    println!("cargo:rerun-if-changed=src/seccomp/format.rs");
    println!("cargo:rerun-if-changed=src/seccomp/dispatch.rs");

    let file = std::fs::File::open(&json).unwrap_or_else(|err| {
        panic!(
            "no seccomp filters for {target}: cannot open {}: {err} (write one: see \
             resources/seccomp/README.md)",
            json.display()
        )
    });
    let arch = seccompiler::TargetArch::try_from(arch.as_str())
        .unwrap_or_else(|err| panic!("seccompiler cannot target {arch}: {err}"));
    let compiled = seccompiler::compile_from_json(std::io::BufReader::new(file), arch)
        .unwrap_or_else(|err| panic!("cannot compile {}: {err}", json.display()));
    let filters: BTreeMap<String, _> = compiled
        .into_iter()
        .map(|(name, program)| (name, dispatch::with_search_dispatch(&program)))
        .collect();
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("seccomp_filters.bpf"), format::serialize(&filters))
        .expect("cannot write the compiled seccomp filters");
}
