//! Diff snapshots with the probe guest: with `track_dirty_pages`, a Diff snapshot's memory file
//! holds the pages the guest and the monitor's devices wrote since the snapshot before and
//! nothing else, `mote snapshot rebase` lays it over that snapshot's memory file, and the
//! Diff's state file restores from the result with every page as the guest left it. Without
//! tracking a Diff is refused, and a Diff memory file loaded as it is, is refused by name.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::{mote, probe_kernel, require_kvm, run_mote};

const WAIT: Duration = Duration::from_secs(20);
const PAGE: u64 = 4096;
const MEM_MIB: u64 = 128;
/// Written before the Full snapshot only (4 pages, seed 1).
const BEFORE: u64 = 48 << 20;
/// Written between the two snapshots (3 pages, seed 2).
const BETWEEN: u64 = 64 << 20;
/// Two pages written before (seed 3), the first written again between them (seed 4).
const BOTH: u64 = 80 << 20;

/// The probe's pattern (tests/probe/src/pattern.rs).
fn word(seed: u64, addr: u64) -> u64 {
    (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr).wrapping_mul(0xff51_afd7_ed55_8ccd) | 1
}

/// The probe's steps: patterns, a Full snapshot at the first keyboard wait, more patterns and
/// two reads from the entropy device (whose buffers only the device writes), a Diff snapshot
/// at the second wait, then every pattern checked.
fn steps() -> String {
    let kib = |addr: u64| addr >> 10;
    [
        format!("poke:{}:4:1", kib(BEFORE)),
        format!("poke:{}:2:3", kib(BOTH)),
        "rng-where".to_string(),
        "kbd:8".to_string(),
        format!("poke:{}:3:2", kib(BETWEEN)),
        format!("poke:{}:1:4", kib(BOTH)),
        "rng-bench:0:4096:2".to_string(),
        "kbd:8".to_string(),
        format!("peek:{}:4:1", kib(BEFORE)),
        format!("peek:{}:3:2", kib(BETWEEN)),
        format!("peek:{}:1:4", kib(BOTH)),
        format!("peek:{}:1:3", kib(BOTH + PAGE)),
    ]
    .join(",")
}

fn boot(name: &str, steps: &str, track_dirty_pages: bool) -> ApiMote {
    let mote = ApiMote::spawn(name, &[]);
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    });
    mote.ok("PUT", "/boot-source", &boot_source.to_string());
    let machine = serde_json::json!({
        "vcpu_count": 1, "mem_size_mib": MEM_MIB, "track_dirty_pages": track_dirty_pages,
    });
    mote.ok("PUT", "/machine-config", &machine.to_string());
    mote.ok("PUT", "/entropy", "{}");
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote
}

fn create_body(kind: &str, state: &Path, mem: &Path) -> String {
    serde_json::json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem})
        .to_string()
}

/// Waits until `text` was printed `times` times.
fn wait_for_nth(mote: &ApiMote, text: &str, times: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = mote.stdout();
        if out.matches(text).count() >= times {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{text:?} not seen {times} times:\n{out}\nstderr:\n{}",
            mote.stderr()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `name=0x…` value on the console line starting with `prefix`.
fn hex_field(out: &str, prefix: &str, name: &str) -> u64 {
    let line = out
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{out}"));
    let value = line
        .split(' ')
        .find_map(|field| field.strip_prefix(&format!("{name}=0x")))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"));
    u64::from_str_radix(value, 16).unwrap()
}

/// The pages of the memory file at `path` that hold data (its holes left out), as guest
/// addresses: the guest has one memory region, at 0.
fn data_pages(path: &Path) -> BTreeSet<u64> {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let seek = |at: u64, whence| {
        // SAFETY: lseek only moves the offset of a descriptor `file` keeps open.
        let to = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, whence) };
        (to >= 0).then_some(to as u64)
    };
    let mut pages = BTreeSet::new();
    let mut at = 0;
    while let Some(start) = seek(at, libc::SEEK_DATA) {
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(len);
        pages.extend((start / PAGE..end.div_ceil(PAGE)).map(|page| page * PAGE));
        at = end;
    }
    pages
}

fn pages(at: u64, count: u64) -> impl Iterator<Item = u64> {
    (0..count).map(move |page| at + page * PAGE)
}

/// The file's page at `addr` holds the seed's pattern.
fn holds_pattern(path: &Path, addr: u64, seed: u64) -> bool {
    let mut page = vec![0u8; PAGE as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut page, addr)
        .unwrap();
    page.chunks_exact(8)
        .zip((addr..).step_by(8))
        .all(|(bytes, at)| u64::from_le_bytes(bytes.try_into().unwrap()) == word(seed, at))
}

/// `mote snapshot rebase --base-file BASE --diff-file DIFF`.
fn rebase(base: &Path, diff: &Path) -> common::Run {
    run_mote(
        &[
            "snapshot",
            "rebase",
            "--base-file",
            base.to_str().unwrap(),
            "--diff-file",
            diff.to_str().unwrap(),
        ],
        None,
        WAIT,
    )
}

#[test]
fn a_diff_snapshot_holds_what_changed_and_restores_once_rebased_onto_its_base() {
    if cfg!(not(target_arch = "x86_64")) || !require_kvm() {
        return;
    }
    let first = boot("diff", &steps(), true);
    let config = first.request("GET", "/vm/config", "").json();
    assert_eq!(
        config["machine-config"]["track_dirty_pages"], true,
        "{config}"
    );
    let dir = first.dir.clone();
    let (base_state, base_mem) = (dir.join("full.state"), dir.join("full.mem"));
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));

    let out = wait_for_nth(&first, "probe: kbd: waiting", 1);
    let rng_buffers = hex_field(&out, "probe: rng-where", "buffers");
    let rng_used = hex_field(&out, "probe: rng-where", "used") / PAGE * PAGE;
    first.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    first.ok(
        "PUT",
        "/snapshot/create",
        &create_body("Full", &base_state, &base_mem),
    );
    first.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    first.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = wait_for_nth(&first, "probe: kbd: waiting", 2);
    assert!(out.contains("probe: rng-bench done bytes=8192"), "{out}");
    first.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    first.ok(
        "PUT",
        "/snapshot/create",
        &create_body("Diff", &diff_state, &diff_mem),
    );
    drop(first);

    // The diff: the guest's writes since the Full snapshot, and the device's, which KVM's log
    // never sees (the guest only reads the entropy buffers); nothing written before.
    assert_eq!(
        std::fs::metadata(&diff_mem).unwrap().len(),
        MEM_MIB << 20,
        "a diff has the guest's size"
    );
    let data = data_pages(&diff_mem);
    for page in pages(BETWEEN, 3)
        .chain(pages(BOTH, 1))
        .chain(pages(rng_buffers, 1))
        .chain([rng_used])
    {
        assert!(
            data.contains(&page),
            "{page:#x} is not in the diff: {data:x?}"
        );
    }
    for page in pages(BEFORE, 4).chain(pages(BOTH + PAGE, 1)) {
        assert!(
            !data.contains(&page),
            "{page:#x} was written before the Full snapshot"
        );
    }
    // The rest is the probe's own bookkeeping (its stack, queue, serial state): a few pages.
    assert!(
        data.len() < 64,
        "{} pages in the diff: {data:x?}",
        data.len()
    );
    assert!(holds_pattern(&diff_mem, BETWEEN + PAGE, 2));
    assert!(holds_pattern(&diff_mem, BOTH, 4));

    let described = mote(&["snapshot", "describe", diff_state.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&described.stdout).into_owned();
    assert!(text.contains("\nmemory file: Diff"), "{text}");
    let described = mote(&["snapshot", "describe", base_state.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&described.stdout).contains("\nmemory file: Full\n"));

    // Loaded as it is, the diff is no guest's memory.
    let run = run_mote(
        &[
            "run",
            "--restore",
            diff_state.to_str().unwrap(),
            "--mem-file",
            diff_mem.to_str().unwrap(),
        ],
        None,
        WAIT,
    );
    assert!(!run.status.success(), "{}", run.stdout);
    assert!(
        run.stderr.contains("mote snapshot rebase"),
        "{}",
        run.stderr
    );

    let rebased = rebase(&base_mem, &diff_mem);
    assert!(rebased.status.success(), "{}", rebased.stderr);
    assert!(holds_pattern(&base_mem, BEFORE, 1));
    assert!(holds_pattern(&base_mem, BOTH, 4));
    assert!(holds_pattern(&base_mem, BOTH + PAGE, 3));

    // The Diff's state on the rebased memory, with tracking: a Diff taken at once holds what
    // the restore itself wrote (the VM generation ID, a device's write), and the guest
    // carries on to find every page as it left it.
    let vmgenid = text
        .lines()
        .find_map(|line| line.strip_prefix("vm generation id: at 0x"))
        .and_then(|rest| rest.split(',').next())
        .map(|hex| u64::from_str_radix(hex, 16).unwrap() / PAGE * PAGE)
        .unwrap_or_else(|| panic!("no VM generation ID in:\n{text}"));
    let clone = ApiMote::spawn("diff-restored", &[]);
    let load = serde_json::json!({
        "snapshot_path": diff_state,
        "mem_backend": {"backend_type": "File", "backend_path": base_mem},
        "track_dirty_pages": true,
    });
    clone.ok("PUT", "/snapshot/load", &load.to_string());
    let config = clone.request("GET", "/vm/config", "").json();
    assert_eq!(
        config["machine-config"]["track_dirty_pages"], true,
        "{config}"
    );
    let (again_state, again_mem) = (clone.dir.join("again.state"), clone.dir.join("again.mem"));
    clone.ok(
        "PUT",
        "/snapshot/create",
        &create_body("Diff", &again_state, &again_mem),
    );
    let data = data_pages(&again_mem);
    assert!(data.contains(&vmgenid), "{vmgenid:#x} not in {data:x?}");
    assert!(data.len() <= 4, "a guest that never ran wrote {data:x?}");
    clone.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    clone.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let run = clone.wait(WAIT * 2);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(
        run.stdout.matches(" match=yes").count(),
        4,
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("probe: done"), "{}", run.stdout);

    // A chain: the second Diff laid over the first rebase restores as well, and carries the
    // generation ID the restore wrote.
    let rebased = rebase(&base_mem, &again_mem);
    assert!(rebased.status.success(), "{}", rebased.stderr);
    let page_of = |path: &Path| {
        let mut page = vec![0u8; PAGE as usize];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut page, vmgenid)
            .unwrap();
        page
    };
    assert_eq!(page_of(&base_mem), page_of(&again_mem));
    let third = ApiMote::spawn("diff-chain", &[]);
    let load = serde_json::json!({
        "snapshot_path": again_state,
        "mem_backend": {"backend_type": "File", "backend_path": base_mem},
        "resume_vm": true,
    });
    third.ok("PUT", "/snapshot/load", &load.to_string());
    third.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let run = third.wait(WAIT * 2);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(
        run.stdout.matches(" match=yes").count(),
        4,
        "{}",
        run.stdout
    );
}

#[test]
fn a_diff_snapshot_without_dirty_page_tracking_is_refused_and_harms_nothing() {
    if cfg!(not(target_arch = "x86_64")) || !require_kvm() {
        return;
    }
    let mote = boot("diff-untracked", "kbd:8", false);
    mote.wait_for_stdout("probe: kbd: waiting", WAIT);
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = (mote.dir.join("state"), mote.dir.join("mem"));
    let answer = mote.request(
        "PUT",
        "/snapshot/create",
        &create_body("Diff", &state, &mem),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.fault().contains("track_dirty_pages"), "{answer:?}");
    assert!(!state.exists() && !mem.exists());
    let config = mote.request("GET", "/vm/config", "").json();
    assert_eq!(
        config["machine-config"]["track_dirty_pages"], false,
        "{config}"
    );
    mote.ok(
        "PUT",
        "/snapshot/create",
        &create_body("Full", &state, &mem),
    );
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let run = mote.wait(WAIT * 2);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stdout.contains("probe: kbd: 14 11 e0 71"),
        "{}",
        run.stdout
    );
}

#[test]
fn rebase_refuses_memory_files_of_other_sizes_and_leaves_the_base_alone() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rebase-sizes");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (base, diff) = (dir.join("base.mem"), dir.join("diff.mem"));
    std::fs::write(&base, vec![0xa5; 3 * PAGE as usize]).unwrap();
    let file = File::create(&diff).unwrap();
    file.write_all_at(&[0x5a; PAGE as usize], 0).unwrap();
    file.set_len(4 * PAGE).unwrap();
    let run = mote(&[
        "snapshot",
        "rebase",
        "--base",
        base.to_str().unwrap(),
        "--diff",
        diff.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("has 16384 bytes") && stderr.contains("has 12288"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&base).unwrap(), vec![0xa5; 3 * PAGE as usize]);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2, "no leftovers");
}
