//! The `Lazy` memory backend (mote's own pager) with the probe guest: a first lazy restore
//! serves the guest's faults from the memory file (the guest reads back the patterns it wrote
//! before its snapshot), records the pages it faulted into `STATE.ws`, and prefetches the
//! rest; a second restore brings that working set in before the vCPUs run (its dense 2 MiB
//! blocks read whole, its sparse pages copied one by one) and the guest's memory is the
//! snapshot's, byte for byte; a working-set file of another snapshot, cut short
//! or garbage is named in a warning and the restore falls back to serving on demand.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::pattern::{AT_KIB, PAGES, STRIDE};
use common::require_kvm;

const WAIT: Duration = Duration::from_secs(20);
/// The recording window the tests ask for: long enough for the guest to read its patterns
/// after the key, short enough to wait for.
const WINDOW_MS: u64 = 400;

/// The pattern probe's snapshot (from `seed`), taken at its key wait by a monitor named `name`.
fn snapshot(name: &str, seed: u64) -> (PathBuf, PathBuf) {
    ApiMote::spawn(name, &[]).pattern_probe_snapshot(seed)
}

fn ws_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_os_string();
    name.push(".ws");
    PathBuf::from(name)
}

/// A monitor with its metrics in `metrics.json` and its log at Info.
fn spawn(name: &str) -> (ApiMote, PathBuf) {
    let mote = ApiMote::spawn(name, &["--level", "Info"]);
    let metrics = mote.dir.join("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    mote.ok(
        "PUT",
        "/metrics",
        &serde_json::json!({ "metrics_path": metrics }).to_string(),
    );
    (mote, metrics)
}

fn lazy_load(state: &Path, mem: &Path, resume: bool) -> String {
    serde_json::json!({"snapshot_path": state, "resume_vm": resume,
        "mem_backend": {"backend_type": "Lazy", "backend_path": mem,
                        "working_set_ms": WINDOW_MS}})
    .to_string()
}

/// The `lazy_restore` counters summed over every metrics line so far (each line holds the
/// counts since the one before).
fn lazy_counters(mote: &ApiMote, metrics: &Path) -> serde_json::Map<String, serde_json::Value> {
    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(metrics).unwrap();
    let mut sum = serde_json::Map::new();
    for line in text.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        for (name, value) in line["lazy_restore"].as_object().unwrap() {
            let before = sum.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
            sum.insert(name.clone(), (before + value.as_u64().unwrap()).into());
        }
    }
    sum
}

fn counter(counters: &serde_json::Map<String, serde_json::Value>, name: &str) -> u64 {
    counters[name].as_u64().unwrap()
}

/// How many of the guest's peeks matched and how many did not.
fn peeks(out: &str) -> (usize, usize) {
    let lines = out.lines().filter(|l| l.starts_with("probe: peek "));
    lines.fold((0, 0), |(yes, no), line| {
        if line.contains("match=yes") {
            (yes + 1, no)
        } else {
            (yes, no + 1)
        }
    })
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool, mote: &ApiMote) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}\nstderr:\n{}",
            mote.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Restores lazily, lets the guest read its patterns back, and waits until the working set
/// is written and guest memory fully resident; returns the monitor and its counters.
fn restore_and_read_back(
    name: &str,
    state: &Path,
    mem: &Path,
) -> (ApiMote, serde_json::Map<String, serde_json::Value>) {
    let (mote, metrics) = spawn(name);
    mote.ok("PUT", "/snapshot/load", &lazy_load(state, mem, true));
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    wait_until(
        "guest memory fully resident",
        || mote.stderr().contains("guest memory fully resident"),
        &mote,
    );
    let counters = lazy_counters(&mote, &metrics);
    (mote, counters)
}

#[test]
fn a_lazy_restore_records_a_working_set_that_the_next_restore_loads_first() {
    if !require_kvm() {
        return;
    }
    let (state, mem) = snapshot("lazy-source", 7);
    let ws = ws_path(&state);
    assert!(!ws.exists());

    // First restore: everything on demand, then by prefetch; the working set is written.
    let (first, counters) = restore_and_read_back("lazy-first", &state, &mem);
    assert!(counter(&counters, "pages_on_demand") > 0, "{counters:?}");
    assert_eq!(
        counter(&counters, "pages_from_working_set"),
        0,
        "{counters:?}"
    );
    assert!(counter(&counters, "pages_prefetched") > 0, "{counters:?}");
    // Every page of the 64 MiB came in once, one way or the other.
    assert_eq!(
        counter(&counters, "pages_on_demand") + counter(&counters, "pages_prefetched"),
        (64 << 20) / 4096,
        "{counters:?}"
    );
    let recorded = std::fs::read(&ws).expect("the working-set file");
    // The header, the pages (4 bytes each), the CRC: the guest's pattern pages among them.
    let recorded_pages = (recorded.len() - 48 - 8) / 4;
    assert!(recorded_pages >= PAGES as usize, "{recorded_pages} pages");
    assert!(
        first.stderr().contains("working set of"),
        "{}",
        first.stderr()
    );
    drop(first);

    // Second restore: the working set first, before the vCPUs run; memory is the snapshot's.
    let (second, metrics) = spawn("lazy-second");
    second.ok("PUT", "/snapshot/load", &lazy_load(&state, &mem, false));
    let counters = lazy_counters(&second, &metrics);
    // At least the working set's pages: its dense 2 MiB blocks come in whole, their pages
    // outside it with them (the exact count depends on where the blocks fall in host memory).
    let mut unique = working_set_pages(&ws);
    unique.sort_unstable();
    unique.dedup();
    let from_working_set = counter(&counters, "pages_from_working_set");
    assert!(
        from_working_set >= unique.len() as u64,
        "{} pages in the working set: {counters:?}",
        unique.len()
    );
    assert_eq!(counter(&counters, "working_set_fallbacks"), 0);
    // A snapshot of the restored VM reads every page through the pager: byte for byte the
    // memory the first snapshot had, but for the 16 bytes of the VM generation ID, which
    // every restore writes anew.
    let again = second.dir.join("again");
    std::fs::create_dir_all(&again).unwrap();
    let body = serde_json::json!({"snapshot_type": "Full",
        "snapshot_path": again.join("state"), "mem_file_path": again.join("mem")});
    second.ok("PUT", "/snapshot/create", &body.to_string());
    let (written, original) = (
        std::fs::read(again.join("mem")).unwrap(),
        std::fs::read(&mem).unwrap(),
    );
    assert_eq!(written.len(), original.len());
    let differ: Vec<usize> = (0..written.len())
        .filter(|at| written[*at] != original[*at])
        .collect();
    assert!(
        differ.len() <= 16 && differ.iter().all(|at| at / 16 == differ[0] / 16),
        "the restored memory differs from the snapshot's at {} bytes from {:#x}",
        differ.len(),
        differ.first().copied().unwrap_or(0)
    );
    second.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    second.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = second.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    // Every page came in once: with the working set, on a fault or by the prefetch, which
    // passes over what the working set brought in.
    wait_until(
        "guest memory fully resident",
        || second.stderr().contains("guest memory fully resident"),
        &second,
    );
    let counters = lazy_counters(&second, &metrics);
    assert_eq!(
        counter(&counters, "pages_from_working_set")
            + counter(&counters, "pages_on_demand")
            + counter(&counters, "pages_prefetched"),
        (64 << 20) / 4096,
        "{counters:?}"
    );
    // The working set was not recorded again: it is the same file.
    assert_eq!(std::fs::read(&ws).unwrap(), recorded);
}

/// Writes a working-set file naming `pages`, with the header (magic to memory pages, 40
/// bytes) of a recorded one, which names the snapshot.
fn write_working_set(ws: &Path, header: &[u8], pages: &[u32]) {
    let mut bytes = header[..40].to_vec();
    bytes.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for page in pages {
        bytes.extend_from_slice(&page.to_le_bytes());
    }
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182).checksum(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(ws, bytes).unwrap();
}

/// A working set dense in a 2 MiB block (an eighth of its pages or more) brings the block in
/// whole; a sparse one only its own pages, however many blocks it touches. Either way the
/// guest reads back what it wrote and every page comes in once.
#[test]
fn dense_blocks_of_a_working_set_are_read_whole_and_sparse_ones_page_by_page() {
    if !require_kvm() {
        return;
    }
    let (state, mem) = snapshot("lazy-blocks", 5);
    // A recording first, for a header that names this snapshot.
    drop(restore_and_read_back("lazy-blocks-record", &state, &mem).0);
    let ws = ws_path(&state);
    let header = std::fs::read(&ws).unwrap();
    let first = AT_KIB / 4;
    // The 16 pattern pages alone, one every 64: at most 8 in any 2 MiB block, under 64.
    let sparse: Vec<u32> = (0..PAGES).map(|i| (first + i * STRIDE) as u32).collect();
    // One page in 4 over the 4 MiB they span (the pattern pages among them): at least one
    // block of host memory lies wholly within, with 128 of its 512 pages in the working set.
    let dense: Vec<u32> = (first..first + PAGES * STRIDE)
        .step_by(4)
        .map(|p| p as u32)
        .collect();
    for (case, pages) in [("sparse", &sparse), ("dense", &dense)] {
        write_working_set(&ws, &header, pages);
        let (mote, counters) = restore_and_read_back(&format!("lazy-blocks-{case}"), &state, &mem);
        let loaded = counter(&counters, "pages_from_working_set");
        assert_eq!(
            loaded + counter(&counters, "pages_on_demand") + counter(&counters, "pages_prefetched"),
            (64 << 20) / 4096,
            "{case}: {counters:?}"
        );
        let log = mote.stderr();
        let line = log
            .lines()
            .find(|l| l.contains("blocks read whole"))
            .unwrap_or_else(|| panic!("{case}: no working-set line:\n{log}"));
        if case == "sparse" {
            assert_eq!(loaded, PAGES, "{case}: {counters:?}");
            assert!(line.contains(": 0 blocks read whole"), "{line}");
        } else {
            assert!(
                loaded >= 512 && loaded > dense.len() as u64,
                "{case}: {counters:?}"
            );
            assert!(!line.contains(": 0 blocks read whole"), "{line}");
        }
        // The crafted working set is used, not recorded over.
        assert_eq!(working_set_pages(&ws).len(), pages.len(), "{case}");
    }
}

#[test]
fn a_working_set_of_another_snapshot_cut_short_or_garbage_falls_back_to_on_demand() {
    if !require_kvm() {
        return;
    }
    let (state_a, mem_a) = snapshot("lazy-fallback-a", 7);
    let (state_b, mem_b) = snapshot("lazy-fallback-b", 11);
    // A's working set, recorded by a restore of A.
    drop(restore_and_read_back("lazy-fallback-record", &state_a, &mem_a).0);
    let good_a = std::fs::read(ws_path(&state_a)).unwrap();
    let ws_b = ws_path(&state_b);
    for (case, bytes, reason) in [
        ("another", good_a.clone(), "belongs to another snapshot"),
        (
            "truncated",
            good_a[..good_a.len() - 6].to_vec(),
            "CRC-64 does not match",
        ),
        (
            "garbage",
            b"not a working set at all".to_vec(),
            "wrong magic",
        ),
    ] {
        std::fs::write(&ws_b, &bytes).unwrap();
        let (mote, counters) =
            restore_and_read_back(&format!("lazy-fallback-{case}"), &state_b, &mem_b);
        let log = mote.stderr();
        let warning = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains("is not used"))
            .unwrap_or_else(|| panic!("{case}: no warning:\n{log}"));
        assert!(warning.contains(&ws_b.display().to_string()), "{warning}");
        assert!(warning.contains(reason), "{case}: {warning}");
        assert_eq!(counter(&counters, "working_set_fallbacks"), 1, "{case}");
        assert_eq!(counter(&counters, "pages_from_working_set"), 0, "{case}");
        assert!(counter(&counters, "pages_on_demand") > 0, "{case}");
        // Replaced by a recording of B's own, which a restore of B then uses.
        let replaced = std::fs::read(&ws_b).unwrap();
        assert_ne!(replaced, bytes, "{case}");
    }
    let (mote, metrics) = spawn("lazy-fallback-after");
    mote.ok("PUT", "/snapshot/load", &lazy_load(&state_b, &mem_b, true));
    let counters = lazy_counters(&mote, &metrics);
    assert!(
        counter(&counters, "pages_from_working_set") > 0,
        "{counters:?}"
    );
    assert_eq!(counter(&counters, "working_set_fallbacks"), 0);
    // A's file is untouched by all this.
    assert_eq!(std::fs::read(ws_path(&state_a)).unwrap(), good_a);
}

#[test]
fn backend_options_of_another_backend_are_refused_and_the_monitor_stays() {
    if !require_kvm() {
        return;
    }
    let (state, mem) = snapshot("lazy-options-source", 7);
    let (mote, _) = spawn("lazy-options");
    let answer = mote.request(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem, "working_set_ms": 5}})
        .to_string(),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.fault().contains("working_set_ms"), "{answer:?}");
    mote.ok("PUT", "/snapshot/load", &lazy_load(&state, &mem, true));
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
}

/// The pager thread failing (here: the memory file cut short under it, so a fill reads past
/// its end) ends the monitor with status 1 and a message naming the thread and the reason,
/// where the guest would otherwise stall on that fault for ever.
#[test]
fn a_pager_that_cannot_fill_a_page_ends_the_monitor_naming_itself() {
    if !require_kvm() {
        return;
    }
    let (state, mem) = snapshot("lazy-fail-source", 7);
    let (mote, _) = spawn("lazy-fail");
    // A long window: the prefetch waits for its end, so the faults are the pager's alone.
    let body = serde_json::json!({"snapshot_path": state, "resume_vm": true,
        "mem_backend": {"backend_type": "Lazy", "backend_path": mem, "working_set_ms": 60000}});
    mote.ok("PUT", "/snapshot/load", &body.to_string());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(0)
        .unwrap();
    // The guest leaves its wait and reads its pattern pages, which no one filled yet (the
    // monitor may end before it answers: a page of the guest's wait can be the first).
    let api = mote.socket.clone();
    std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| {
            common::api::request(
                &api,
                "PUT",
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#,
            )
        });
    });
    // Read before the exit is waited for: the pipe's reader may still be behind then.
    wait_until(
        "the pager's failure told",
        || mote.stderr().contains("mote: the lazy pager's thread"),
        &mote,
    );
    let run = mote.wait(WAIT);
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("mote: the lazy pager's thread mote_pager failed: cannot fill guest memory"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("Bad address"), "{}", run.stderr);
    assert_eq!(peeks(&run.stdout), (0, 0), "{}", run.stdout);
}

/// The pages a working-set file names, in order.
fn working_set_pages(ws: &Path) -> Vec<u64> {
    let bytes = std::fs::read(ws).expect("the working-set file");
    bytes[48..bytes.len() - 8]
        .chunks_exact(4)
        .map(|p| u64::from(u32::from_le_bytes([p[0], p[1], p[2], p[3]])))
        .collect()
}

/// A load that leaves the VM paused records nothing of the wait: the window counts from the
/// resume, so the pages the guest reads after it (its patterns) are in the working set even
/// when the resume comes long after the window's length.
#[test]
fn the_working_set_window_counts_from_the_resume() {
    if !require_kvm() {
        return;
    }
    let (state, mem) = snapshot("lazy-window-source", 7);
    let (mote, _) = spawn("lazy-window");
    mote.ok("PUT", "/snapshot/load", &lazy_load(&state, &mem, false));
    std::thread::sleep(Duration::from_millis(3 * WINDOW_MS));
    assert!(
        !mote.stderr().contains("working set of"),
        "recorded while paused:\n{}",
        mote.stderr()
    );
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    wait_until(
        "the working set written",
        || mote.stderr().contains("working set of"),
        &mote,
    );
    let recorded = working_set_pages(&ws_path(&state));
    // The pattern pages' places in the memory file (one region from guest address 0).
    for page in 0..PAGES {
        let file_page = AT_KIB / 4 + page * STRIDE;
        assert!(
            recorded.contains(&file_page),
            "page {file_page} is not in the working set {recorded:?}"
        );
    }
}

/// The balloon over a Lazy-restored guest while the prefetch fills its memory: the pages it
/// gives back stay given back (resident memory drops by them and stays down once the prefetch
/// is done), they read zero when the guest takes them back, and its other memory is the
/// snapshot's.
#[test]
fn balloon_removed_pages_stay_removed_and_come_back_zeroed_under_the_prefetch() {
    if !require_kvm() {
        return;
    }
    // Patterns at 200 MiB, outside the balloon's [64, 192) MiB (and its sentinel at 40).
    const PATTERN_KIB: u64 = 200 << 10;
    let peeks: Vec<String> = (0..PAGES)
        .map(|page| format!("peek:{}:1:7", PATTERN_KIB + page * STRIDE * 4))
        .collect();
    let steps = format!(
        "poke:{PATTERN_KIB}:{PAGES}:7:{STRIDE},balloon-init:0,balloon-touch:64:128,\
         balloon-follow:64:2,zeros:{}:{},{},hello,spin",
        64 << 10,
        128 * 256,
        peeks.join(",")
    );
    let source = ApiMote::spawn("lazy-balloon-source", &[]);
    let (state, mem) = source.ballooned_probe_snapshot(&steps);
    drop(source);

    let (clone, _) = spawn("lazy-balloon-clone");
    // The inflation asked for before the guest runs, and a short working-set window: the
    // prefetch starts while the guest is inflating.
    let body = serde_json::json!({"snapshot_path": state, "resume_vm": false,
        "mem_backend": {"backend_type": "Lazy", "backend_path": mem, "working_set_ms": 5}});
    clone.ok("PUT", "/snapshot/load", &body.to_string());
    clone.ok("PATCH", "/balloon", r#"{"amount_mib": 128}"#);
    clone.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // The guest's second wait (a change made before it is lost: see tests/uffd.rs).
    clone.wait_for_stdout("probe: balloon: waiting target=32768 actual=32768", WAIT);
    wait_until(
        "guest memory fully resident",
        || clone.stderr().contains("guest memory fully resident"),
        &clone,
    );
    // The snapshot's 128 MiB the guest touched are the balloon's now: what is resident is
    // the rest of the guest's memory (its image, its patterns: a few MiB) and the monitor's.
    let status = std::fs::read_to_string(format!("/proc/{}/status", clone.pid())).unwrap();
    let rss_anon_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("RssAnon with the balloon inflated: {rss_anon_kib} KiB");
    assert!(rss_anon_kib < 16 << 10, "{rss_anon_kib} KiB resident");
    clone.ok("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    let out = clone.wait_for_stdout("probe: hello", WAIT);
    assert!(
        out.contains(&format!(
            "probe: zeros at={:#x} pages=32768 nonzero=0",
            64u64 << 20
        )),
        "{out}"
    );
    assert_eq!(self::peeks(&out), (PAGES as usize, 0), "{out}");
}

/// `mote run --restore --mem-backend lazy --mem-file MEM`: the command line's way to the
/// Lazy backend. The guest reads its patterns back through the pager, which records the
/// working set (only the Lazy backend writes one).
#[test]
fn mote_run_restores_through_the_lazy_pager() {
    if !require_kvm() {
        return;
    }
    let (state, mem) = snapshot("lazy-run-source", 7);
    let mote = ApiMote::spawn_run(
        "lazy-run",
        &[
            "--restore".as_ref(),
            state.as_os_str(),
            "--mem-backend".as_ref(),
            "lazy".as_ref(),
            "--mem-file".as_ref(),
            mem.as_os_str(),
        ],
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    wait_until(
        "the working set written",
        || mote.stderr().contains("working set of"),
        &mote,
    );
    let recorded = working_set_pages(&ws_path(&state));
    assert!(recorded.contains(&(AT_KIB / 4)), "{recorded:?}");
}
