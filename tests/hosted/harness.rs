//! The emulated-host tier's harness: runs a shell script inside `tools/emulated-host` (QEMU's
//! full emulation of a machine whose KVM runs Linux user space: x86_64 with AMD SVM, or aarch64
//! with EL2 and a GICv3) with mote, the test guest and the tests' own program beside it, all
//! built for that machine's architecture, and returns what the script printed and its exit
//! status. A run that ends without the emulated host's status line is a failure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Each script gets this long inside the emulated host (tools/emulated-host enforces it);
/// the harness adds a margin for the emulated host's own boot.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(240);

/// The architecture an emulated host has, and everything run in it is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// AMD SVM with nested paging; mote is the test binary's own static build.
    X86_64,
    /// EL2, GICv3; mote is cross-built here by `tools/build --arch aarch64`.
    Aarch64,
}

impl Arch {
    /// As `uname -m` and the tools' `--arch` name it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The target its static programs are built for.
    pub fn musl_target(self) -> String {
        format!("{}-unknown-linux-musl", self.name())
    }

    /// The guest kernel file tools/guest-artifacts makes, which mote boots: the same name in
    /// the emulated host's /work.
    pub fn guest_kernel(self) -> &'static str {
        match self {
            Arch::X86_64 => "vmlinux",
            Arch::Aarch64 => "Image",
        }
    }

    /// Where this process's per-architecture results are kept.
    fn slot(self) -> usize {
        self as usize
    }
}

/// One cell per architecture, filled once per process.
type PerArch = [OnceLock<PathBuf>; 2];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir(arch: Arch) -> PathBuf {
    let dir = match arch {
        Arch::X86_64 => repo().join("target/hosted"),
        Arch::Aarch64 => repo().join("target/hosted/aarch64"),
    };
    std::fs::create_dir_all(&dir).expect("cannot create target/hosted");
    dir
}

/// A file built by this test process, made under a name of its own and renamed into place,
/// since nextest runs every test in a process of its own and they may build it at once.
fn install(arch: Arch, built: &Path, name: &str) -> PathBuf {
    let dest = work_dir(arch).join(name);
    let tmp = work_dir(arch).join(format!("{name}.{}", std::process::id()));
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

/// Says on both streams why the running test is skipped.
fn skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    let line = format!("SKIPPED: {test} {reason}");
    println!("{line}");
    eprintln!("{line}");
}

/// The emulated host runs no C library: mote must be the static (musl) build, as tools/test
/// builds it. Otherwise the test says why it is skipped and returns false.
pub fn require_static_mote() -> bool {
    if cfg!(not(target_arch = "x86_64")) || is_dynamic(Path::new(env!("CARGO_BIN_EXE_mote"))) {
        skip(
            "runs mote inside an emulated x86_64 host, which needs the static build: run it \
             through tools/test (the musl target)",
        );
        return false;
    }
    true
}

/// Whether a test can run in the emulated host of `arch`; otherwise it says why it is skipped
/// and returns false. x86_64: mote is the static build (`require_static_mote`). aarch64 (mote
/// cross-built, so any build of the tests will do): this is an x86_64 machine, QEMU for arm is
/// there or can be installed (tools/emulated-host installs it as root), and the aarch64 musl
/// standard library is there or can be fetched (`tools/build --arch aarch64` exits with 3 when
/// it cannot).
pub fn require_emulated_host(arch: Arch) -> bool {
    if arch == Arch::X86_64 {
        return require_static_mote();
    }
    static AARCH64: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = AARCH64.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            let reason = "needs an x86_64 machine (tools/emulated-host sets up its emulated \
                          aarch64 host there)";
            return Err(reason.into());
        }
        if !on_path("qemu-system-aarch64") {
            // Installs qemu-system-arm when it can (as root), and fetches the rest.
            let _ = Command::new("bash")
                .arg(repo().join("tools/emulated-host"))
                .args(["--arch", "aarch64", "--setup"])
                .stdout(Stdio::null())
                .status();
            if !on_path("qemu-system-aarch64") {
                return Err("needs qemu-system-aarch64, which is missing and cannot be \
                            installed here (apt-get install qemu-system-arm as root)"
                    .into());
            }
        }
        let target = crate::common::clear_cargo_env(&mut Command::new("bash"))
            .arg(repo().join("tools/build"))
            .args(["--arch", "aarch64", "--target"])
            .output()
            .expect("cannot run tools/build");
        if target.status.code() == Some(3) {
            return Err(format!(
                "needs the aarch64-unknown-linux-musl standard library, which cannot be \
                 fetched: {}",
                String::from_utf8_lossy(&target.stderr).trim()
            ));
        }
        assert!(
            target.status.success(),
            "tools/build --arch aarch64 --target failed:\n{}",
            String::from_utf8_lossy(&target.stderr)
        );
        Ok(())
    });
    match ready {
        Ok(()) => true,
        Err(reason) => {
            skip(reason);
            false
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The x86_64 guest artifacts (see `guest_dir_of`).
pub fn guest_dir() -> &'static Path {
    guest_dir_of(Arch::X86_64)
}

/// The guest artifacts for `arch` (tools/guest-artifacts, fast when they are up to date):
/// vmlinux, bzImage (x86_64) or Image (aarch64), initramfs.cpio.gz and rootfs.ext4.
pub fn guest_dir_of(arch: Arch) -> &'static Path {
    static DIRS: PerArch = [OnceLock::new(), OnceLock::new()];
    DIRS[arch.slot()].get_or_init(|| {
        let dir = match arch {
            Arch::X86_64 => repo().join("target/guest"),
            Arch::Aarch64 => repo().join("target/guest/aarch64"),
        };
        let status = Command::new("bash")
            .arg(repo().join("tools/guest-artifacts"))
            .args(["--arch", arch.name()])
            .arg(&dir)
            .stdout(Stdio::null())
            .status()
            .expect("cannot run tools/guest-artifacts");
        assert!(
            status.success(),
            "tools/guest-artifacts --arch {} failed",
            arch.name()
        );
        dir
    })
}

/// mote for `arch`, static. x86_64: the tests' own build without its debug information (a
/// sixth of the size, so the emulated host unpacks it faster; the code is the same).
/// aarch64: `tools/build --arch aarch64` (a release build, stripped by its profile).
pub fn mote_of(arch: Arch) -> &'static Path {
    static MOTE: PerArch = [OnceLock::new(), OnceLock::new()];
    MOTE[arch.slot()].get_or_init(|| match arch {
        Arch::X86_64 => {
            let stripped = work_dir(arch).join(format!("mote.stripped.{}", std::process::id()));
            let status = Command::new("strip")
                .arg("-o")
                .arg(&stripped)
                .arg(env!("CARGO_BIN_EXE_mote"))
                .status();
            let built = match status {
                Ok(s) if s.success() => stripped.clone(),
                _ => PathBuf::from(env!("CARGO_BIN_EXE_mote")),
            };
            let dest = install(arch, &built, "mote");
            let _ = std::fs::remove_file(stripped);
            dest
        }
        Arch::Aarch64 => {
            // Cargo's lock on target/ serialises the test processes that build it at once.
            let output = crate::common::clear_cargo_env(&mut Command::new("bash"))
                .arg(repo().join("tools/build"))
                .args(["--arch", arch.name()])
                .output()
                .expect("cannot run tools/build");
            assert!(
                output.status.success(),
                "tools/build --arch {} failed:\n{}",
                arch.name(),
                String::from_utf8_lossy(&output.stderr)
            );
            let built = String::from_utf8_lossy(&output.stdout).trim().to_string();
            install(arch, Path::new(&built), "mote")
        }
    })
}

/// tests/hosted-tool, built static for `arch` (the guest and the emulated host run the same
/// code). A cross build links with rust-lld, as tools/build does.
pub fn hosted_tool_of(arch: Arch) -> &'static Path {
    static TOOL: PerArch = [OnceLock::new(), OnceLock::new()];
    TOOL[arch.slot()].get_or_init(|| {
        let target = arch.musl_target();
        let linker = format!("target.{target}.linker=\"rust-lld\"");
        let mut args = vec!["--target", &target];
        if cfg!(target_arch = "x86_64") != (arch == Arch::X86_64) {
            args.extend(["--config", &linker]);
        }
        crate::common::build_test_crate("hosted-tool", &args)
            .join(&target)
            .join("release/hosted-tool")
    })
}

/// tests/hosted-tool for the x86_64 emulated host.
pub fn hosted_tool() -> &'static Path {
    hosted_tool_of(Arch::X86_64)
}

/// The test guest's initramfs with hosted-tool in /bin: a second archive appended to the first,
/// which the guest kernel unpacks over it.
fn guest_initramfs(arch: Arch) -> &'static Path {
    static INITRAMFS: PerArch = [OnceLock::new(), OnceLock::new()];
    INITRAMFS[arch.slot()].get_or_init(|| {
        let work = work_dir(arch);
        let tree = work.join(format!("guest-tree.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(tree.join("bin")).expect("cannot make the guest tree");
        std::fs::copy(hosted_tool_of(arch), tree.join("bin/hosted-tool"))
            .expect("copy hosted-tool");
        let extra = work.join(format!("guest-extra.{}.cpio.gz", std::process::id()));
        let status = Command::new("sh")
            .arg("-c")
            .arg(r#"find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$0""#)
            .arg(&extra)
            .current_dir(&tree)
            .status()
            .expect("cannot run cpio");
        assert!(status.success(), "cpio of the guest's extra files failed");
        let mut bytes =
            std::fs::read(guest_dir_of(arch).join("initramfs.cpio.gz")).expect("initramfs");
        // The kernel looks for the next archive at a 4-byte boundary.
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes.extend(std::fs::read(&extra).expect("the extra archive"));
        let _ = std::fs::remove_dir_all(&tree);
        let _ = std::fs::remove_file(&extra);
        let built = work.join(format!("guest.{}.cpio.gz", std::process::id()));
        std::fs::write(&built, bytes).expect("cannot write the guest's initramfs");
        let dest = install(arch, &built, "guest.cpio.gz");
        let _ = std::fs::remove_file(built);
        dest
    })
}

/// One run of the emulated host: its architecture, its files, its disk, its CPUs.
pub struct Hosted {
    arch: Arch,
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
    /// The standard set for the x86_64 emulated host (see `for_arch`).
    pub fn new() -> Self {
        Self::for_arch(Arch::X86_64)
    }

    /// The standard set for the emulated host of `arch`, all built for it: mote, the guest
    /// kernel (`arch.guest_kernel()`: vmlinux or Image), guest.cpio.gz (the test guest's
    /// initramfs with hosted-tool), rootfs.ext4, hosted-tool and lib.sh, all in /work.
    pub fn for_arch(arch: Arch) -> Self {
        let guest = guest_dir_of(arch);
        Self::bare(arch)
            .file(mote_of(arch), "mote")
            .file(&guest.join(arch.guest_kernel()), arch.guest_kernel())
            .file(guest_initramfs(arch), "guest.cpio.gz")
            .file(&guest.join("rootfs.ext4"), "rootfs.ext4")
            .file(hosted_tool_of(arch), "hosted-tool")
    }

    /// Only lib.sh: for what needs the emulated host alone, or chooses its files (`file`).
    pub fn bare(arch: Arch) -> Self {
        Hosted {
            arch,
            files: vec![(repo().join("tests/hosted/lib.sh"), "lib.sh".to_string())],
            disk: None,
            smp: 1,
        }
    }

    /// `src` on this machine as /work/`dest` in the emulated host.
    pub fn file(mut self, src: &Path, dest: &str) -> Self {
        self.files.push((src.to_path_buf(), dest.to_string()));
        self
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
            .args(["--arch", self.arch.name()])
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
        command
            .arg("--")
            .arg(format!(". ./lib.sh\n{script}"))
            .stdin(Stdio::null());
        let mut output = command.output().expect("cannot run tools/emulated-host");
        // Status 123: the emulated host never came up to run the script (seen once in a CI run
        // on a loaded host, its console empty after 240 s), so nothing of the test ran: it is
        // tried once more, and says so. A stall once the script runs is a failure as ever.
        if output.status.code() == Some(123) {
            eprintln!(
                "warning: the emulated host never came up; trying once more:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            output = command.output().expect("cannot run tools/emulated-host");
        }
        let run = HostedRun {
            status: output.status.code(),
            output: String::from_utf8_lossy(&output.stdout).into_owned(),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !matches!(run.status, Some(123..=126)),
            "tools/emulated-host failed (status {:?}: 123 never came up, 124 time-out, \
             125 no status line, 126 set-up):\n{stderr}\noutput:\n{}",
            run.status,
            run.output
        );
        run
    }
}

/// A scratch copy of the x86_64 test guest's ext4 root for one test (see `scratch_rootfs_of`).
pub fn scratch_rootfs(name: &str) -> PathBuf {
    scratch_rootfs_of(Arch::X86_64, name)
}

/// A scratch copy of the test guest's ext4 root for `arch`, for one test, as a disk for the
/// emulated host.
pub fn scratch_rootfs_of(arch: Arch, name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hosted-{}-{name}.ext4", arch.name()));
    std::fs::copy(guest_dir_of(arch).join("rootfs.ext4"), &path).expect("cannot copy rootfs.ext4");
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
