use super::*;

#[test]
fn vcpu_count_must_be_1_to_32() {
    let mut config = MachineConfig::default();
    for bad in [0, 33, 1000] {
        config.vcpu_count = bad;
        assert_eq!(config.validate(), Err(ConfigError::VcpuCount(bad)));
    }
    config.vcpu_count = 32;
    assert_eq!(config.vcpus(), Ok(32));
}

fn drive(id: &str, root: bool) -> DriveConfig {
    DriveConfig {
        drive_id: id.into(),
        path_on_host: "/d".into(),
        is_root_device: root,
        is_read_only: false,
        partuuid: None,
        cache_type: CacheType::Unsafe,
        io_engine: IoEngine::Sync,
        rate_limiter: None,
    }
}

#[test]
fn drive_ids_are_checked() {
    assert!(validate_drives(&[drive("rootfs", true), drive("data_1", false)]).is_ok());
    assert_eq!(
        validate_drives(&[drive("a b", false)]),
        Err(ConfigError::DriveId("a b".into()))
    );
    assert_eq!(
        validate_drives(&[drive(&"x".repeat(21), false)]),
        Err(ConfigError::DriveId("x".repeat(21)))
    );
    assert_eq!(
        validate_drives(&[drive("a", false), drive("a", false)]),
        Err(ConfigError::DuplicateDriveId("a".into()))
    );
    assert_eq!(
        validate_drives(&[drive("a", true), drive("b", true)]),
        Err(ConfigError::TwoRootDevices)
    );
}

#[test]
fn zero_memory_is_refused() {
    let config = MachineConfig {
        mem_size_mib: 0,
        ..Default::default()
    };
    assert_eq!(config.validate(), Err(ConfigError::MemSizeZero));
}

#[test]
fn a_root_drive_goes_first_and_a_drive_id_is_replaced() {
    let mut resources = VmResources::default();
    resources.insert_drive(drive("data", false)).unwrap();
    resources.insert_drive(drive("root", true)).unwrap();
    let ids: Vec<_> = resources
        .drives
        .iter()
        .map(|d| d.drive_id.as_str())
        .collect();
    assert_eq!(ids, ["root", "data"]);
    let mut moved = drive("data", false);
    moved.path_on_host = "/e".into();
    resources.insert_drive(moved).unwrap();
    assert_eq!(resources.drives[1].path_on_host, PathBuf::from("/e"));
    assert_eq!(
        resources.insert_drive(drive("other", true)),
        Err(ConfigError::TwoRootDevices)
    );
    assert_eq!(resources.drives.len(), 2, "a refused drive changes nothing");
}

#[test]
fn smt_needs_an_even_vcpu_count() {
    let config = MachineConfig {
        vcpu_count: 3,
        smt: true,
        ..Default::default()
    };
    assert_eq!(config.validate(), Err(ConfigError::SmtOddVcpus(3)));
}

#[test]
fn a_config_file_round_trips() {
    let text = r#"{"boot-source": {"kernel_image_path": "/k"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true}]}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    assert_eq!(resources.machine_config.vcpu_count, 2);
    let again: VmConfigFile =
        serde_json::from_str(&serde_json::to_string(&resources.to_config_file()).unwrap()).unwrap();
    assert_eq!(VmResources::from_config_file(again).unwrap(), resources);
}

fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterfaceConfig {
    NetworkInterfaceConfig {
        iface_id: id.into(),
        host_dev_name: tap.into(),
        guest_mac: mac.map(|m| m.parse().unwrap()),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        mtu: None,
    }
}

#[test]
fn network_interfaces_parse_and_are_checked() {
    let parsed: NetworkInterfaceConfig = serde_json::from_str(
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
    )
    .unwrap();
    assert_eq!(parsed, iface("eth0", "tap0", Some("06:00:ac:10:00:02")));
    assert_eq!(
        serde_json::to_string(&parsed).unwrap(),
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#
    );
    for bad in [
        "06:00:ac:10:00",
        "06:00:ac:10:00:02:03",
        "06:00:ac:10:00:zz",
        "0600ac100002",
    ] {
        let text = format!(r#"{{"iface_id": "a", "host_dev_name": "t", "guest_mac": "{bad}"}}"#);
        let err = serde_json::from_str::<NetworkInterfaceConfig>(&text).unwrap_err();
        assert!(err.to_string().contains("invalid MAC address"), "{err}");
    }
    let err = serde_json::from_str::<NetworkInterfaceConfig>(
        r#"{"iface_id": "a", "host_dev_name": "t", "rx_rate_limiter": {"op": {}}}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `op`"), "{err}");

    let mut resources = VmResources::default();
    resources
        .insert_network_interface(iface("eth0", "tap0", Some("06:00:00:00:00:01")))
        .unwrap();
    resources
        .insert_network_interface(iface("eth1", "tap1", None))
        .unwrap();
    assert!(matches!(
        resources.insert_network_interface(iface("eth2", "tap0", None)),
        Err(ConfigError::DuplicateTap { .. })
    ));
    assert!(matches!(
        resources.insert_network_interface(iface("eth2", "tap2", Some("06:00:00:00:00:01"))),
        Err(ConfigError::DuplicateMac { .. })
    ));
    assert_eq!(
        resources.insert_network_interface(iface("eth0", "much-too-long-name", None)),
        Err(ConfigError::HostDevName("much-too-long-name".into()))
    );
    assert_eq!(
        resources.insert_network_interface(iface("a b", "tap3", None)),
        Err(ConfigError::IfaceId("a b".into()))
    );
    // Replacing eth0 keeps its place.
    resources
        .insert_network_interface(iface("eth0", "tap9", None))
        .unwrap();
    let taps: Vec<_> = resources
        .network_interfaces
        .iter()
        .map(|i| i.host_dev_name.as_str())
        .collect();
    assert_eq!(taps, ["tap9", "tap1"]);
}

#[test]
fn firecracker_json_shapes_parse_and_unknown_fields_do_not() {
    let boot: BootSourceConfig =
        serde_json::from_str(r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#)
            .unwrap();
    assert_eq!(boot.boot_args.as_deref(), Some("console=ttyS0"));
    let err = serde_json::from_str::<MachineConfig>(
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}

fn vsock(cid: u64, path: &str) -> VsockConfig {
    VsockConfig {
        vsock_id: None,
        guest_cid: cid,
        uds_path: path.into(),
    }
}

#[test]
fn vsock_cid_and_path_are_checked() {
    assert_eq!(vsock(3, "/v.sock").validate(), Ok(()));
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        assert_eq!(vsock(cid, "/v").validate(), Err(ConfigError::VsockCid(cid)));
    }
    let long = format!("/{}", "p".repeat(VSOCK_UDS_PATH_MAX));
    assert_eq!(
        vsock(3, &long).validate(),
        Err(ConfigError::VsockPathTooLong {
            path: long.clone().into(),
            len: VSOCK_UDS_PATH_MAX + 1
        })
    );
    assert!(vsock(3, &long[..VSOCK_UDS_PATH_MAX]).validate().is_ok());
    assert_eq!(
        vsock(3, "/").check_path_free(),
        Err(ConfigError::VsockPathExists("/".into()))
    );
}

#[test]
fn vsock_takes_firecrackers_shape_with_the_deprecated_id() {
    let text = r#"{"boot-source": {"kernel_image_path": "/k"},
        "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    assert_eq!(resources.vsock.as_ref().unwrap().guest_cid, 3);
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    assert_eq!(
        shown["vsock"],
        serde_json::json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    );
    let bad: VmConfigFile =
        serde_json::from_str(r#"{"vsock": {"guest_cid": 2, "uds_path": "/v"}}"#).unwrap();
    assert_eq!(
        VmResources::from_config_file(bad),
        Err(ConfigError::VsockCid(2))
    );
}

#[test]
fn entropy_takes_firecrackers_shape_with_a_rate_limiter() {
    let text = r#"{"boot-source": {"kernel_image_path": "/k"}, "entropy": {}}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    assert_eq!(resources.entropy, Some(EntropyConfig::default()));
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    assert_eq!(shown["entropy"], serde_json::json!({}));
    let none = serde_json::to_value(VmResources::default().to_config_file()).unwrap();
    assert_eq!(none["entropy"], serde_json::Value::Null);
    let limited: VmConfigFile = serde_json::from_str(
        r#"{"entropy": {"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}}"#,
    )
    .unwrap();
    let resources = VmResources::from_config_file(limited).unwrap();
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    assert_eq!(
        shown["entropy"],
        serde_json::json!({"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}})
    );
    let bad: VmConfigFile = serde_json::from_str(
        r#"{"entropy": {"rate_limiter": {"bandwidth": {"size": 10, "refill_time": 0}}}}"#,
    )
    .unwrap();
    let err = VmResources::from_config_file(bad).unwrap_err().to_string();
    assert!(
        err.starts_with("entropy rate_limiter: bandwidth: refill_time is 0"),
        "{err}"
    );
}

#[test]
fn rate_limiters_on_drives_and_interfaces_round_trip_and_bad_buckets_are_named() {
    let text = r#"{
        "drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": false,
                    "rate_limiter": {"bandwidth": {"size": 1000, "one_time_burst": 50, "refill_time": 10},
                                     "ops": {"size": 5, "refill_time": 1}}}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "rx_rate_limiter": {"ops": {"size": 5, "refill_time": 1}},
                                "tx_rate_limiter": {"bandwidth": {"size": 7, "refill_time": 2}}}]
    }"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file.clone()).unwrap();
    let again = resources.to_config_file();
    assert_eq!(again.drives, file.drives);
    assert_eq!(again.network_interfaces, file.network_interfaces);
    let limiter = resources.drives[0].rate_limiter.unwrap();
    assert_eq!(limiter.bandwidth.unwrap().one_time_burst, Some(50));
    let mut bad = file.clone();
    bad.network_interfaces[0].tx_rate_limiter = Some(RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 3,
            one_time_burst: None,
            refill_time: 0,
        }),
    });
    let err = VmResources::from_config_file(bad).unwrap_err().to_string();
    assert_eq!(
        err,
        "interface eth0 tx_rate_limiter: ops: refill_time is 0 for a bucket of size 3: \
         a bucket that never refills would stop the device for good"
    );
    let mut bad = file;
    bad.drives[0].rate_limiter = Some(RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 3,
            one_time_burst: None,
            refill_time: u64::MAX,
        }),
        ops: None,
    });
    let err = VmResources::from_config_file(bad).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "drive d rate_limiter: bandwidth: refill_time 18446744073709551615 ms is too long"
        ),
        "{err}"
    );
    // Negative sizes are not numbers a bucket can have.
    let negative = r#"{"drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": false,
                      "rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}]}"#;
    let err = serde_json::from_str::<VmConfigFile>(negative)
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid value: integer `-1`"), "{err}");
}

#[test]
fn a_config_file_with_an_id_twice_is_refused() {
    let mut file = VmResources::default().to_config_file();
    file.drives = vec![drive("data", false), drive("data", false)];
    assert_eq!(
        VmResources::from_config_file(file.clone()),
        Err(ConfigError::DuplicateDriveId("data".into()))
    );
    file.drives.clear();
    file.network_interfaces = vec![iface("eth0", "tap0", None), iface("eth0", "tap1", None)];
    assert_eq!(
        VmResources::from_config_file(file),
        Err(ConfigError::DuplicateIfaceId("eth0".into()))
    );
}

#[test]
fn memory_beyond_what_a_guest_addresses_is_refused() {
    // 2^44 + 128 MiB would wrap to 128 MiB in bytes.
    let mut config = MachineConfig {
        mem_size_mib: (1 << 44) + 128,
        ..Default::default()
    };
    assert_eq!(
        config.validate(),
        Err(ConfigError::MemSizeTooLarge((1 << 44) + 128))
    );
    config.mem_size_mib = MAX_MEM_SIZE_MIB;
    assert_eq!(config.validate(), Ok(()));
}

#[test]
fn balloon_takes_firecrackers_shape_and_must_fit_the_machine() {
    let text = r#"{"boot-source": {"kernel_image_path": "/k"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "balloon": {"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    let balloon = resources.balloon.clone().unwrap();
    assert_eq!(balloon.amount_mib, 64);
    assert!(!balloon.free_page_reporting);
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    assert_eq!(
        shown["balloon"],
        serde_json::json!({"amount_mib": 64, "deflate_on_oom": true,
            "stats_polling_interval_s": 1, "free_page_hinting": false,
            "free_page_reporting": false})
    );
    // Larger than the guest's memory: refused, at a file as at a PUT.
    let big: VmConfigFile = serde_json::from_str(
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
            "balloon": {"amount_mib": 129, "deflate_on_oom": false}}"#,
    )
    .unwrap();
    let err = VmResources::from_config_file(big).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Amount of pages requested is too large"),
        "{err}"
    );
    // A machine too small for the balloon already set.
    let smaller = MachineConfig {
        mem_size_mib: 32,
        ..MachineConfig::default()
    };
    assert!(matches!(
        resources.check_machine_fits_balloon(&smaller),
        Err(ConfigError::MemSmallerThanBalloon { .. })
    ));
    let hinting = BalloonConfig {
        free_page_hinting: true,
        ..BalloonConfig::default()
    };
    assert_eq!(hinting.validate(&MachineConfig::default()), Ok(()));
}

/// A configuration as Firecracker 1.17 writes it (`GET /vm/config`), its sections for features
/// mote lacks null or empty, loads; the same sections given are refused by name; and mote
/// writes every section Firecracker does.
#[test]
fn firecrackers_full_configuration_shape_loads_and_round_trips() {
    let text = r#"{"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
        "drives": [], "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
        "cpu-config": null, "balloon": null, "network-interfaces": [], "vsock": null,
        "logger": null, "metrics": null, "mmds-config": null, "entropy": null, "pmem": [],
        "memory-hotplug": null}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    assert_eq!(resources.machine_config.vcpu_count, 2);
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    for section in ["cpu-config", "mmds-config", "memory-hotplug"] {
        assert!(shown[section].is_null(), "{section}: {shown}");
        assert!(shown.as_object().unwrap().contains_key(section), "{shown}");
    }
    assert_eq!(shown["pmem"], serde_json::json!([]));
    for (section, body, feature) in [
        (
            "pmem",
            r#"[{"id": "p0", "path_on_host": "/p"}]"#,
            "virtio-pmem",
        ),
        (
            "memory-hotplug",
            r#"{"total_size_mib": 1024}"#,
            "virtio-mem",
        ),
    ] {
        let text = format!(r#"{{"{section}": {body}}}"#);
        let file: VmConfigFile = serde_json::from_str(&text).unwrap();
        let err = VmResources::from_config_file(file).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{section} is not supported")) && err.contains(feature),
            "{err}"
        );
    }
}

/// A config file's `mmds-config` is taken and shown back, checked against its interfaces.
#[test]
fn a_config_files_mmds_config_is_taken_and_checked() {
    let text = r#"{"network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "mmds-config": {"version": "V2", "network_interfaces": ["eth0"], "imds_compat": true}}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    assert_eq!(
        shown["mmds-config"],
        serde_json::json!({"version": "V2", "network_interfaces": ["eth0"],
            "ipv4_address": "169.254.169.254", "imds_compat": true})
    );
    let text = r#"{"mmds-config": {"network_interfaces": ["eth0"]}}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    assert_eq!(
        VmResources::from_config_file(file),
        Err(ConfigError::MmdsUnknownInterface("eth0".into()))
    );
}

/// A rate limiter and its buckets are JSON objects only: serde would otherwise take a struct
/// from an array of its fields (`[null, null]`), which Firecracker's API does not allow.
#[test]
fn rate_limiters_and_buckets_are_objects_only() {
    let entropy = |text: &str| serde_json::from_str::<EntropyConfig>(text);
    assert!(entropy(r#"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#).is_ok());
    for bad in [
        r#"{"rate_limiter": [null, null]}"#,
        r#"{"rate_limiter": {"ops": [10, null, 100]}}"#,
    ] {
        let err = entropy(bad).unwrap_err().to_string();
        assert!(err.contains("expected an object"), "{bad}: {err}");
    }
}

/// Firecracker's engine names are its: `Async` is taken, a lower-case one is not.
#[test]
fn io_engines_go_by_firecrackers_names() {
    let drive = |engine: &str| {
        serde_json::from_str::<DriveConfig>(&format!(
            r#"{{"drive_id": "d", "path_on_host": "/d", "is_root_device": false, "io_engine": "{engine}"}}"#
        ))
    };
    let async_drive = drive("Async").unwrap();
    assert_eq!(async_drive.io_engine, IoEngine::Async);
    async_drive.validate().unwrap();
    let err = drive("async").unwrap_err().to_string();
    assert!(err.contains("unknown variant `async`"), "{err}");
}

#[test]
fn an_mtu_below_what_a_driver_takes_is_refused() {
    let mut eth0 = iface("eth0", "tap0", None);
    eth0.mtu = Some(9000);
    assert_eq!(eth0.validate(), Ok(()));
    eth0.mtu = Some(67);
    assert_eq!(
        eth0.validate().unwrap_err().to_string(),
        "interface eth0: mtu 67 is below the 68 a driver takes"
    );
    let parsed: NetworkInterfaceConfig =
        serde_json::from_str(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 4000}"#)
            .unwrap();
    assert_eq!(parsed.mtu, Some(4000));
}

/// Firecracker's `huge_pages` names; a size that is not whole 2 MiB pages is refused.
#[test]
fn huge_pages_take_firecrackers_names_and_whole_pages() {
    let machine = |body: &str| serde_json::from_str::<MachineConfig>(body);
    let huge = machine(r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#).unwrap();
    assert_eq!(huge.huge_pages, HugePages::Hugetlbfs2M);
    huge.validate().unwrap();
    assert_eq!(
        serde_json::to_value(huge).unwrap()["huge_pages"],
        serde_json::json!("2M")
    );
    let odd = machine(r#"{"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}"#).unwrap();
    assert_eq!(
        odd.validate().unwrap_err().to_string(),
        "mem_size_mib 129 is not a whole number of huge pages: with huge_pages 2M it must be a multiple of 2"
    );
    assert!(machine(r#"{"vcpu_count": 1, "mem_size_mib": 129}"#)
        .unwrap()
        .validate()
        .is_ok());
    assert!(machine(r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"}"#).is_err());
}

/// A config file's `cpu-config` is taken and shown back; a static template other than None
/// is refused naming it.
#[test]
fn a_config_files_cpu_config_is_taken_and_static_templates_are_refused() {
    let text = r#"{"cpu-config": {"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0",
        "flags": 0, "modifiers": [{"register": "ecx", "bitmap": "0b0xxx"}]}]}}"#;
    let file: VmConfigFile = serde_json::from_str(text).unwrap();
    let resources = VmResources::from_config_file(file).unwrap();
    let template = resources.cpu_config.as_ref().unwrap();
    assert_eq!(
        template.cpuid_modifiers[0].modifiers[0].bitmap.filter,
        0b1000
    );
    let shown = serde_json::to_value(resources.to_config_file()).unwrap();
    assert_eq!(shown["cpu-config"]["cpuid_modifiers"][0]["leaf"], "0x1");

    let machine: MachineConfig =
        serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}"#)
            .unwrap();
    let err = machine.validate().unwrap_err().to_string();
    assert!(
        err.starts_with("cpu_template T2: mote has no static CPU templates"),
        "{err}"
    );
    let none: MachineConfig =
        serde_json::from_str(r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"}"#)
            .unwrap();
    none.validate().unwrap();
}
