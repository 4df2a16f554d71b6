//! The `Uffd` memory backend with the probe guest and the page-fault handler of
//! tests/common/uffd_handler.rs: a restore through it reads back the patterns the guest wrote
//! before its snapshot, lazily, with the handler serving the faults (and a snapshot of that VM
//! holds them too, read through it); a wrong backend_path is refused with a 400 naming it and
//! the monitor stays; a handler that sends bytes or hangs up is named in the log; one that stops serving
//! stalls the guest while the API and SIGTERM still work (and a pause, or its refusal saying
//! why where the kernel keeps the vCPU from the kick, withdrawn whole: the guest runs on once
//! served); one that never reads a fault ends the
//! monitor after `fault_timeout_ms`, with a message; balloon-removed pages reach the handler
//! as UFFD_EVENT_REMOVE; a 2 MiB huge-page snapshot comes back in huge pages; a Diff needs its
//! handler to serve the rebased memory file.

mod common;
#[path = "common/uffd_handler.rs"]
mod uffd_handler;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::api::ApiMote;
use common::pattern::{AT_KIB, PAGES, STRIDE};
use common::{probe_kernel, require_kvm, send_signal};

const WAIT: Duration = Duration::from_secs(20);
const SEED: u64 = 7;

/// The pattern probe's snapshot, taken at its key wait by a monitor named `name`, which is
/// gone by the return: (its directory, the state file, the memory file).
fn snapshot(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mote = ApiMote::spawn(name, &[]);
    let (state, mem) = mote.pattern_probe_snapshot(SEED);
    (mote.dir.clone(), state, mem)
}

fn uffd_load(state: &Path, socket: &Path, timeout_ms: Option<u64>) -> String {
    let mut backend = serde_json::json!({"backend_type": "Uffd", "backend_path": socket});
    if let Some(ms) = timeout_ms {
        backend["fault_timeout_ms"] = ms.into();
    }
    serde_json::json!({"snapshot_path": state, "mem_backend": backend, "resume_vm": true})
        .to_string()
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

fn wait_until(what: &str, mut done: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {WAIT:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_guest_restored_through_uffd_reads_back_its_patterns_from_the_handler() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-source");
    let socket = dir.join("handler.sock");
    let (control, handler) = uffd_handler::spawn(&socket, &mem);
    let clone = ApiMote::spawn("uffd-clone", &[]);
    clone.ok("PUT", "/snapshot/load", &uffd_load(&state, &socket, None));
    assert!(clone
        .stderr()
        .contains("handed to the page-fault handler on"));
    // The handler saw Firecracker's message: one region of 64 MiB at offset 0, 4 KiB pages.
    let mappings = control.mappings.lock().unwrap().clone();
    assert_eq!(mappings.len(), 1, "{mappings:?}");
    assert_eq!((mappings[0].size, mappings[0].offset), (64 << 20, 0));
    assert_eq!(mappings[0].page_size, 4096);
    // Lazily: the restore and the spinning guest took a few pages, not the 64 MiB.
    std::thread::sleep(Duration::from_millis(50));
    let after_load = control.faults.load(Ordering::SeqCst);
    assert!(
        after_load > 0 && after_load < 2048,
        "{after_load} faults served"
    );
    // A snapshot of the restored VM before the guest reads its patterns holds them all the
    // same: the pages it never touched since the restore are read through the handler.
    let again = clone.dir.join("again");
    std::fs::create_dir_all(&again).unwrap();
    let (_, mem2) = common::api::pause_and_snapshot(&clone.socket, &again);
    let written = std::fs::read(&mem2).unwrap();
    let original = std::fs::read(&mem).unwrap();
    assert_eq!(written.len(), original.len());
    let page = |bytes: &[u8], kib: u64| bytes[(kib << 10) as usize..][..4096].to_vec();
    for index in 0..PAGES {
        let kib = AT_KIB + index * STRIDE * 4;
        assert_eq!(
            page(&written, kib),
            page(&original, kib),
            "page at {kib} KiB"
        );
    }
    clone.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);

    let before_key = control.faults.load(Ordering::SeqCst);
    clone.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    clone.wait_for_stdout("probe: hello", WAIT);
    let out = clone.stdout();
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    // The snapshot faulted in every page through the handler, the pattern pages included:
    // the guest's reads took none, and before it the restore and the snapshot took them all.
    let faults = control.faults.load(Ordering::SeqCst);
    assert!(
        before_key >= (64 << 20) / 4096 / 2,
        "{before_key} faults served"
    );
    assert_eq!(faults, before_key, "faults after the snapshot");
    drop(clone);
    assert!(handler.join().unwrap().is_ok());
}

/// `mote run --restore --mem-backend uffd --uffd-sock SOCKET`: the command line's way to a
/// page-fault handler, which serves the guest's pattern pages.
#[test]
fn mote_run_restores_through_a_page_fault_handler() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-run-source");
    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    let mote = ApiMote::spawn_run(
        "uffd-run",
        &[
            "--restore".as_ref(),
            state.as_os_str(),
            "--mem-backend".as_ref(),
            "uffd".as_ref(),
            "--uffd-sock".as_ref(),
            socket.as_os_str(),
        ],
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    assert!(
        control.faults.load(Ordering::SeqCst) >= PAGES,
        "{} faults served",
        control.faults.load(Ordering::SeqCst)
    );
}

#[test]
fn wrong_backend_paths_are_refused_by_name_and_the_monitor_stays() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-paths-source");
    let mote = ApiMote::spawn("uffd-paths", &[]);
    let regular = dir.join("regular-file");
    std::fs::write(&regular, b"not a socket").unwrap();
    let gone = dir.join("gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
    let missing = dir.join("missing.sock");
    for (path, reason) in [
        (&missing, "no such file"),
        (&regular, "is not a Unix socket (a regular file)"),
        (&gone, "nobody listens on this socket"),
    ] {
        let answer = mote.request("PUT", "/snapshot/load", &uffd_load(&state, path, None));
        assert_eq!(answer.status, 400, "{answer:?}");
        let fault = answer.fault();
        assert!(fault.contains(&path.display().to_string()), "{fault}");
        assert!(fault.contains(reason), "{fault}");
        assert_eq!(mote.request("GET", "/", "").status, 200);
    }
    // A File backend with the Uffd-only option is refused too, and the monitor still loads.
    let answer = mote.request(
        "PUT",
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem, "fault_timeout_ms": 5}})
        .to_string(),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.fault().contains("fault_timeout_ms"), "{answer:?}");
    let socket = dir.join("handler.sock");
    let (_control, _handler) = uffd_handler::spawn(&socket, &mem);
    mote.ok("PUT", "/snapshot/load", &uffd_load(&state, &socket, None));
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
}

#[test]
fn a_handler_that_sends_bytes_and_hangs_up_is_named_and_the_guest_carries_on() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-hangup-source");
    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    let mote = ApiMote::spawn("uffd-hangup", &[]);
    mote.ok("PUT", "/snapshot/load", &uffd_load(&state, &socket, None));
    // Bytes first, which the contract has no use for: dropped, with a warning.
    control.garbage.store(true, Ordering::SeqCst);
    let sent = format!(
        "the page-fault handler on {} sent 11 bytes",
        socket.display()
    );
    wait_until(
        "the bytes in the log",
        || mote.stderr().contains(&sent),
        || mote.stderr(),
    );
    control.hang_up.store(true, Ordering::SeqCst);
    let expected = format!(
        "the page-fault handler on {} closed its socket",
        socket.display()
    );
    wait_until(
        "the hang-up in the log",
        || mote.stderr().contains(&expected),
        || mote.stderr(),
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
}

#[test]
fn a_guest_stalled_on_an_unserved_fault_keeps_the_api_and_stops_on_sigterm() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-stall-source");
    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    let mote = ApiMote::spawn("uffd-stall", &[]);
    // No time-out: the stall lasts until the test ends it.
    mote.ok(
        "PUT",
        "/snapshot/load",
        &uffd_load(&state, &socket, Some(0)),
    );
    control.serving.store(false, Ordering::SeqCst);
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    // The guest leaves its wait and stalls on the first pattern page.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(peeks(&mote.stdout()), (0, 0), "{}", mote.stdout());
    assert_eq!(mote.request("GET", "/", "").status, 200);
    assert_eq!(mote.request("GET", "/vm/config", "").status, 200);
    // The vCPU waits on the fault inside KVM_RUN. Where KVM waits interruptibly (faulting in
    // a guest page, Linux 6.3 on) the kick reaches it and it pauses; where it waits in a user
    // access of its own (a PVM host's shadow page-table walk, when the unserved page holds the
    // guest's page tables) or killably (older kernels) it cannot, and the pause is refused,
    // saying why. Which page the guest stalls on first varies from run to run here: both
    // happen on this machine.
    let answer = mote.request("PATCH", "/vm", r#"{"state": "Paused"}"#);
    eprintln!("pausing a stalled vCPU: {answer:?}");
    if answer.status == 204 {
        mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    } else {
        assert_eq!(answer.status, 400, "{answer:?}");
        assert!(
            answer
                .fault()
                .contains("the page-fault handler (mem_backend Uffd) has not served"),
            "{answer:?}"
        );
    }
    assert_eq!(mote.request("GET", "/", "").status, 200);
    // A stop signal still ends the monitor, without waiting for ever for the vCPU.
    let stopped = Instant::now();
    send_signal(mote.pid(), libc::SIGTERM);
    let run = mote.wait(WAIT + Duration::from_secs(10));
    assert_eq!(
        run.status.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("stopped by SIGTERM"), "{}", run.stderr);
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopped.elapsed()
    );
}

#[test]
fn a_fault_nobody_reads_ends_the_monitor_after_its_time_out() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-timeout-source");
    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    // A handler that takes the userfaultfd and never reads it: the restore's own first
    // write to guest memory waits on it.
    control.serving.store(false, Ordering::SeqCst);
    let mote = ApiMote::spawn("uffd-timeout", &[]);
    let api = mote.socket.clone();
    let body = uffd_load(&state, &socket, Some(1000));
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ =
            std::panic::catch_unwind(|| common::api::request(&api, "PUT", "/snapshot/load", &body));
    });
    let run = mote.wait(WAIT + Duration::from_secs(10));
    let took = started.elapsed();
    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    let message = format!(
        "a guest memory fault waited unread for 1000 ms (mem_backend fault_timeout_ms) on the userfaultfd given to the page-fault handler on {}",
        socket.display()
    );
    assert!(run.stderr.contains(&message), "{}", run.stderr);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

const HUGE_PAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn huge_pages(name: &str) -> u64 {
    std::fs::read_to_string(format!("{HUGE_PAGES}/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Grows the host's pool of 2 MiB pages for a test and shrinks it back when dropped (tests
/// that touch the pool run one at a time: .config/nextest.toml's `huge-pages` group).
struct HugePagePool {
    before: u64,
}

impl HugePagePool {
    fn grow_by(pages: u64) -> Self {
        let before = huge_pages("nr_hugepages");
        std::fs::write(
            format!("{HUGE_PAGES}/nr_hugepages"),
            (before + pages).to_string(),
        )
        .unwrap();
        Self { before }
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(
            format!("{HUGE_PAGES}/nr_hugepages"),
            self.before.to_string(),
        );
    }
}

/// A snapshot of a guest in 2 MiB huge pages cannot come back as a private mapping of its
/// file nor through the Lazy pager (refused, naming Uffd), but through the handler it does: the handler is told the
/// page size, serves whole huge pages, and the guest reads its patterns.
#[test]
fn a_huge_pages_snapshot_restores_through_uffd_in_huge_pages() {
    if !require_kvm() || !Path::new(HUGE_PAGES).exists() {
        return;
    }
    let _pool = HugePagePool::grow_by(32);
    if huge_pages("free_hugepages") < 32 {
        println!("SKIPPED: the host gave its pool no 32 free huge pages");
        return;
    }
    let source = ApiMote::spawn("uffd-huge-source", &[]);
    let steps =
        format!("poke:{AT_KIB}:{PAGES}:{SEED}:{STRIDE},kbd:8,peek:{AT_KIB}:1:{SEED},hello,spin");
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    });
    source.ok("PUT", "/boot-source", &boot_source.to_string());
    source.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}"#,
    );
    source.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    source.wait_for_stdout("probe: kbd: waiting", WAIT);
    let (state, mem) = source.pause_and_snapshot();
    let dir = source.dir.clone();
    drop(source);

    // Not through a private mapping of the file, nor through mote's own pager, whose working
    // set is read into ordinary (transparent) huge pages, not the hugetlbfs pages the snapshot
    // was taken in: each refused, naming Uffd (a refused load ends the monitor, so one each).
    for (backend, name, names_uffd) in [
        ("File", "uffd-huge-file", "\"backend_type\": \"Uffd\""),
        ("Lazy", "uffd-huge-lazy", "through the Uffd memory backend"),
    ] {
        let refused = ApiMote::spawn(name, &[]);
        let answer = refused.request(
            "PUT",
            "/snapshot/load",
            &serde_json::json!({"snapshot_path": state,
                "mem_backend": {"backend_type": backend, "backend_path": mem}})
            .to_string(),
        );
        assert_eq!(answer.status, 400, "{backend}: {answer:?}");
        assert!(answer.fault().contains(names_uffd), "{backend}: {answer:?}");
    }

    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    let clone = ApiMote::spawn("uffd-huge-clone", &[]);
    clone.ok("PUT", "/snapshot/load", &uffd_load(&state, &socket, None));
    let mappings = control.mappings.lock().unwrap().clone();
    assert_eq!(mappings[0].page_size, 2 << 20, "{mappings:?}");
    clone.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = clone.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (1, 0), "{out}");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", clone.pid())).unwrap();
    let hugetlb_kib: u64 = smaps
        .lines()
        .filter_map(|line| line.strip_prefix("Private_Hugetlb:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let faults = control.faults.load(Ordering::SeqCst);
    // Each fault brought a whole 2 MiB page: what the guest holds is that many huge pages.
    assert!(
        faults > 0 && hugetlb_kib == faults * 2048,
        "{faults} faults, {hugetlb_kib} KiB"
    );
}

/// The balloon over a Uffd-restored guest: the pages it gives back reach the handler as
/// UFFD_EVENT_REMOVE (mote's madvise waits until the handler has read them), and when the
/// guest takes them back after deflating, the handler serves them zeroed, not from the file.
#[test]
fn balloon_removed_pages_reach_the_handler_and_come_back_zeroed() {
    if !require_kvm() {
        return;
    }
    let steps = "balloon-init:0,balloon-touch:64:128,balloon-follow:64:2,balloon-touch:64:128,\
                 hello,spin";
    let source = ApiMote::spawn("uffd-balloon-source", &[]);
    let (state, mem) = source.ballooned_probe_snapshot(steps);
    let dir = source.dir.clone();
    drop(source);

    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    let clone = ApiMote::spawn("uffd-balloon-clone", &[]);
    clone.ok("PUT", "/snapshot/load", &uffd_load(&state, &socket, None));
    clone.ok("PATCH", "/balloon", r#"{"amount_mib": 128}"#);
    // The guest's second wait, not only the end of its first round: a change made before it
    // settles the configuration for that wait is taken for the one it already saw, and the
    // guest then waits for ever (seen 1 run in 8).
    clone.wait_for_stdout("probe: balloon: waiting target=32768 actual=32768", WAIT);
    let removes = control.removes.load(Ordering::SeqCst);
    assert!(removes > 0, "no UFFD_EVENT_REMOVE reached the handler");
    assert_eq!(control.zero_faults.load(Ordering::SeqCst), 0);
    clone.ok("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    clone.wait_for_stdout("probe: hello", WAIT);
    // The second touch of the 128 MiB the balloon had: every page of it came back zeroed.
    let zeroed = control.zero_faults.load(Ordering::SeqCst);
    assert!(zeroed >= 128 * 256, "{zeroed} pages served zeroed");
}

/// A Diff snapshot restored through Uffd: a handler serving the Diff's memory file as it is
/// (only the pages written since the Full snapshot) is refused, naming the socket and `mote
/// snapshot rebase`, since the pages the Diff's state names are read through the handler; one
/// serving the Diff rebased onto its base restores the guest, which reads both patterns.
#[test]
fn a_diff_restored_through_uffd_needs_its_handler_to_serve_the_rebased_file() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("uffd-diff-source", &[]);
    let steps = format!(
        "poke:{AT_KIB}:4:1,kbd:8,poke:{}:4:2,kbd:8,peek:{AT_KIB}:4:1,peek:{}:4:2,hello,spin",
        AT_KIB + 4096,
        AT_KIB + 4096
    );
    let boot_source = serde_json::json!({
        "kernel_image_path": probe_kernel(),
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    });
    mote.ok("PUT", "/boot-source", &boot_source.to_string());
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#,
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let dir = mote.dir.clone();
    let (full_state, full_mem) = (dir.join("full.state"), dir.join("full.mem"));
    let (diff_state, diff_mem) = (dir.join("diff.state"), dir.join("diff.mem"));
    let snapshot = |kind: &str, state: &Path, mem: &Path| {
        mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
        let body = serde_json::json!({
            "snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem,
        });
        mote.ok("PUT", "/snapshot/create", &body.to_string());
    };
    mote.wait_for_stdout("probe: kbd: waiting", WAIT);
    snapshot("Full", &full_state, &full_mem);
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    wait_until(
        "the second wait",
        || mote.stdout().matches("probe: kbd: waiting").count() == 2,
        || mote.stdout(),
    );
    snapshot("Diff", &diff_state, &diff_mem);
    drop(mote);

    let socket = dir.join("diff-handler.sock");
    let (_control, _handler) = uffd_handler::spawn(&socket, &diff_mem);
    let refused = ApiMote::spawn("uffd-diff-raw", &[]);
    let answer = refused.request(
        "PUT",
        "/snapshot/load",
        &uffd_load(&diff_state, &socket, None),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    let fault = answer.fault();
    assert!(
        fault.contains(&format!("the guest memory from {}", socket.display()))
            && fault.contains("mote snapshot rebase"),
        "{fault}"
    );
    drop(refused);

    let rebase = common::mote(&[
        "snapshot",
        "rebase",
        "--base-file",
        full_mem.to_str().unwrap(),
        "--diff-file",
        diff_mem.to_str().unwrap(),
    ]);
    assert!(rebase.status.success(), "{rebase:?}");
    let socket = dir.join("rebased-handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &full_mem);
    let clone = ApiMote::spawn("uffd-diff-rebased", &[]);
    clone.ok(
        "PUT",
        "/snapshot/load",
        &uffd_load(&diff_state, &socket, None),
    );
    clone.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = clone.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (2, 0), "{out}");
    assert!(control.faults.load(Ordering::SeqCst) > 0);
}

/// A pause refused because a vCPU is held by a fault the handler does not serve is withdrawn
/// whole: once the page is served, the guest runs on (it answers the key and reads its
/// patterns) and GET / says Running, as it did all along; a later pause is a real one (a
/// snapshot, which needs every vCPU paused, can be taken).
#[test]
fn a_refused_pause_is_withdrawn_and_the_guest_runs_on_once_served() {
    if !require_kvm() {
        return;
    }
    let (dir, state, mem) = snapshot("uffd-refused-pause-source");
    let socket = dir.join("handler.sock");
    let (control, _handler) = uffd_handler::spawn(&socket, &mem);
    let mote = ApiMote::spawn("uffd-refused-pause", &[]);
    let body = serde_json::json!({"snapshot_path": state, "resume_vm": false,
        "mem_backend": {"backend_type": "Uffd", "backend_path": socket, "fault_timeout_ms": 0}});
    mote.ok("PUT", "/snapshot/load", &body.to_string());
    // Nothing served from here: the vCPU's first steps after the resume (on a PVM host,
    // KVM's walk of the guest's page tables, which no kick interrupts) wait on the handler.
    control.serving.store(false, Ordering::SeqCst);
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    std::thread::sleep(Duration::from_millis(100));
    let answer = mote.request("PATCH", "/vm", r#"{"state": "Paused"}"#);
    if answer.status == 204 {
        // The kernel let the kick reach the vCPU: nothing to withdraw on this host.
        eprintln!("the pause was taken (the vCPU waits interruptibly here): nothing withdrawn");
        return;
    }
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.fault().contains("the pause is withdrawn"),
        "{answer:?}"
    );
    let state_of = |mote: &ApiMote| mote.request("GET", "/", "").json()["state"].clone();
    assert_eq!(state_of(&mote), "Running");
    control.serving.store(true, Ordering::SeqCst);
    mote.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    assert_eq!(peeks(&out), (PAGES as usize, 0), "{out}");
    assert_eq!(state_of(&mote), "Running");
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(state_of(&mote), "Paused");
    let again = mote.dir.join("again");
    std::fs::create_dir_all(&again).unwrap();
    let body = serde_json::json!({"snapshot_type": "Full",
        "snapshot_path": again.join("state"), "mem_file_path": again.join("mem")});
    mote.ok("PUT", "/snapshot/create", &body.to_string());
    mote.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(state_of(&mote), "Running");
}
