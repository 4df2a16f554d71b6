//! Layer application: whiteouts, opaque directories, links, and hostile tars that must never
//! write outside the root.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::*;

/// A scratch directory that goes when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mote-layer-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("root")).unwrap();
        Scratch(dir)
    }
    fn root(&self) -> PathBuf {
        self.0.join("root")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a str),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Fifo(&'a str),
}

/// A tar stream with exactly these names (raw bytes, so hostile names get through).
fn tar_of(items: &[Item]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for item in items {
        let mut header = tar::Header::new_gnu();
        let (name, kind, data, link) = match item {
            Item::Dir(name) => (*name, tar::EntryType::Directory, "", None),
            Item::File(name, data) => (*name, tar::EntryType::Regular, *data, None),
            Item::Symlink(name, to) => (*name, tar::EntryType::Symlink, "", Some(*to)),
            Item::Hardlink(name, to) => (*name, tar::EntryType::Link, "", Some(*to)),
            Item::Fifo(name) => (*name, tar::EntryType::Fifo, "", None),
        };
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(1000);
        header.set_gid(1001);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        builder.append(&header, data.as_bytes()).unwrap();
    }
    builder.into_inner().unwrap()
}

fn apply(root: &Path, items: &[Item]) -> Result<(), LayerError> {
    apply_layer(root, &tar_of(items)[..])
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(path).unwrap()
}

#[test]
fn files_keep_their_mode_owner_and_time() {
    let scratch = Scratch::new("meta");
    let root = scratch.root();
    apply(&root, &[Item::Dir("etc/"), Item::File("etc/motd", "hi\n")]).unwrap();
    assert_eq!(read(root.join("etc/motd")), "hi\n");
    let meta = fs::symlink_metadata(root.join("etc/motd")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1001));
    assert_eq!(meta.mode() & 0o7777, 0o644);
    assert_eq!(meta.mtime(), 1_700_000_000);
}

#[test]
fn whiteouts_remove_what_lower_layers_made() {
    let scratch = Scratch::new("whiteout");
    let root = scratch.root();
    apply(
        &root,
        &[
            Item::File("a/gone", "x"),
            Item::File("a/kept", "y"),
            Item::Dir("b/"),
            Item::File("b/deep/file", "z"),
        ],
    )
    .unwrap();
    apply(
        &root,
        &[Item::File("a/.wh.gone", ""), Item::File(".wh.b", "")],
    )
    .unwrap();
    assert!(!root.join("a/gone").exists());
    assert!(!root.join("a/.wh.gone").exists(), "whiteouts are not files");
    assert_eq!(read(root.join("a/kept")), "y");
    assert!(
        !root.join("b").exists(),
        "a whited-out directory goes whole"
    );
}

#[test]
fn opaque_directories_keep_only_this_layers_entries() {
    let scratch = Scratch::new("opaque");
    let root = scratch.root();
    apply(
        &root,
        &[Item::File("d/old1", "1"), Item::File("d/sub/old2", "2")],
    )
    .unwrap();
    apply(
        &root,
        &[
            Item::File("d/new-before", "n"),
            Item::File("d/.wh..wh..opq", ""),
            Item::File("d/new-after", "m"),
        ],
    )
    .unwrap();
    let mut names: Vec<_> = fs::read_dir(root.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new-after", "new-before"]);
}

#[test]
fn a_file_replaces_a_directory_and_a_symlink_is_replaced_not_followed() {
    let scratch = Scratch::new("replace");
    let root = scratch.root();
    let outside = scratch.0.join("outside");
    fs::write(&outside, "untouched").unwrap();
    apply(
        &root,
        &[
            Item::File("x/y", "1"),
            Item::Symlink("s", outside.to_str().unwrap()),
        ],
    )
    .unwrap();
    apply(
        &root,
        &[Item::File("x", "file now"), Item::File("s", "replaced")],
    )
    .unwrap();
    assert_eq!(read(root.join("x")), "file now");
    assert_eq!(read(root.join("s")), "replaced");
    assert!(!fs::symlink_metadata(root.join("s"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read(outside), "untouched");
}

#[test]
fn hard_links_share_the_file() {
    let scratch = Scratch::new("hardlink");
    let root = scratch.root();
    apply(
        &root,
        &[
            Item::File("bin/busybox", "elf"),
            Item::Hardlink("bin/sh", "bin/busybox"),
        ],
    )
    .unwrap();
    let a = fs::metadata(root.join("bin/busybox")).unwrap();
    let b = fs::metadata(root.join("bin/sh")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
}

#[test]
fn fifos_are_made() {
    let scratch = Scratch::new("fifo");
    let root = scratch.root();
    apply(&root, &[Item::Fifo("run/pipe")]).unwrap();
    let meta = fs::symlink_metadata(root.join("run/pipe")).unwrap();
    assert_eq!(meta.mode() & libc::S_IFMT, libc::S_IFIFO);
}

#[test]
fn dot_dot_and_absolute_paths_are_refused() {
    let scratch = Scratch::new("dotdot");
    let root = scratch.root();
    for name in ["../escape", "a/../../escape", "/escape"] {
        let err = apply(&root, &[Item::File(name, "x")]).unwrap_err();
        assert!(matches!(err, LayerError::Refused { .. }), "{name}: {err}");
    }
    let err = apply(
        &root,
        &[
            Item::File("f", "x"),
            Item::Hardlink("l", "../../etc/passwd"),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, LayerError::Refused { .. }), "{err}");
    assert!(!scratch.0.join("escape").exists());
}

#[test]
fn symlinks_on_a_path_are_followed_inside_the_root_only() {
    let scratch = Scratch::new("symlink");
    let root = scratch.root();
    let outside = scratch.0.join("outside");
    fs::create_dir(&outside).unwrap();
    let outside_str = outside.to_str().unwrap().to_string();
    apply(
        &root,
        &[
            // Absolute: taken as the root's own path.
            Item::Symlink("abs", &outside_str),
            Item::File("abs/one", "1"),
            // Relative, climbing above the root: clamped at it.
            Item::Symlink("rel", "../../../../.."),
            Item::File("rel/two", "2"),
            // Through a chain of links.
            Item::Symlink("chain", "rel"),
            Item::File("chain/three", "3"),
        ],
    )
    .unwrap();
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    let inside = root.join(outside.strip_prefix("/").unwrap());
    assert_eq!(read(inside.join("one")), "1");
    assert_eq!(read(root.join("two")), "2");
    assert_eq!(read(root.join("three")), "3");
    // A hard link through a symlink out of the root finds nothing there.
    fs::write(outside.join("secret"), "s").unwrap();
    let err = apply(&root, &[Item::Hardlink("stolen", "abs/secret")]).unwrap_err();
    assert!(matches!(err, LayerError::Write { .. }), "{err}");
    assert!(!root.join("stolen").exists());
}

#[test]
fn symlink_loops_are_refused() {
    let scratch = Scratch::new("loop");
    let root = scratch.root();
    let err = apply(
        &root,
        &[
            Item::Symlink("a", "b"),
            Item::Symlink("b", "a"),
            Item::File("a/x", "1"),
        ],
    )
    .unwrap_err();
    assert!(matches!(err, LayerError::SymlinkLoop { .. }), "{err}");
}

#[test]
fn extended_attributes_in_pax_records_are_kept() {
    let scratch = Scratch::new("xattr");
    let root = scratch.root();
    if !user_xattrs_work(&root) {
        // Linux's tmpfs before 6.6 (the emulated arm64 host's scratch space) has none.
        eprintln!(
            "skipped: {} keeps no user.* extended attributes",
            root.display()
        );
        return;
    }
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_pax_extensions([("SCHILY.xattr.user.mote", &b"kept"[..])])
        .unwrap();
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o755);
    header.set_size(1);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    builder
        .append_data(&mut header, "bin/tool", &b"x"[..])
        .unwrap();
    apply_layer(&root, &builder.into_inner().unwrap()[..]).unwrap();
    let path = c_path(&root.join("bin/tool")).unwrap();
    let name = CString::new("user.mote").unwrap();
    let mut value = [0u8; 16];
    // SAFETY: valid strings and a buffer of the length given.
    let len = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    assert_eq!(&value[..usize::try_from(len).unwrap()], b"kept");
}

/// Whether the file system at `dir` keeps `user.*` extended attributes.
fn user_xattrs_work(dir: &std::path::Path) -> bool {
    let probe = dir.join(".xattr-probe");
    std::fs::write(&probe, b"").unwrap();
    let path = c_path(&probe).unwrap();
    let name = CString::new("user.probe").unwrap();
    // SAFETY: valid strings and a one-byte value of the length given.
    let set = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), b"x".as_ptr().cast(), 1, 0) };
    let _ = std::fs::remove_file(&probe);
    set == 0
}
