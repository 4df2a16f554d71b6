//! Small OCI images written by the tests themselves: an image layout directory (and its tar
//! archive) with a busybox-static layer, a second, gzip-compressed layer that deletes and
//! replaces files with whiteouts and an opaque directory, a third, zstd-compressed one (by the
//! `zstd` tool: an encoder other than the decoder under test) with the image's resolv.conf,
//! and a configuration with an environment, a working directory, a user, an entrypoint and a
//! command.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// The name the test image's index gives it.
pub const IMAGE_NAME: &str = "mote-test/busybox:1";

/// One tar entry of a layer.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A layer's uncompressed tar.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        let (path, data): (&str, &[u8]) = match entry {
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                (path, b"")
            }
            Entry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                (path, data)
            }
            Entry::Symlink(path, to) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_link_name(to).unwrap();
                (path, b"")
            }
            Entry::Hardlink(path, to) => {
                header.set_entry_type(tar::EntryType::Link);
                header.set_mode(0o755);
                header.set_link_name(to).unwrap();
                (path, b"")
            }
        };
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, path, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// How a layer's tar is stored in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// Two zstd frames, each half of the tar compressed alone (as a stream made in parts is).
    ZstdTwoFrames,
}

impl Compression {
    /// The layer's blob and its media type.
    pub fn encode(self, tar: &[u8]) -> (Vec<u8>, &'static str) {
        match self {
            Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(tar).unwrap();
                let blob = encoder.finish().unwrap();
                (blob, "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Compression::Zstd => (zstd(tar), "application/vnd.oci.image.layer.v1.tar+zstd"),
            Compression::ZstdTwoFrames => {
                let (first, second) = tar.split_at(tar.len() / 2);
                let mut blob = zstd(first);
                blob.extend(zstd(second));
                (blob, "application/vnd.oci.image.layer.v1.tar+zstd")
            }
        }
    }
}

/// `data` compressed by the `zstd` tool.
pub fn zstd(data: &[u8]) -> Vec<u8> {
    let mut child = std::process::Command::new("zstd")
        .args(["-q", "-c", "-3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the zstd tool (Debian's zstd) is needed");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "zstd failed");
    out.stdout
}

/// An image to write: its layers (uncompressed tars, and how each is stored) and its
/// configuration's `config` object and architecture.
pub struct ImageSpec {
    pub layers: Vec<(Vec<u8>, Compression)>,
    pub config: serde_json::Value,
    pub architecture: &'static str,
}

/// The host's architecture as OCI names it.
pub fn host_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "amd64"
    }
}

/// The busybox applets the tests' programs use, as symlinks to busybox.
const APPLETS: [&str; 23] = [
    "sh", "echo", "cat", "id", "pwd", "env", "ls", "sleep", "test", "touch", "mkdir", "rm",
    "hostname", "grep", "printf", "mount", "stat", "true", "false", "kill", "tty", "ping", "uname",
];

/// What the test image's zstd layer puts in /etc/resolv.conf.
pub const IMAGE_RESOLV_CONF: &str = "nameserver 192.0.2.1\n";

/// The test image for this machine's architecture, with its busybox (see `test_image_with`).
pub fn test_image() -> ImageSpec {
    test_image_with(Path::new("/bin/busybox"), host_arch())
}

/// The test image: layer 1 is busybox-static (the one at `busybox`, for `architecture`, as
/// OCI names it) with a passwd naming `app` (1000:1000) and files to delete; layer 2 (gzip)
/// whites out /etc/gone and /old-dir, replaces /etc/motd, makes /opaque opaque (keeping only
/// its own /opaque/new) and hard-links a file; layer 3 (zstd) adds /etc/resolv.conf.
pub fn test_image_with(busybox: &Path, architecture: &'static str) -> ImageSpec {
    let busybox = std::fs::read(busybox)
        .unwrap_or_else(|e| panic!("busybox-static ({}) is needed: {e}", busybox.display()));
    let mut first = vec![
        Entry::Dir("bin/"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Dir("etc/"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
            0o644,
        ),
        Entry::File(
            "etc/group",
            b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
            0o644,
        ),
        Entry::File("etc/motd", b"old motd\n", 0o644),
        Entry::File("etc/gone", b"deleted by layer 2\n", 0o644),
        Entry::Dir("old-dir/"),
        Entry::File("old-dir/file", b"deleted with its directory\n", 0o644),
        Entry::Dir("opaque/"),
        Entry::File("opaque/lower", b"hidden by the opaque marker\n", 0o644),
        Entry::Dir("home/"),
        Entry::Dir("home/app/"),
    ];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    first.extend(links.iter().map(|l| Entry::Symlink(l, "busybox")));
    let second = [
        Entry::File("etc/.wh.gone", b"", 0o644),
        Entry::File(".wh.old-dir", b"", 0o644),
        Entry::File("etc/motd", b"new motd\n", 0o644),
        Entry::File("opaque/.wh..wh..opq", b"", 0o644),
        Entry::File("opaque/new", b"from layer 2\n", 0o644),
        Entry::Hardlink("bin/busybox-link", "bin/busybox"),
        Entry::Dir("srv/"),
    ];
    let third = [Entry::File(
        "etc/resolv.conf",
        IMAGE_RESOLV_CONF.as_bytes(),
        0o644,
    )];
    ImageSpec {
        layers: vec![
            (layer_tar(&first), Compression::None),
            (layer_tar(&second), Compression::Gzip),
            (layer_tar(&third), Compression::Zstd),
        ],
        config: serde_json::json!({
            "User": "app",
            "Env": ["PATH=/bin", "GREETING=hello from the image"],
            "WorkingDir": "/srv/work",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default command"],
        }),
        architecture,
    }
}

/// Writes `spec` as an OCI image layout at `dir` (made); gives the image's id (its
/// configuration's digest, `sha256:…`).
pub fn write_layout(spec: &ImageSpec, dir: &Path) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> String {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        format!("sha256:{hex}")
    };
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, compression) in &spec.layers {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        let (blob, media_type) = compression.encode(tar);
        let size = blob.len();
        layers.push(serde_json::json!({
            "mediaType": media_type, "digest": put(&blob), "size": size,
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": spec.architecture,
        "os": "linux",
        "config": spec.config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config.len(),
        },
        "layers": layers,
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    std::fs::write(
        dir.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": IMAGE_NAME},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    config_digest
}

/// The layout at `dir` packed as a tar archive at `archive`.
pub fn write_archive(dir: &Path, archive: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(archive).unwrap());
    builder.append_dir_all(".", dir).unwrap();
    builder.finish().unwrap();
}

/// The path of the first layer blob in a layout (to corrupt it).
pub fn first_layer_blob(dir: &Path) -> PathBuf {
    layer_blob(dir, 0)
}

/// The path of layer `n`'s blob in a layout.
pub fn layer_blob(dir: &Path, n: usize) -> PathBuf {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("blobs/sha256").join(manifest_hex)).unwrap(),
    )
    .unwrap();
    let hex = &manifest["layers"][n]["digest"].as_str().unwrap()[7..];
    dir.join("blobs/sha256").join(hex)
}

/// Writes `spec` as a `docker save` archive of the old form (manifest.json, `<id>.json`,
/// `<n>/layer.tar`, uncompressed); gives the image's id.
pub fn write_docker_save(spec: &ImageSpec, archive: &Path, tag: &str) -> String {
    let diff_ids: Vec<String> = spec
        .layers
        .iter()
        .map(|(tar, _)| format!("sha256:{}", sha256_hex(tar)))
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": spec.architecture,
        "os": "linux",
        "config": spec.config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_hex = sha256_hex(&config);
    let mut builder = tar::Builder::new(std::fs::File::create(archive).unwrap());
    let mut add = |path: &str, data: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, path, data).unwrap();
    };
    add(&format!("{config_hex}.json"), &config);
    let mut layer_paths = Vec::new();
    for (n, (tar, _)) in spec.layers.iter().enumerate() {
        let path = format!("layer{n}/layer.tar");
        add(&path, tar);
        layer_paths.push(path);
    }
    let manifest = serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [tag],
        "Layers": layer_paths,
    }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    builder.finish().unwrap();
    format!("sha256:{config_hex}")
}
