//! Custom CPU templates (`PUT /cpu-config`, Firecracker's language): templates that cannot
//! apply are refused by name at InstanceStart, and static templates where they are given.
//! What a template does to the guest's CPUID and MSRs is tested in the emulated host
//! (`hosted_a_custom_cpu_template_shapes_cpuid_and_msrs`): a PVM guest at CPL 3 reads the
//! host's CPUID, TSC and TSC_AUX, not its own.
#![cfg(target_arch = "x86_64")]

mod common;

use common::api::ApiMote;
use common::{probe_kernel, require_kvm};
use serde_json::json;

#[test]
fn templates_that_cannot_apply_are_refused_by_name() {
    if !require_kvm() {
        return;
    }
    for (template, expected) in [
        (
            r#"{"reg_modifiers": [{"addr": "0x603000000013c020", "bitmap": "0b0"}]}"#,
            "reg_modifiers are for aarch64",
        ),
        (
            r#"{"cpuid_modifiers": [{"leaf": "0x4fffffff", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "eax", "bitmap": "0b0"}]}]}"#,
            "CPUID leaf 0x4fffffff subleaf 0x0 is not one KVM offers",
        ),
        (
            r#"{"kvm_capabilities": ["99999"]}"#,
            "lacks capability 99999",
        ),
    ] {
        let mote = ApiMote::spawn("cpu-refused", &[]);
        mote.ok(
            "PUT",
            "/boot-source",
            &json!({"kernel_image_path": probe_kernel(), "boot_args": "probe.run=hello"})
                .to_string(),
        );
        mote.ok("PUT", "/cpu-config", template);
        let answer = mote.request("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert_eq!(answer.status, 400, "{template}: {answer:?}");
        assert!(answer.body.contains(expected), "{template}: {answer:?}");
    }
    // A static template is refused where it is given.
    let mote = ApiMote::spawn("cpu-static", &[]);
    let answer = mote.request(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "C3"}"#,
    );
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.body.contains("cpu_template C3"), "{answer:?}");
}
