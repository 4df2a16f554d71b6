//! The guest's initramfs: a cpio archive ("newc", what Linux unpacks) holding mote-init as
//! `/init`, a console node and the directory the root is mounted on.

/// One member of the archive.
pub enum Member<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    CharDevice(&'a str, u32, u32),
}

const MODE_DIR: u32 = 0o040_755;
const MODE_FILE: u32 = 0o100_755;
const MODE_CHAR: u32 = 0o020_600;

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

fn header(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(size).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name.len() + 1).unwrap_or(u32::MAX),
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// The archive of `members`, in order.
pub fn archive(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, member) in (1u32..).zip(members) {
        match member {
            Member::Dir(name) => header(&mut out, ino, name, MODE_DIR, 0, (0, 0)),
            Member::CharDevice(name, major, minor) => {
                header(&mut out, ino, name, MODE_CHAR, 0, (*major, *minor))
            }
            Member::File(name, data) => {
                header(&mut out, ino, name, MODE_FILE, data.len(), (0, 0));
                out.extend_from_slice(data);
                pad4(&mut out);
            }
        }
    }
    header(&mut out, 0, "TRAILER!!!", 0, 0, (0, 0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_newc_with_a_trailer_and_aligned_members() {
        let bytes = archive(&[Member::Dir("dev"), Member::File("init", b"abc")]);
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("abc"));
        assert!(text.contains("TRAILER!!!\0"));
        let second = &bytes[bytes.windows(6).rposition(|w| w == b"070701").unwrap()..];
        assert_eq!(
            &second[6 + 8 * 6..6 + 8 * 7],
            b"00000000",
            "the trailer is empty"
        );
    }

    #[test]
    fn cpio_tool_lists_what_was_archived() {
        let bytes = archive(&[
            Member::Dir("dev"),
            Member::CharDevice("dev/console", 5, 1),
            Member::File("init", b"#!/bin/sh\n"),
        ]);
        let listing = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&bytes)?;
                child.wait_with_output()
            });
        let Ok(output) = listing else {
            eprintln!("no cpio here: skipping the cross-check");
            return;
        };
        assert_eq!(
            String::from_utf8_lossy(&output.stdout)
                .lines()
                .collect::<Vec<_>>(),
            ["dev", "dev/console", "init"]
        );
    }
}
