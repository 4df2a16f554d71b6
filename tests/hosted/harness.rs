//! The emulated-host tier's harness: runs a shell script inside `tools/emulated-host` (QEMU's
//! full emulation of a machine with AMD SVM, whose KVM runs Linux user space) with mote, the
//! test guest and the tests' own program beside it, and returns what the script printed and
//! its exit status. A run that ends without the emulated host's status line is a failure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Each script gets this long inside the emulated host (tools/emulated-host enforces it);
/// the harness adds a margin for the emulated host's own boot.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> PathBuf {
    let dir = repo().join("target/hosted");
    std::fs::create_dir_all(&dir).expect("cannot create target/hosted");
    dir
}

/// A file built by this test process, made under a name of its own and renamed into place,
/// since nextest runs every test in a process of its own and they may build it at once.
fn install(built: &Path, name: &str) -> PathBuf {
    let dest = work_dir().join(name);
    let tmp = work_dir().join(format!("{name}.{}", std::process::id()));
    std::fs::copy(built, &tmp).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
    std::fs::rename(&tmp, &dest).expect("cannot rename into target/hosted");
    dest
}

/// True when the ELF at `path` names a program interpreter (is dynamically linked).
fn is_dynamic(path: &Path) -> bool {
    let elf = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let word = |at: usize, len: usize| -> u64 {
        elf[at..at + len]
            .iter()
            .rev()
            .fold(0, |acc, b| (acc << 8) | u64::from(*b))
    };
    let (phoff, phentsize, phnum) = (word(0x20, 8) as usize, word(0x36, 2), word(0x38, 2));
    (0..phnum as usize).any(|i| word(phoff + i * phentsize as usize, 4) == 3) // PT_INTERP
}

/// The emulated host runs no C library: mote must be the static (musl) build, as tools/test
/// builds it. Otherwise the test says why it is skipped and returns false.
pub fn require_static_mote() -> bool {
    if cfg!(not(target_arch = "x86_64")) || is_dynamic(Path::new(env!("CARGO_BIN_EXE_mote"))) {
        let test = std::thread::current()
            .name()
            .unwrap_or("this test")
            .to_string();
        let reason = format!(
            "SKIPPED: {test} runs mote inside an emulated x86_64 host, which needs the static \
             build: run it through tools/test (the musl target)"
        );
        println!("{reason}");
        eprintln!("{reason}");
        return false;
    }
    true
}

/// The guest artifacts (tools/guest-artifacts, fast when they are up to date).
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo().join("target/guest");
        let status = Command::new("bash")
            .arg(repo().join("tools/guest-artifacts"))
            .arg(&dir)
            .stdout(Stdio::null())
            .status()
            .expect("cannot run tools/guest-artifacts");
        assert!(status.success(), "tools/guest-artifacts failed");
        dir
    })
}

/// mote without its debug information: a sixth of the size, so the emulated host unpacks it
/// faster (the code is the same).
fn mote() -> &'static Path {
    static MOTE: OnceLock<PathBuf> = OnceLock::new();
    MOTE.get_or_init(|| {
        let stripped = work_dir().join(format!("mote.stripped.{}", std::process::id()));
        let status = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(env!("CARGO_BIN_EXE_mote"))
            .status();
        let built = match status {
            Ok(s) if s.success() => stripped.clone(),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_mote")),
        };
        let dest = install(&built, "mote");
        let _ = std::fs::remove_file(stripped);
        dest
    })
}

/// tests/hosted-tool, built static for mote's own target (the guest and the emulated host
/// run the same x86_64 code).
pub fn hosted_tool() -> &'static Path {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        let target = "x86_64-unknown-linux-musl";
        crate::common::build_test_crate("hosted-tool", &["--target", target])
            .join(target)
            .join("release/hosted-tool")
    })
}

/// The test guest's initramfs with hosted-tool in /bin: a second archive appended to the first,
/// which the guest kernel unpacks over it.
fn guest_initramfs() -> &'static Path {
    static INITRAMFS: OnceLock<PathBuf> = OnceLock::new();
    INITRAMFS.get_or_init(|| {
        let tree = work_dir().join(format!("guest-tree.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(tree.join("bin")).expect("cannot make the guest tree");
        std::fs::copy(hosted_tool(), tree.join("bin/hosted-tool")).expect("copy hosted-tool");
        let extra = work_dir().join(format!("guest-extra.{}.cpio.gz", std::process::id()));
        let status = Command::new("sh")
            .arg("-c")
            .arg(r#"find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$0""#)
            .arg(&extra)
            .current_dir(&tree)
            .status()
            .expect("cannot run cpio");
        assert!(status.success(), "cpio of the guest's extra files failed");
        let mut bytes = std::fs::read(guest_dir().join("initramfs.cpio.gz")).expect("initramfs");
        // The kernel looks for the next archive at a 4-byte boundary.
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend(std::fs::read(&extra).expect("the extra archive"));
        let _ = std::fs::remove_dir_all(&tree);
        let _ = std::fs::remove_file(&extra);
        let built = work_dir().join(format!("guest.{}.cpio.gz", std::process::id()));
        std::fs::write(&built, bytes).expect("cannot write the guest's initramfs");
        let dest = install(&built, "guest.cpio.gz");
        let _ = std::fs::remove_file(built);
        dest
    })
}

/// One run of the emulated host: its files, its disk, its CPUs.
pub struct Hosted {
    files: Vec<(PathBuf, String)>,
    disk: Option<PathBuf>,
    smp: u32,
}

/// What a script printed (stdout and stderr together) and its exit status.
pub struct HostedRun {
    pub status: Option<i32>,
    pub output: String,
}

impl HostedRun {
    /// Panics with the whole output unless the script ended with status 0.
    pub fn assert_ok(&self) -> &Self {
        assert_eq!(
            self.status,
            Some(0),
            "the script in the emulated host failed; it printed:\n{}",
            self.output
        );
        self
    }

    /// Panics with the whole output unless it has a line containing `text`.
    pub fn assert_line(&self, text: &str) -> &Self {
        assert!(
            self.output.lines().any(|line| line.contains(text)),
            "no line with {text:?} in:\n{}",
            self.output
        );
        self
    }

    /// The value after `key` on the first line that starts with it (`key` included).
    pub fn value(&self, key: &str) -> String {
        self.output
            .lines()
            .find_map(|line| line.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no line starting with {key:?} in:\n{}", self.output))
            .trim()
            .to_string()
    }
}

impl Hosted {
    /// The standard set: mote, the guest kernel (vmlinux), guest.cpio.gz (the test guest's
    /// initramfs with hosted-tool), rootfs.ext4, hosted-tool and lib.sh, all in /work.
    pub fn new() -> Self {
        let guest = guest_dir();
        let files = vec![
            (mote().to_path_buf(), "mote".to_string()),
            (guest.join("vmlinux"), "vmlinux".to_string()),
            (guest_initramfs().to_path_buf(), "guest.cpio.gz".to_string()),
            (guest.join("rootfs.ext4"), "rootfs.ext4".to_string()),
            (hosted_tool().to_path_buf(), "hosted-tool".to_string()),
            (repo().join("tests/hosted/lib.sh"), "lib.sh".to_string()),
        ];
        Hosted {
            files,
            disk: None,
            smp: 1,
        }
    }

    /// `path` on this machine, as the emulated host's /dev/vda: what the script writes there
    /// is in `path` afterwards.
    pub fn disk(mut self, path: &Path) -> Self {
        self.disk = Some(path.to_path_buf());
        self
    }

    /// The emulated host's CPU count (2 for 2-vCPU guests).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Runs `script` (busybox sh, after `. ./lib.sh`) in /work inside the emulated host.
    pub fn run(&self, script: &str) -> HostedRun {
        let mut command = Command::new("bash");
        command
            .arg(repo().join("tools/emulated-host"))
            .args(["--smp", &self.smp.to_string()])
            .args(["--timeout", &SCRIPT_TIMEOUT.as_secs().to_string()]);
        for (src, dest) in &self.files {
            command
                .arg("--file")
                .arg(format!("{}:{dest}", src.display()));
        }
        if let Some(disk) = &self.disk {
            command.arg("--disk").arg(disk);
        }
        let output = command
            .arg("--")
            .arg(format!(". ./lib.sh\n{script}"))
            .stdin(Stdio::null())
            .output()
            .expect("cannot run tools/emulated-host");
        let run = HostedRun {
            status: output.status.code(),
            output: String::from_utf8_lossy(&output.stdout).into_owned(),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !matches!(run.status, Some(124..=126)),
            "tools/emulated-host failed (status {:?}: 124 time-out, 125 no status line, \
             126 set-up):\n{stderr}\noutput:\n{}",
            run.status,
            run.output
        );
        run
    }
}

/// A scratch copy of the test guest's ext4 root for one test, as a disk for the emulated host.
pub fn scratch_rootfs(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hosted-{name}.ext4"));
    std::fs::copy(guest_dir().join("rootfs.ext4"), &path).expect("cannot copy rootfs.ext4");
    path
}

/// The contents of `file` in the ext4 image `image`, read on this machine: e2fsck first replays
/// the journal (on a copy), as a mount would, then debugfs reads the file.
pub fn read_ext4_file(image: &Path, file: &str) -> Vec<u8> {
    let copy = image.with_extension("fsck");
    std::fs::copy(image, &copy).expect("cannot copy the image");
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&copy)
        .output()
        .expect("cannot run e2fsck (e2fsprogs)");
    // 0: clean, 1: errors corrected (a replayed journal counts).
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck of {} failed: {}",
        image.display(),
        String::from_utf8_lossy(&fsck.stdout)
    );
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(&copy)
        .stderr(Stdio::null())
        .output()
        .expect("cannot run debugfs (e2fsprogs)");
    let _ = std::fs::remove_file(&copy);
    out.stdout
}
