//! virtio-rng through the probe guest's polling driver: the device fills the guest's buffers
//! with bytes that look random, whether it comes from `--entropy`, `PUT /entropy` or the
//! config file's `entropy`, with a rate limiter or without (its timing is measured in
//! `tests/rate_limiter.rs`).

mod common;

use std::time::Duration;

use common::api::ApiMote;
use common::{probe_kernel, probe_run, require_kvm, run_mote};

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn entropy_flag_gives_the_guest_random_bytes() {
    if !require_kvm() {
        return;
    }
    // The entropy device comes after the drive: slot 1.
    let disk = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("entropy-disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let run = probe_run(
        "rng-read:1:4096,rng-read:1:7",
        &["--drive", disk.to_str().unwrap(), "--entropy"],
    );
    assert!(
        run.stdout
            .contains("probe: rng-read used=4096,4096 varied=true differ=true"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    // Without the device, slot 1 is empty.
    let run = probe_run("rng-read:1:64", &["--drive", disk.to_str().unwrap()]);
    assert!(
        run.stdout.contains("probe: rng-read error"),
        "{}",
        run.stdout
    );
}

#[test]
fn put_entropy_and_the_config_file_give_the_guest_random_bytes() {
    if !require_kvm() {
        return;
    }
    let mote = ApiMote::spawn("entropy", &[]);
    mote.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": probe_kernel(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=rng-read:0:64",
        })
        .to_string(),
    );
    mote.ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#,
    );
    assert_eq!(
        mote.request("GET", "/vm/config", "").json()["entropy"],
        serde_json::json!({"rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}})
    );
    mote.ok("PUT", "/entropy", "{}");
    let config = mote.request("GET", "/vm/config", "");
    assert_eq!(config.json()["entropy"], serde_json::json!({}));

    // The configuration as a file boots another monitor with the device, with no API.
    let file = mote.dir.join("config.json");
    std::fs::write(&file, &config.body).unwrap();
    let run = run_mote(
        &["--no-api", "--config-file", file.to_str().unwrap()],
        None,
        WAIT,
    );
    assert!(
        run.stdout
            .contains("probe: rng-read used=64,64 varied=true differ=true"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );

    // And a config file with a rate limiter boots with it (an ops limit that the two reads
    // fit in at once).
    let limited = mote.dir.join("limited.json");
    let mut json = config.json();
    json["entropy"] = serde_json::json!({"rate_limiter": {"ops": {"size": 10, "refill_time": 1}}});
    std::fs::write(&limited, json.to_string()).unwrap();
    let run = run_mote(
        &["--no-api", "--config-file", limited.to_str().unwrap()],
        None,
        WAIT,
    );
    assert!(
        run.stdout
            .contains("probe: rng-read used=64,64 varied=true differ=true"),
        "{}\n{}",
        run.stdout,
        run.stderr
    );

    // The API's own guest, which stays up after its reads: a guest that reset would end the
    // monitor, and the refusal below could meet a closed socket.
    mote.ok(
        "PUT",
        "/boot-source",
        &serde_json::json!({
            "kernel_image_path": probe_kernel(),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=rng-read:0:64,spin",
        })
        .to_string(),
    );
    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    mote.wait_for_stdout("probe: rng-read used=64,64 varied=true differ=true", WAIT);
    let fault = mote.request("PUT", "/entropy", "{}").fault();
    assert!(fault.contains("not supported after starting"), "{fault}");
}
