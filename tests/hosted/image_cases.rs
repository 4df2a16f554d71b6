//! `mote run --image` in the emulated hosts (x86_64 and aarch64): a test image written here
//! (busybox-static for the emulated host's architecture, a whiteout layer, a zstd layer, a
//! configuration with env, workdir, user and entrypoint) is imported on this machine (the
//! emulated host has no mkfs.ext4; for aarch64 with `--platform linux/arm64`), its store goes
//! in with mote and mote-init, and the runs there check what the program saw and mote's exit
//! status.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{guest_dir_of, mote_of, read_ext4_file, require_emulated_host, Arch, Hosted};
use crate::oci;

/// mote-init for `arch`: on x86_64 the tests' own build without its debug information (as
/// the harness does for mote); on aarch64 the one `tools/build --arch aarch64` built beside
/// mote (its release profile strips it).
fn mote_init(arch: Arch, work: &Path) -> PathBuf {
    if arch == Arch::Aarch64 {
        // mote_of built it (tools/build builds every binary).
        mote_of(arch);
        let built = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(arch.musl_target())
            .join("release/mote-init");
        assert!(built.is_file(), "no {}", built.display());
        return built;
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mote-init"));
    let stripped = work.join("mote-init");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&built)
        .status();
    match status {
        Ok(s) if s.success() => stripped,
        _ => built,
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Shrinks the stored root to its data plus a few MiB, so that it enters the emulated host
/// (files go in through its initramfs, holes and all).
fn shrink_ext4(image: &Path) {
    let path = image.to_str().unwrap();
    run("e2fsck", &["-fy", path]);
    let out = Command::new("resize2fs")
        .args(["-P", path])
        .output()
        .unwrap();
    let minimum: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Estimated minimum size of the filesystem: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("resize2fs -P says the minimum");
    // 4 KiB blocks (mkfs.ext4's for these sizes); 16 MiB for the containers' writes.
    let blocks = minimum + 4096;
    run("resize2fs", &[path, &blocks.to_string()]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .unwrap()
        .set_len(blocks * 4096)
        .unwrap();
}

/// The test image for `arch`: its busybox is the one the emulated host's guests run.
fn test_image(arch: Arch) -> oci::ImageSpec {
    match arch {
        Arch::X86_64 => oci::test_image_with(Path::new("/bin/busybox"), "amd64"),
        // tools/guest-artifacts --arch aarch64 fetched Debian's busybox-static:arm64 there.
        Arch::Aarch64 => oci::test_image_with(
            &guest_dir_of(arch).join("busybox-static-arm64/bin/busybox"),
            "arm64",
        ),
    }
}

/// The test image imported into a store under `work` (by this machine's mote, for `arch`);
/// gives the store's files to send (path here, path there).
fn prepared_store(arch: Arch, work: &Path) -> Vec<(PathBuf, String)> {
    let layout = work.join("layout");
    let store = work.join("store");
    let spec = test_image(arch);
    let id = oci::write_layout(&spec, &layout);
    let out = Command::new(env!("CARGO_BIN_EXE_mote"))
        .args(["image", "import", "--platform"])
        .arg(format!("linux/{}", spec.architecture))
        .arg("--store")
        .arg(&store)
        .arg(&layout)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = format!("store/images/{}", &id[7..]);
    shrink_ext4(&work.join(&dir).join("rootfs.ext4"));
    // The same image as an archive: run by path there, it must come from the store (there
    // is no mkfs.ext4 to build it).
    let archive = work.join("image.tar");
    oci::write_archive(&layout, &archive);
    let mut files: Vec<(PathBuf, String)> = ["rootfs.ext4", "image.json"]
        .iter()
        .map(|f| (work.join(&dir).join(f), format!("{dir}/{f}")))
        .collect();
    files.push((archive, "image.tar".to_string()));
    files
}

/// An ext4 volume with one file.
fn volume(work: &Path) -> PathBuf {
    let tree = work.join("volume-tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello"), "hello from the volume\n").unwrap();
    let image = work.join("volume.ext4");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            tree.to_str().unwrap(),
            image.to_str().unwrap(),
            "8M",
        ],
    );
    image
}

/// The image's program runs with the image's environment, working directory and user; its
/// exit status is mote's; the second layer's whiteouts took effect; the zstd layer's
/// resolv.conf is the guest's without a network; flags override the image; a missing
/// entrypoint is 127; a volume is mounted read-only; the run's files go, or the root stays
/// where --keep says; a signal to mote reaches the program; --net with --ip gives eth0 its
/// address and the guest the emulated host's resolv.conf without its loopback nameserver,
/// or --dns's nameserver; without --ip eth0 is up all the same; the image given as an
/// archive runs from the store.
pub fn image_runs_as_a_container(arch: Arch) {
    if !require_emulated_host(arch) {
        return;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "hosted-image-{}-{}",
        arch.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    // The kept root comes back out through the emulated host's disk.
    let disk = work.join("disk");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let mut hosted = Hosted::bare(arch)
        .disk(&disk)
        .file(mote_of(arch), "mote")
        .file(
            &guest_dir_of(arch).join(arch.guest_kernel()),
            arch.guest_kernel(),
        )
        .file(&mote_init(arch, &work), "mote-init")
        .file(&volume(&work), "volume.ext4");
    for (src, dest) in prepared_store(arch, &work) {
        hosted = hosted.file(&src, &dest);
    }
    let result = hosted.run(&format!(
        r#"
image() {{ ./mote run --kernel "$KERNEL" --store store --image {name} "$@"; }}
image -- 'echo "who=$(id -u):$(id -g) groups=$(id -G) pwd=$(pwd) home=$HOME"; echo "greeting=$GREETING"; echo "motd=$(cat /etc/motd)"; test -e /etc/gone && echo gone=present || echo gone=absent; test -e /old-dir && echo old-dir=present || echo old-dir=absent; echo "opaque=$(ls /opaque)"; echo "tty=$(tty)"; echo "host=$(hostname)"; echo "machine=$(uname -m)"; echo "resolv=$(echo $(cat /etc/resolv.conf))"; exit 7' >out1 2>&1
echo "status1=$?"
image >out2 2>&1
echo "status2=$?"
image --env GREETING=overridden --workdir /tmp --user root:staff -- 'echo "flags=$(id -u):$(id -g) $(pwd) $GREETING"' >out3 2>&1
echo "status3=$?"
image --entrypoint /no/such/program >out4 2>&1
echo "status4=$?"
image --volume volume.ext4:/data:ro -- 'cat /data/hello; if touch /data/x 2>/dev/null; then echo volume=writable; else echo volume=read-only; fi' >out5 2>&1
echo "status5=$?"
image --keep kept.ext4 --user root -- 'echo kept >/kept-file' >out6 2>&1
echo "status6=$?"
[ -s kept.ext4 ] && echo kept=yes || echo kept=no
dd if=kept.ext4 of=/dev/vda bs=1M conv=fsync 2>/dev/null
./mote run --kernel "$KERNEL" --store store --image {name} -- 'trap "echo got-term; exit 42" TERM; echo ready; while :; do sleep 1; done' >out7 2>&1 &
mote=$!
wait_for out7 '^ready' 60 || fail "the signal test's program never started"
kill -TERM $mote
wait $mote
echo "status7=$?"
./mote run --kernel "$KERNEL" --store store --image image.tar -- 'echo from-the-archive' >out9 2>&1
echo "status9=$?"
# The emulated host's resolver configuration, which a container with --net gets (its
# loopback nameserver left out).
mkdir -p /etc
printf 'nameserver 127.0.0.1\nnameserver 10.0.2.3\nsearch example.test\n' >/etc/resolv.conf
cat > net.sh <<'NET'
. ./lib.sh
ip link set lo up
tunctl -t tap0 >/dev/null || fail "cannot make tap0"
ip addr add 172.31.0.1/24 dev tap0
ip link set tap0 up
./mote run --kernel "$KERNEL" --store store --image {name} --user root --net tap=tap0 --ip 172.31.0.2/24,gw=172.31.0.1 -- 'ping -c 1 -W 10 172.31.0.1 | grep "packets transmitted"; echo "lo-flags=$(cat /sys/class/net/lo/flags)"; echo "resolv=$(echo $(cat /etc/resolv.conf))"' >out8 2>&1
echo "status8=$?"
./mote run --kernel "$KERNEL" --store store --image {name} --net tap=tap0 --dns 192.0.2.53 -- 'echo "resolv=$(echo $(cat /etc/resolv.conf))"; echo "eth0-flags=$(cat /sys/class/net/eth0/flags)"' >out10 2>&1
echo "status10=$?"
NET
unshare -n sh net.sh
echo "runs-left=$(ls store/runs | wc -l)"
for n in 1 2 3 4 5 6 7 8 9 10; do tr -d '\r' <out$n | sed "s/^/out$n: /"; done
"#,
        name = oci::IMAGE_NAME
    ));
    result.assert_ok();
    let value = |key: &str| result.value(key);
    println!("{}", result.output);
    assert_eq!(value("status1="), "7");
    assert_eq!(
        value("out1: who="),
        "1000:1000 groups=1000 50 pwd=/srv/work home=/home/app"
    );
    assert_eq!(value("out1: greeting="), "hello from the image");
    assert_eq!(value("out1: motd="), "new motd");
    assert_eq!(value("out1: gone="), "absent");
    assert_eq!(value("out1: old-dir="), "absent");
    assert_eq!(value("out1: opaque="), "new");
    assert_eq!(value("out1: tty="), "/dev/ttyS0");
    // The image's busybox ran in a guest of the emulated host's architecture.
    assert_eq!(value("out1: machine="), arch.name());
    // No --net: the image's own resolv.conf (its zstd layer's).
    assert_eq!(value("out1: resolv="), oci::IMAGE_RESOLV_CONF.trim_end());
    assert_eq!(value("status2="), "0");
    result.assert_line("out2: default command");
    assert_eq!(value("status3="), "0");
    assert_eq!(value("out3: flags="), "0:50 /tmp overridden");
    assert_eq!(value("status4="), "127");
    result.assert_line("out4: mote-init: cannot run /no/such/program");
    assert_eq!(value("status5="), "0");
    result.assert_line("out5: hello from the volume");
    assert_eq!(value("out5: volume="), "read-only");
    assert_eq!(value("status6="), "0");
    assert_eq!(value("kept="), "yes");
    assert_eq!(value("runs-left="), "0");
    assert_eq!(read_ext4_file(&disk, "/kept-file"), b"kept\n");
    // SIGTERM to mote reached the program, whose trap chose the status.
    result.assert_line("out7: got-term");
    assert_eq!(value("status7="), "42");
    // --net with --ip: eth0 has its address (the kernel's ip=) and lo is up.
    assert_eq!(value("status8="), "0");
    result.assert_line("out8: 1 packets transmitted, 1 packets received");
    assert_eq!(value("out8: lo-flags="), "0x9");
    // --net: the emulated host's resolv.conf without its loopback nameserver; --dns: its
    // nameserver with the host's search domain.
    assert_eq!(
        value("out8: resolv="),
        "nameserver 10.0.2.3 search example.test"
    );
    assert_eq!(value("status10="), "0");
    assert_eq!(
        value("out10: resolv="),
        "nameserver 192.0.2.53 search example.test"
    );
    // Without --ip eth0 has no address but is up (IFF_UP | IFF_BROADCAST | IFF_MULTICAST).
    assert_eq!(value("out10: eth0-flags="), "0x1003");
    // The archive's image was the stored one: nothing built, the second form ran at once.
    assert_eq!(value("status9="), "0");
    result.assert_line("out9: from-the-archive");
    result.assert_line("was in the store");
    let _ = std::fs::remove_dir_all(&work);
}
