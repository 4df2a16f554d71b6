//! How a container's configuration comes from the image and the command line.

use super::*;
use crate::image::{ContainerConfig, Digest};

fn image(config: ContainerConfig) -> StoredImage {
    StoredImage {
        id: Digest::of(b"config"),
        names: vec!["test:latest".into()],
        config,
        size: 0,
        imported: 0,
        architecture: None,
    }
}

fn busybox_like() -> StoredImage {
    image(ContainerConfig {
        user: Some("1000:1000".into()),
        env: Some(vec!["PATH=/bin".into(), "GREETING=hello".into()]),
        entrypoint: Some(vec!["/bin/echo".into()]),
        cmd: Some(vec!["default".into()]),
        working_dir: Some("/srv".into()),
    })
}

#[test]
fn the_image_config_is_used_as_it_is() {
    let config = init_config(&busybox_like(), &ImageRunOptions::default()).unwrap();
    assert_eq!(config.args, ["/bin/echo", "default"]);
    assert_eq!(config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(
        (config.workdir.as_str(), config.user.as_str()),
        ("/srv", "1000:1000")
    );
    assert_eq!(config.hostname, Digest::of(b"config").short());
}

#[test]
fn arguments_replace_the_cmd_and_flags_override_the_rest() {
    let options = ImageRunOptions {
        args: vec!["a".into(), "b".into()],
        env: vec!["GREETING=bye".into(), "NEW=1".into()],
        workdir: Some("/tmp".into()),
        user: Some("root".into()),
        ..Default::default()
    };
    let config = init_config(&busybox_like(), &options).unwrap();
    assert_eq!(config.args, ["/bin/echo", "a", "b"]);
    assert_eq!(config.env, ["PATH=/bin", "GREETING=bye", "NEW=1"]);
    assert_eq!(
        (config.workdir.as_str(), config.user.as_str()),
        ("/tmp", "root")
    );
}

#[test]
fn entrypoint_flag_drops_the_images_cmd() {
    let options = ImageRunOptions {
        entrypoint: Some("/bin/sh".into()),
        ..Default::default()
    };
    assert_eq!(
        init_config(&busybox_like(), &options).unwrap().args,
        ["/bin/sh"]
    );
    let options = ImageRunOptions {
        entrypoint: Some("/bin/sh".into()),
        args: vec!["-c".into(), "true".into()],
        ..Default::default()
    };
    assert_eq!(
        init_config(&busybox_like(), &options).unwrap().args,
        ["/bin/sh", "-c", "true"]
    );
}

#[test]
fn no_entrypoint_and_no_command_is_refused_naming_the_image() {
    let err = init_config(
        &image(ContainerConfig::default()),
        &ImageRunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("test:latest has no entrypoint and no command"),
        "{err}"
    );
}

#[test]
fn a_default_path_and_root_workdir_are_given() {
    let options = ImageRunOptions {
        args: vec!["sh".into()],
        ..Default::default()
    };
    let config = init_config(&image(ContainerConfig::default()), &options).unwrap();
    assert_eq!(config.env, [DEFAULT_PATH]);
    assert_eq!(config.workdir, "/");
}

#[test]
fn volumes_follow_the_root_and_control_drives() {
    let options = ImageRunOptions {
        volumes: vec![
            parse_volume("/img/a.ext4:/data:ro").unwrap(),
            parse_volume("/img/b.ext4:/scratch").unwrap(),
        ],
        ..Default::default()
    };
    let config = init_config(&busybox_like(), &options).unwrap();
    assert_eq!(
        config.volumes,
        [
            Volume {
                device: "/dev/vdc".into(),
                path: "/data".into(),
                read_only: true
            },
            Volume {
                device: "/dev/vdd".into(),
                path: "/scratch".into(),
                read_only: false
            }
        ]
    );
}

#[test]
fn bad_volumes_are_refused() {
    for bad in ["/img", ":/data", "/img:data", "/img:/", "/img:/a/../b"] {
        assert!(parse_volume(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_control_drive_carries_the_config_and_the_report_parses() {
    let config = init_config(&busybox_like(), &ImageRunOptions::default()).unwrap();
    let bytes = control_drive(&config);
    assert_eq!(bytes.len() % SECTOR, 0);
    assert_eq!(init_config::parse_report(&bytes[..SECTOR]), None);
    assert_eq!(
        init_config::parse_signal_slot(&bytes[SECTOR..2 * SECTOR]),
        None
    );
    let json = &bytes[init_config::CONFIG_OFFSET..];
    let end = json.iter().position(|b| *b == 0).unwrap();
    assert_eq!(
        serde_json::from_slice::<InitConfig>(&json[..end]).unwrap(),
        config
    );
    let mut sector = report_line(42).into_bytes();
    sector.resize(SECTOR, 0);
    assert_eq!(init_config::parse_report(&sector), Some(42));
}

#[test]
fn dynamic_elves_are_told_apart() {
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    // The test binary is static on musl, dynamic on glibc.
    assert_eq!(is_dynamic_elf(&me), cfg!(target_env = "gnu"));
    assert!(!is_dynamic_elf(b"short"));
}

#[test]
fn signal_slots_round_trip() {
    let slot = init_config::signal_slot(3, 15);
    assert_eq!(slot.len(), SECTOR);
    assert_eq!(init_config::parse_signal_slot(&slot), Some((3, 15)));
    assert_eq!(init_config::parse_signal_slot(&[0; SECTOR]), None);
}

#[test]
fn a_network_brings_a_resolv_conf_and_none_leaves_the_images() {
    let config = init_config(&busybox_like(), &ImageRunOptions::default()).unwrap();
    assert_eq!(config.resolv_conf, None);
    let options = ImageRunOptions {
        net: true,
        dns: vec!["192.0.2.53".parse().unwrap()],
        ..Default::default()
    };
    let resolv = init_config(&busybox_like(), &options)
        .unwrap()
        .resolv_conf
        .expect("a resolv.conf with --net");
    let servers: Vec<&str> = resolv
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    assert_eq!(servers, ["nameserver 192.0.2.53"]);
    // Without --dns: this host's, never a loopback nameserver.
    let options = ImageRunOptions {
        net: true,
        ..Default::default()
    };
    let resolv = init_config(&busybox_like(), &options)
        .unwrap()
        .resolv_conf
        .expect("a resolv.conf with --net");
    assert!(resolv.contains("nameserver "), "{resolv}");
    assert!(!resolv.contains("nameserver 127."), "{resolv}");
}
