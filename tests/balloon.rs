//! virtio-balloon through the probe guest's polling driver: inflated pages leave the
//! monitor's resident set and deflated ones come back on touch, free page reports give memory
//! back too, a hostile driver changes nothing it should not, the API answers in Firecracker's
//! shapes and words, and a restored VM keeps its balloon.

mod common;

use std::path::Path;
use std::time::Duration;

use common::api::ApiMote;
use common::{probe_kernel, require_kvm};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// The resident set of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap();
    kib * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// A monitor configured with a 256 MiB probe guest running `steps` and a balloon.
fn configured(name: &str, steps: &str) -> ApiMote {
    let mote = ApiMote::spawn(name, &[]);
    mote.ok(
        "PUT",
        "/boot-source",
        &json!({
            "kernel_image_path": probe_kernel(),
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
        })
        .to_string(),
    );
    mote.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 256}"#,
    );
    mote.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1,
            "free_page_reporting": true}"#,
    );
    mote
}

/// Waits until the console shows `text` `count` times.
fn wait_for_count(mote: &ApiMote, text: &str, count: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while mote.stdout().matches(text).count() < count {
        assert!(std::time::Instant::now() < deadline, "{}", mote.stdout());
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stats(mote: &ApiMote) -> Value {
    let answer = mote.request("GET", "/balloon/statistics", "");
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()
}

#[test]
fn inflated_memory_leaves_the_monitor_and_comes_back_on_touch() {
    if !require_kvm() {
        return;
    }
    // Touch 128 MiB at 64 MiB, follow the host's target twice (inflate, then deflate), touch
    // again, follow once more, report 64 MiB free, then the hostile cases.
    let steps = "balloon-init:0,balloon-touch:64:128,balloon-follow:64:2,balloon-touch:64:128,\
                 balloon-follow:64:1,balloon-report:128:64,balloon-hostile:beyond,\
                 balloon-hostile:twice,balloon-hostile:huge,balloon-hostile:oob,hello,spin";
    let mote = configured("balloon-rss", steps);
    let metrics = mote.dir.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    mote.ok(
        "PUT",
        "/metrics",
        &json!({ "metrics_path": metrics }).to_string(),
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let out = mote.wait_for_stdout("probe: balloon: waiting target=0 actual=0", WAIT);
    assert!(
        out.contains("probe: balloon-init features=0x100000026 target=0"),
        "{out}"
    );
    let pid = mote.pid();
    let touched = rss(pid);
    let before = stats(&mote);
    assert_eq!(before["target_pages"], 0);
    assert_eq!(
        before["total_memory"].as_u64().unwrap() / MIB,
        255,
        "{before}"
    );

    mote.ok("PATCH", "/balloon", r#"{"amount_mib": 128}"#);
    mote.wait_for_stdout("probe: balloon-follow target=32768 actual=32768", WAIT);
    let inflated = rss(pid);
    eprintln!(
        "rss: touched {:.1} MiB, inflated {:.1} MiB",
        mib(touched),
        mib(inflated)
    );
    assert!(
        touched > inflated + 120 * MIB,
        "{:.1} MiB -> {:.1} MiB",
        mib(touched),
        mib(inflated)
    );
    let after = stats(&mote);
    assert_eq!(after["target_mib"], 128);
    assert_eq!(after["actual_pages"], 32768);
    assert_eq!(after["actual_mib"], 128);
    assert_eq!(
        mote.request("GET", "/balloon", "").json()["amount_mib"],
        128
    );
    assert_eq!(
        mote.request("GET", "/vm/config", "").json()["balloon"]["amount_mib"],
        128
    );

    // Deflated pages come back when the guest touches them.
    mote.wait_for_stdout("probe: balloon: waiting target=32768 actual=32768", WAIT);
    mote.ok("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    mote.wait_for_stdout("probe: balloon-follow target=0 actual=0", WAIT);
    wait_for_count(&mote, "probe: balloon-touch mib=128", 2);
    let retouched = rss(pid);
    assert!(
        retouched > inflated + 120 * MIB,
        "{:.1} MiB -> {:.1} MiB",
        mib(inflated),
        mib(retouched)
    );

    // A free page report gives memory back too; then the hostile cases.
    mote.ok("PATCH", "/balloon", r#"{"amount_mib": 1}"#);
    mote.wait_for_stdout("probe: balloon-report pages=16384", WAIT);
    let reported = rss(pid);
    assert!(
        retouched > reported + 60 * MIB,
        "{:.1} MiB -> {:.1} MiB",
        mib(retouched),
        mib(reported)
    );
    let out = mote.wait_for_stdout("probe: hello", WAIT);
    for case in ["beyond", "twice", "huge", "oob"] {
        assert!(
            out.contains(&format!(
                "probe: balloon-hostile {case} returned intact=yes"
            )),
            "{case}: {out}"
        );
    }
    // Nothing of that grew the monitor, and it still answers.
    assert!(rss(pid) < reported + 4 * MIB);
    assert_eq!(mote.request("GET", "/", "").status, 200);
    mote.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let balloon = lines
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["balloon"].clone())
        .fold(json!({}), |mut all, one| {
            for (name, value) in one.as_object().unwrap() {
                let sum = all[name].as_u64().unwrap_or(0) + value.as_u64().unwrap();
                all[name] = sum.into();
            }
            all
        });
    // beyond: four frame numbers past the end; huge and oob: refused descriptors.
    assert_eq!(balloon["inflate_invalid_pfns"], 4, "{balloon}");
    assert_eq!(balloon["event_fails"], 2, "{balloon}");
    assert_eq!(balloon["free_page_report_count"], 1, "{balloon}");
    assert_eq!(balloon["free_page_report_freed"], 64 * MIB, "{balloon}");
    assert!(
        balloon["stats_updates_count"].as_u64().unwrap() >= 1,
        "{balloon}"
    );
}

#[test]
fn the_api_answers_in_firecrackers_shapes_and_words() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("balloon-api", &[]);
    let fault = |method: &str, path: &str, body: &str| mote.request(method, path, body).fault();
    assert_eq!(fault("GET", "/balloon", ""), "No balloon device found.");
    assert_eq!(
        mote.request("GET", "/vm/config", "").json()["balloon"],
        Value::Null
    );
    let big = fault(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 129, "deflate_on_oom": false}"#,
    );
    assert!(
        big.starts_with("Amount of pages requested is too large"),
        "{big}"
    );
    mote.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 64, "deflate_on_oom": true}"#,
    );
    assert_eq!(
        mote.request("GET", "/balloon", "").json(),
        json!({"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 0,
               "free_page_hinting": false, "free_page_reporting": false})
    );
    // The machine may not shrink below the balloon.
    let small = fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    assert!(
        small.starts_with("The memory size (MiB) is smaller"),
        "{small}"
    );
    for (method, path, body) in [
        ("PATCH", "/balloon", r#"{"amount_mib": 1}"#),
        ("GET", "/balloon/statistics", ""),
        (
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 1}"#,
        ),
    ] {
        assert_eq!(
            fault(method, path, body),
            "The requested operation is not supported before starting the microVM."
        );
    }

    // After boot: the statistics were not enabled, and cannot be now.
    mote.ok(
        "PUT",
        "/boot-source",
        &json!({
            "kernel_image_path": probe_kernel(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=balloon-init:0,spin",
        })
        .to_string(),
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout(
        "probe: balloon-init features=0x100000004 target=16384",
        WAIT,
    );
    assert_eq!(
        fault("GET", "/balloon/statistics", ""),
        "Statistics for the balloon device are not enabled"
    );
    assert_eq!(
        fault(
            "PATCH",
            "/balloon/statistics",
            r#"{"stats_polling_interval_s": 1}"#
        ),
        "Cannot enable/disable the statistics after boot."
    );
    let big = fault("PATCH", "/balloon", r#"{"amount_mib": 129}"#);
    assert!(
        big.starts_with("Amount of pages requested is too large"),
        "{big}"
    );
    assert_eq!(
        fault(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true}"#
        ),
        "The requested operation is not supported after starting the microVM."
    );
    mote.ok("PATCH", "/balloon", r#"{"amount_mib": 2}"#);
    assert_eq!(mote.request("GET", "/balloon", "").json()["amount_mib"], 2);
}

#[test]
fn a_restored_vm_keeps_its_balloon_and_its_given_back_pages() {
    if !require_kvm() {
        return;
    }
    let steps = "balloon-init:0,balloon-touch:64:128,balloon-follow:64:2,hello,spin";
    let mote = configured("balloon-snapshot", steps);
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: balloon: waiting target=0 actual=0", WAIT);
    mote.ok("PATCH", "/balloon", r#"{"amount_mib": 128}"#);
    mote.wait_for_stdout("probe: balloon: waiting target=32768 actual=32768", WAIT);
    mote.ok(
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 2}"#,
    );
    let (state, mem) = mote.pause_and_snapshot();
    drop(mote);
    // The given-back pages are holes in the memory file.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&mem).unwrap()) * 512;
    assert!(allocated < 64 * MIB, "{:.1} MiB allocated", mib(allocated));

    let restored = ApiMote::spawn("balloon-restored", &[]);
    restored.ok(
        "PUT",
        "/snapshot/load",
        &json!({"snapshot_path": state, "mem_file_path": mem, "resume_vm": true}).to_string(),
    );
    let config = restored.request("GET", "/balloon", "").json();
    assert_eq!(config["amount_mib"], 128);
    assert_eq!(config["stats_polling_interval_s"], 2);
    let stats = stats(&restored);
    assert_eq!(stats["target_pages"], 32768);
    assert_eq!(stats["actual_pages"], 32768);
    // The restored driver hears of a new target and deflates.
    restored.ok("PATCH", "/balloon", r#"{"amount_mib": 0}"#);
    restored.wait_for_stdout("probe: hello", WAIT);
    let out = restored.stdout();
    assert!(
        out.contains("probe: balloon-follow target=0 actual=0"),
        "{out}"
    );
    let _ = Path::new(&state);
}

const HUGE_PAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn huge_pages(name: &str) -> u64 {
    std::fs::read_to_string(format!("{HUGE_PAGES}/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Free huge pages not promised to a mapping.
fn available_huge_pages() -> u64 {
    huge_pages("free_hugepages") - huge_pages("resv_hugepages")
}

/// Grows the host's pool of 2 MiB pages for a test, and shrinks it back when dropped (also
/// when the test fails).
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

/// Bytes of huge pages process `pid` has (smaps' Private_Hugetlb, summed).
fn private_hugetlb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("Private_Hugetlb:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// `huge_pages: "2M"`: a pool too small is refused at boot with a message; with enough, the
/// guest's memory comes from the host's pool of 2 MiB pages as the guest touches it, and a
/// balloon inflated over whole huge pages gives them back to the pool.
#[test]
fn huge_pages_come_from_the_hosts_pool_and_the_balloon_gives_whole_ones_back() {
    if !require_kvm() || !Path::new(HUGE_PAGES).exists() {
        return;
    }
    // An odd size cannot be made of 2 MiB pages.
    let mote = ApiMote::spawn("huge-odd", &[]);
    let answer = mote.request(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 255, "huge_pages": "2M"}"#,
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("multiple of 2"), "{answer:?}");
    drop(mote);

    // More than the pool has: refused at InstanceStart, naming the shortfall.
    let short = configured("huge-short", "hello");
    let too_many = available_huge_pages() + 1;
    short.ok(
        "PUT",
        "/machine-config",
        &json!({"vcpu_count": 1, "mem_size_mib": too_many * 2, "huge_pages": "2M"}).to_string(),
    );
    let answer = short.request("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer
            .body
            .contains(&format!("need {too_many} huge pages of 2 MiB")),
        "{answer:?}"
    );
    drop(short);

    let _pool = HugePagePool::grow_by(128);
    if available_huge_pages() < 128 {
        eprintln!("skipped: the host could not set 128 huge pages aside (fragmented memory)");
        return;
    }
    let steps = "balloon-init:0,balloon-touch:64:64,balloon-follow:64:1,hello,spin";
    let mote = configured("huge-pages", steps);
    mote.ok(
        "PATCH",
        "/machine-config",
        r#"{"mem_size_mib": 256, "huge_pages": "2M"}"#,
    );
    assert_eq!(
        mote.request("GET", "/machine-config", "").json()["huge_pages"],
        "2M"
    );
    let free_before = huge_pages("free_hugepages");
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: balloon: waiting target=0 actual=0", WAIT);
    let pid = mote.pid();
    let touched = private_hugetlb(pid);
    let taken = free_before - huge_pages("free_hugepages");
    eprintln!(
        "huge pages: {} MiB in mote, {taken} taken from the pool",
        touched / MIB
    );
    // The 64 MiB the guest touched (and the kernel's own pages) are huge pages.
    assert!(touched >= 64 * MIB, "{} MiB", touched / MIB);
    assert!(taken >= 32, "{taken}");

    mote.ok("PATCH", "/balloon", r#"{"amount_mib": 64}"#);
    mote.wait_for_stdout("probe: balloon-follow target=16384 actual=16384", WAIT);
    let inflated = private_hugetlb(pid);
    eprintln!("huge pages after inflating 64 MiB: {} MiB", inflated / MIB);
    assert!(
        touched >= inflated + 60 * MIB,
        "{} MiB -> {} MiB",
        touched / MIB,
        inflated / MIB
    );

    // Its snapshot is taken, but a File restore would put the guest in ordinary pages:
    // refused, as by Firecracker, naming the backend that could.
    let (state, mem) = mote.pause_and_snapshot();
    drop(mote);
    let load = ApiMote::spawn("huge-load", &[]);
    let answer = load.request(
        "PUT",
        "/snapshot/load",
        &json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}})
            .to_string(),
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("2 MiB huge pages"), "{answer:?}");
    assert!(answer.body.contains("Uffd"), "{answer:?}");
}
