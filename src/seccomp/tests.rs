use std::collections::BTreeMap;

use super::format::{deserialize, serialize, FilterMap, FormatError, MAGIC};
use super::*;

/// The JSON the built-in filters were compiled from, built into the tests so that they run where
/// the source tree is not (the aarch64 unit tests run on an emulated arm64 host).
const FILTER_JSON: &str = include_str!(env!("MOTE_SECCOMP_JSON"));

/// The arch this build's filters are for.
fn target_arch() -> seccompiler::TargetArch {
    seccompiler::TargetArch::try_from(std::env::consts::ARCH).unwrap()
}

/// The JSON compiled by seccompiler, as it is before `build.rs` puts the search in front.
pub(super) fn json_compiled() -> FilterMap {
    seccompiler::compile_from_json(FILTER_JSON.as_bytes(), target_arch())
        .unwrap()
        .into_iter()
        .collect()
}

/// The built-in filters by name.
fn built_in() -> FilterMap {
    BUILT_IN
        .iter()
        .map(|(name, program)| (name.to_string(), program.to_vec()))
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mote-seccomp-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn compiled_form_round_trips() {
    let mut filters = FilterMap::new();
    filters.insert(
        "a".into(),
        vec![
            sock_filter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 4,
            },
            sock_filter {
                code: 0x15,
                jt: 1,
                jf: 2,
                k: 0xc000_003e,
            },
        ],
    );
    filters.insert(
        "b".into(),
        vec![sock_filter {
            code: 6,
            jt: 0,
            jf: 0,
            k: 0x7fff_0000,
        }],
    );
    assert_eq!(deserialize(&serialize(&filters)).unwrap(), filters);
}

#[test]
fn corrupt_compiled_form_is_refused() {
    let mut filters = FilterMap::new();
    filters.insert(
        "vcpu".into(),
        vec![sock_filter {
            code: 6,
            jt: 0,
            jf: 0,
            k: 0,
        }],
    );
    let bytes = serialize(&filters);
    assert_eq!(deserialize(b"{}"), Err(FormatError::BadMagic));
    assert_eq!(
        deserialize(&bytes[..bytes.len() - 1]),
        Err(FormatError::Truncated)
    );
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(deserialize(&longer), Err(FormatError::TrailingBytes));
    // A count of instructions the file cannot hold.
    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&1u32.to_le_bytes());
    huge.extend_from_slice(&1u32.to_le_bytes());
    huge.push(b'x');
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(deserialize(&huge), Err(FormatError::Truncated));
}

#[test]
fn built_in_filters_have_every_kind() {
    let filters = SeccompFilters::load(&SeccompConfig::BuiltIn).unwrap();
    for filter in Filter::ALL {
        assert!(filters.get(filter).is_enabled(), "{}", filter.name());
    }
    assert!(!SeccompFilters::disabled().get(Filter::Vcpu).is_enabled());
}

#[test]
fn built_in_filters_are_the_json_compiled() {
    let compiled: FilterMap = json_compiled()
        .into_iter()
        .map(|(name, program)| (name, dispatch::with_search_dispatch(&program)))
        .collect();
    assert_eq!(built_in(), compiled);
}

/// The rules of one filter in the JSON file, each as (syscall, its conditions as JSON text).
fn rules(json: &serde_json::Value, name: &str) -> BTreeMap<String, Vec<String>> {
    let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rule in json[name]["filter"].as_array().unwrap() {
        let syscall = rule["syscall"].as_str().unwrap().to_string();
        let mut args = rule.get("args").cloned().unwrap_or_default();
        // Comments do not change what a rule allows.
        if let Some(conditions) = args.as_array_mut() {
            for condition in conditions {
                condition.as_object_mut().unwrap().remove("comment");
            }
        }
        rules.entry(syscall).or_default().push(args.to_string());
    }
    rules
}

/// Whether every call `inner` allows, `outer` allows too (rule by rule: an unconditional rule
/// covers any conditional one for the same call).
fn covers(
    outer: &BTreeMap<String, Vec<String>>,
    inner: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (syscall, conditions) in inner {
        let Some(allowed) = outer.get(syscall) else {
            missing.push(syscall.clone());
            continue;
        };
        if allowed.iter().any(|c| c == "null") {
            continue;
        }
        for condition in conditions {
            if !allowed.contains(condition) {
                missing.push(format!("{syscall} {condition}"));
            }
        }
    }
    missing
}

#[test]
fn build_filter_covers_what_runs_under_it() {
    // vCPU threads, a Uffd load's stall watch and a Lazy load's pager are spawned under `build` and `vmm` is
    // stacked on it: a call that `build` refuses would kill them although their own filter
    // allows it.
    let json: serde_json::Value = serde_json::from_str(FILTER_JSON).unwrap();
    let build = rules(&json, "build");
    for inner in ["vcpu", "vmm", "uffd_watch", "lazy_pager"] {
        let missing = covers(&build, &rules(&json, inner));
        assert!(
            missing.is_empty(),
            "`build` lacks what `{inner}` allows: {missing:?}"
        );
    }
    for filter in Filter::ALL {
        assert_eq!(
            json[filter.name()]["default_action"],
            "kill_process",
            "{}",
            filter.name()
        );
        // seccompiler ignores a rule without conditions when the same call also has rules
        // with conditions: the call would be refused where the file seems to allow it.
        for (syscall, conditions) in rules(&json, filter.name()) {
            let whole = conditions.iter().any(|c| c == "null");
            assert!(
                !whole || conditions.len() == 1,
                "`{}`: {syscall} is allowed both whole and with conditions",
                filter.name()
            );
        }
    }
}

/// One filter's rules as sets: (syscall, its conditions as JSON text), duplicates merged.
#[cfg(target_arch = "x86_64")]
type RuleSet = BTreeMap<String, std::collections::BTreeSet<String>>;

/// The flags musl's pthread_create passes to `clone` (glibc uses clone3, whose flags seccomp
/// cannot read).
#[cfg(target_arch = "x86_64")]
pub(super) const MUSL_THREAD_CLONE_FLAGS: libc::c_int = libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID
    | libc::CLONE_DETACHED;

/// The condition of musl's thread-starting `clone` rule, as [`rules`] writes it.
#[cfg(target_arch = "x86_64")]
fn musl_thread_clone_condition() -> String {
    serde_json::json!([{"index": 0, "type": "dword", "op": "eq", "val": MUSL_THREAD_CLONE_FLAGS}])
        .to_string()
}

/// The glibc filters in terms of musl's calls (resources/seccomp/README.md): what the musl
/// filters must be, so that a rule added to one file and forgotten in the other shows here.
#[cfg(target_arch = "x86_64")]
fn gnu_rules_for_musl(gnu: BTreeMap<String, Vec<String>>) -> RuleSet {
    let mut musl = RuleSet::new();
    for (syscall, conditions) in gnu {
        let (names, conditions): (&[&str], Vec<String>) = match syscall.as_str() {
            // glibc registers these in every new thread; musl does not.
            "rseq" | "set_robust_list" => continue,
            // glibc starts threads with clone3, whose flags are in a struct seccomp cannot
            // read; musl starts them with clone, allowed with the thread flags only.
            "clone3" => (&["clone"], vec![musl_thread_clone_condition()]),
            // openat(dirfd, path, flags) becomes open(path, flags).
            "openat" => (
                &["open"],
                conditions
                    .iter()
                    .map(|c| c.replace(r#""index":2"#, r#""index":1"#))
                    .collect(),
            ),
            // std's metadata calls: statx on glibc, stat (a path) or fstat (a file) on musl.
            "statx" => (&["stat", "fstat"], conditions),
            "newfstatat" => (&["stat", "lstat"], conditions),
            // tgkill(tgid, tid, sig) becomes tkill(tid, sig); SIGRTMIN is 34 for glibc, 35
            // for musl.
            "tgkill" => (
                &["tkill"],
                conditions
                    .iter()
                    .map(|c| {
                        c.replace(r#""index":2"#, r#""index":1"#)
                            .replace(r#""val":34"#, r#""val":35"#)
                    })
                    .collect(),
            ),
            _ => (&[syscall.as_str()][..], conditions),
        };
        for name in names {
            musl.entry(name.to_string())
                .or_default()
                .extend(conditions.iter().cloned());
        }
    }
    musl
}

#[cfg(target_arch = "x86_64")]
/// A crash is reported as itself, not as a filter violation: every filter lets the crash path
/// restore a signal's default action (abort() for SIGABRT; the handler Rust's runtime installs
/// for SIGSEGV and SIGBUS, which then returns so the fault repeats), and no other signal's.
#[test]
fn every_filter_lets_a_crash_be_reported_as_itself() {
    let json: serde_json::Value = serde_json::from_str(FILTER_JSON).unwrap();
    for filter in Filter::ALL {
        let name = filter.name();
        // The signal each rt_sigaction rule allows, None for a rule without conditions.
        let allowed: Vec<Option<u64>> = json[name]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["syscall"] == "rt_sigaction")
            .map(|rule| {
                let args = rule.get("args")?.as_array().unwrap();
                assert_eq!(args.len(), 1, "`{name}`: {rule}");
                assert_eq!(
                    (&args[0]["index"], &args[0]["op"]),
                    (&0.into(), &"eq".into())
                );
                args[0]["val"].as_u64()
            })
            .collect();
        for signal in [libc::SIGABRT, libc::SIGBUS, libc::SIGSEGV] {
            assert!(
                allowed.contains(&None) || allowed.contains(&Some(signal as u64)),
                "`{name}` kills a crash with SIGSYS before signal {signal} is reported"
            );
        }
        if filter != Filter::Build {
            assert_eq!(
                allowed.len(),
                3,
                "`{name}` allows more handlers: {allowed:?}"
            );
        }
    }
}

/// (x86_64 only: aarch64 ships the musl build alone.)
#[cfg(target_arch = "x86_64")]
#[test]
fn musl_and_glibc_filters_allow_the_same() {
    let read = |libc: &str| -> serde_json::Value {
        let path = format!(
            "{}/resources/seccomp/x86_64-unknown-linux-{libc}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (gnu, musl) = (read("gnu"), read("musl"));
    for filter in Filter::ALL {
        let name = filter.name();
        let musl_rules: RuleSet = rules(&musl, name)
            .into_iter()
            .map(|(syscall, conditions)| (syscall, conditions.into_iter().collect()))
            .collect();
        assert_eq!(
            gnu_rules_for_musl(rules(&gnu, name)),
            musl_rules,
            "`{name}` differs between the glibc and the musl filters beyond the calls the \
             C libraries make differently"
        );
        for action in ["default_action", "filter_action"] {
            assert_eq!(gnu[name][action], musl[name][action], "`{name}` {action}");
        }
    }
}

#[test]
fn custom_json_and_compiled_files_load() {
    let json = scratch("custom.json");
    let allow_all = r#"{"default_action": "allow", "filter_action": {"errno": 1},
                        "filter": [{"syscall": "kexec_load"}]}"#;
    std::fs::write(
        &json,
        format!(
            r#"{{"build": {allow_all}, "vmm": {allow_all}, "api": {allow_all}, "vcpu": {allow_all}, "uffd_watch": {allow_all}, "lazy_pager": {allow_all}}}"#
        ),
    )
    .unwrap();
    let filters = SeccompFilters::load(&SeccompConfig::Custom(json.clone())).unwrap();
    assert!(filters.get(Filter::Api).is_enabled());

    let compiled = scratch("custom.bpf");
    std::fs::write(&compiled, serialize(&built_in())).unwrap();
    assert!(SeccompFilters::load(&SeccompConfig::Custom(compiled)).is_ok());

    std::fs::write(&json, format!(r#"{{"build": {allow_all}}}"#)).unwrap();
    let err = SeccompFilters::load(&SeccompConfig::Custom(json.clone())).unwrap_err();
    assert!(err.to_string().contains("no `vmm` filter"), "{err}");

    std::fs::write(
        &json,
        r#"{"vcpu": {"default_action": "allow", "filter_action": "allow", "filter": []}}"#,
    )
    .unwrap();
    let err = SeccompFilters::load(&SeccompConfig::Custom(json.clone())).unwrap_err();
    assert!(
        err.to_string().starts_with("invalid seccomp filter file"),
        "{err}"
    );

    let err = SeccompFilters::load(&SeccompConfig::Custom(scratch("absent.json"))).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot open the seccomp filter file"),
        "{err}"
    );
}

/// Start-up cost of the filters (run by hand: `cargo test --release -p mote seccomp_cost --
/// --ignored --nocapture`): loading the built-in ones, compiling the JSON instead, installing.
#[test]
#[ignore]
fn seccomp_cost() {
    let runs = 200u32;
    let start = std::time::Instant::now();
    for _ in 0..runs {
        std::hint::black_box(SeccompFilters::load(&SeccompConfig::BuiltIn).unwrap());
    }
    let load = start.elapsed() / runs;
    let start = std::time::Instant::now();
    for _ in 0..runs {
        std::hint::black_box(
            seccompiler::compile_from_json(FILTER_JSON.as_bytes(), target_arch()).unwrap(),
        );
    }
    let compile = start.elapsed() / runs;
    let filters = SeccompFilters::load(&SeccompConfig::BuiltIn).unwrap();
    // `build` allows installing filters, so it can be stacked on itself.
    let vcpu = filters.get(Filter::Build);
    // Stacking the same filter again costs what the first install did; the median of ten.
    let install = std::thread::spawn(move || {
        let mut times: Vec<_> = (0..10)
            .map(|_| {
                let start = std::time::Instant::now();
                vcpu.apply().unwrap();
                start.elapsed()
            })
            .collect();
        times.sort();
        times[5]
    })
    .join()
    .unwrap();
    println!("load built-in: {load:?}; compile JSON: {compile:?}; install build: {install:?}");
    for filter in Filter::ALL {
        let thread_filter = filters.get(filter);
        let len = thread_filter.program.as_ref().map_or(0, |p| p.len());
        let took = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            thread_filter.apply().unwrap();
            start.elapsed()
        })
        .join()
        .unwrap();
        println!("install {}: {len} instructions, {took:?}", filter.name());
    }
}
