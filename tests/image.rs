//! Container images on the host side (`mote image import|ls|rm`, and the refusals of
//! `mote run --image` that come before any VM): small OCI images the tests write themselves,
//! imported into a scratch store and read back from the built ext4 root with debugfs. Needs
//! root (owners), e2fsprogs, busybox-static and the zstd tool (zstd layers); no KVM.

mod common;

#[path = "image/oci.rs"]
mod oci;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::mote;

/// A scratch directory for one test, removed when it ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn join(&self, path: &str) -> PathBuf {
        self.0.join(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mote_in(store: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    let store = store.to_str().unwrap();
    // --store goes with the subcommand that takes it.
    all.extend(["--store", store]);
    mote(&all)
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `debugfs -R REQUEST IMAGE`: its stdout and stderr.
fn debugfs(image: &Path, request: &str) -> (String, String) {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) is needed");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stored_rootfs(store: &Path, id: &str) -> PathBuf {
    store
        .join("images")
        .join(id.trim_start_matches("sha256:"))
        .join("rootfs.ext4")
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn image_import_applies_layers_with_whiteouts_into_an_ext4_root() {
    let scratch = Scratch::new("import");
    let (layout, store) = (scratch.join("layout"), scratch.join("store"));
    let id = oci::write_layout(&oci::test_image(), &layout);
    let out = mote_in(&store, &["image", "import", layout.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("imported as {id} ({})", oci::IMAGE_NAME)),
        "{}",
        text(&out)
    );
    let rootfs = stored_rootfs(&store, &id);
    assert_eq!(debugfs(&rootfs, "cat /etc/motd").0, "new motd\n");
    for gone in ["/etc/gone", "/old-dir", "/opaque/lower"] {
        let (_, err) = debugfs(&rootfs, &format!("stat {gone}"));
        assert!(
            err.contains("File not found"),
            "{gone} is still there: {err}"
        );
    }
    assert_eq!(debugfs(&rootfs, "cat /opaque/new").0, "from layer 2\n");
    // The third layer is zstd-compressed.
    assert_eq!(
        debugfs(&rootfs, "cat /etc/resolv.conf").0,
        oci::IMAGE_RESOLV_CONF
    );
    let (ls, _) = debugfs(&rootfs, "ls -l /bin");
    assert!(ls.contains("sh") && ls.contains("busybox-link"), "{ls}");
    // The hard link shares busybox's inode: two links to it.
    let (stat, _) = debugfs(&rootfs, "stat /bin/busybox-link");
    assert!(stat.contains("Links: 2"), "{stat}");
    let (stat, _) = debugfs(&rootfs, "stat /bin/sh");
    assert!(
        stat.contains("Type: symlink") && stat.contains("busybox"),
        "{stat}"
    );
    // Nothing of the import is left beside the image.
    assert_eq!(entries(&store.join("tmp")), Vec::<String>::new());
    let out = mote_in(&store, &["image", "ls"]);
    assert!(
        text(&out).contains(&format!("{}  {}", oci::IMAGE_NAME, &id[7..19])),
        "{}",
        text(&out)
    );
}

#[test]
fn a_second_import_and_other_forms_of_the_image_come_from_the_cache() {
    let scratch = Scratch::new("cache");
    let (layout, store) = (scratch.join("layout"), scratch.join("store"));
    let spec = oci::test_image();
    let id = oci::write_layout(&spec, &layout);
    let first = mote_in(&store, &["image", "import", layout.to_str().unwrap()]);
    assert!(first.status.success(), "{}", text(&first));
    let archive = scratch.join("image.tar");
    oci::write_archive(&layout, &archive);
    let docker = scratch.join("docker.tar");
    let docker_id = oci::write_docker_save(&spec, &docker, "saved:latest");
    assert_eq!(docker_id, id, "the same configuration, the same id");
    for again in [&layout, &archive, &docker] {
        let out = mote_in(&store, &["image", "import", again.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("was in the store as {id}")),
            "{}",
            text(&out)
        );
    }
    assert_eq!(entries(&store.join("images")).len(), 1);
    // The names it came with both stand for it.
    let out = mote_in(&store, &["image", "ls"]);
    for name in [oci::IMAGE_NAME, "saved:latest"] {
        assert!(text(&out).contains(name), "{name}: {}", text(&out));
    }
}

#[test]
fn a_docker_save_archive_imports_and_rm_removes_it() {
    let scratch = Scratch::new("docker");
    let store = scratch.join("store");
    let archive = scratch.join("docker.tar");
    let id = oci::write_docker_save(&oci::test_image(), &archive, "saved:1");
    let out = mote_in(&store, &["image", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        debugfs(&stored_rootfs(&store, &id), "cat /etc/motd").0,
        "new motd\n"
    );
    let out = mote_in(&store, &["image", "rm", "saved:1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(entries(&store.join("images")), Vec::<String>::new());
    let out = mote_in(&store, &["image", "rm", "saved:1"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no image saved:1 in the store"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_corrupt_layer_is_refused_naming_it_and_nothing_is_left_in_the_store() {
    let scratch = Scratch::new("corrupt");
    let (layout, store) = (scratch.join("layout"), scratch.join("store"));
    oci::write_layout(&oci::test_image(), &layout);
    let blob = oci::first_layer_blob(&layout);
    let digest = format!("sha256:{}", blob.file_name().unwrap().to_string_lossy());
    let mut bytes = std::fs::read(&blob).unwrap();
    // A byte of busybox's contents: the tar stays readable, the digest does not match.
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = mote_in(&store, &["image", "import", layout.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("layer {digest}")) && said.contains("the image is corrupt"),
        "{said}"
    );
    assert_eq!(entries(&store.join("images")), Vec::<String>::new());
    assert_eq!(entries(&store.join("tmp")), Vec::<String>::new());
}

/// A zstd layer in two frames (as a stream compressed in parts is) decodes whole; a zstd
/// layer with a byte changed is refused naming it, as a gzip one is.
#[test]
fn zstd_layers_decode_every_frame_and_a_corrupt_one_is_named() {
    let scratch = Scratch::new("zstd");
    let (layout, store) = (scratch.join("layout"), scratch.join("store"));
    let mut spec = oci::test_image();
    spec.layers[0].1 = oci::Compression::ZstdTwoFrames;
    let id = oci::write_layout(&spec, &layout);
    let out = mote_in(&store, &["image", "import", layout.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let rootfs = stored_rootfs(&store, &id);
    let (stat, _) = debugfs(&rootfs, "stat /bin/busybox");
    let size = std::fs::metadata("/bin/busybox").unwrap().len();
    assert!(stat.contains(&format!("Size: {size}")), "{stat}");
    assert_eq!(debugfs(&rootfs, "cat /etc/passwd").0.lines().count(), 2);

    // Another store: the image's id (its configuration's digest) does not depend on how its
    // layers are compressed, so this one has it already.
    let store = scratch.join("store2");
    let corrupt = scratch.join("corrupt");
    oci::write_layout(&oci::test_image(), &corrupt);
    let blob = oci::layer_blob(&corrupt, 2);
    let digest = format!("sha256:{}", blob.file_name().unwrap().to_string_lossy());
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let out = mote_in(&store, &["image", "import", corrupt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!("layer {digest}")) && said.contains("the image is corrupt"),
        "{said}"
    );
    assert_eq!(entries(&store.join("images")), Vec::<String>::new());
    assert_eq!(entries(&store.join("tmp")), Vec::<String>::new());
}

#[test]
fn an_image_for_another_arch_is_refused_naming_both() {
    let scratch = Scratch::new("arch");
    let (layout, store) = (scratch.join("layout"), scratch.join("store"));
    let mut spec = oci::test_image();
    spec.architecture = if oci::host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    oci::write_layout(&spec, &layout);
    let out = mote_in(&store, &["image", "import", layout.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "is for {}, this host runs {}",
            spec.architecture,
            oci::host_arch()
        )),
        "{said}"
    );
    assert_eq!(entries(&store.join("images")), Vec::<String>::new());
    // Imported for that architecture on purpose (a store for another host), it is stored,
    // and a run here still refuses it, naming both, by name and by path.
    let platform = format!("linux/{}", spec.architecture);
    let out = mote_in(
        &store,
        &[
            "image",
            "import",
            "--platform",
            &platform,
            layout.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(entries(&store.join("images")).len(), 1);
    let store_arg = store.to_str().unwrap();
    for reference in [oci::IMAGE_NAME, layout.to_str().unwrap()] {
        let out = mote(&[
            "run",
            "--kernel",
            "/nonexistent",
            "--store",
            store_arg,
            "--image",
            reference,
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let said = text(&out);
        assert!(
            said.contains(&format!(
                "is for {}, this host runs {} guests",
                spec.architecture,
                oci::host_arch()
            )),
            "{reference}: {said}"
        );
    }
    assert_eq!(entries(&store.join("runs")), Vec::<String>::new());
}

#[test]
fn run_image_refuses_what_it_cannot_run_before_any_vm() {
    let scratch = Scratch::new("refuse");
    let (layout, store) = (scratch.join("layout"), scratch.join("store"));
    let store_arg = store.to_str().unwrap();
    let out = mote(&[
        "run",
        "--kernel",
        "/nonexistent",
        "--store",
        store_arg,
        "--image",
        "nothing:here",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no image nothing:here in the store"),
        "{}",
        text(&out)
    );
    let mut spec = oci::test_image();
    spec.config = serde_json::json!({"Env": ["PATH=/bin"]});
    oci::write_layout(&spec, &layout);
    let out = mote(&[
        "run",
        "--kernel",
        "/nonexistent",
        "--store",
        store_arg,
        "--image",
        layout.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("has no entrypoint and no command"),
        "{}",
        text(&out)
    );
    // The refused run left no files behind.
    assert_eq!(entries(&store.join("runs")), Vec::<String>::new());
}
