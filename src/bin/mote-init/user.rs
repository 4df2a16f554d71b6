//! Who the program runs as: `user[:group]` from the image (names or numbers) looked up in the
//! container's own /etc/passwd and /etc/group, as Docker does.

use std::path::Path;

/// The program's credentials and home.
#[derive(Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// `name:x:uid:gid:…:home:shell` lines.
fn passwd_entries(text: &str) -> impl Iterator<Item = (&str, u32, u32, &str)> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            return None;
        }
        Some((
            fields[0],
            fields[2].parse().ok()?,
            fields[3].parse().ok()?,
            fields[5],
        ))
    })
}

/// `name:x:gid:member,member` lines.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 {
            return None;
        }
        let members = fields[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((fields[0], fields[2].parse().ok()?, members))
    })
}

/// Resolves `spec` against the files' text (empty text: no such file).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Credentials, String> {
    let (user, wanted_group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = passwd_entries(passwd)
        .find(|(name, uid, _, _)| *name == user || user.parse::<u32>().ok() == Some(*uid));
    let (name, uid, mut gid, home) = match entry {
        Some((name, uid, gid, home)) => (Some(name), uid, gid, home.to_string()),
        None => match user.parse::<u32>() {
            Ok(uid) => (None, uid, 0, "/".to_string()),
            Err(_) => return Err(format!("no user {user:?} in the image's /etc/passwd")),
        },
    };
    if let Some(wanted) = wanted_group {
        gid = match group_entries(group).find(|(name, _, _)| *name == wanted) {
            Some((_, gid, _)) => gid,
            None => wanted
                .parse()
                .map_err(|_| format!("no group {wanted:?} in the image's /etc/group"))?,
        };
    }
    let mut groups = vec![gid];
    // Supplementary groups only for a named user with no group given, as Docker does.
    if let (Some(name), None) = (name, wanted_group) {
        groups.extend(
            group_entries(group)
                .filter(|(_, _, members)| members.contains(&name))
                .map(|(_, gid, _)| gid),
        );
    }
    groups.dedup();
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

/// Resolves `spec` in the root the program runs in (init has chrooted there).
pub fn resolve_in_root(spec: &str) -> Result<Credentials, String> {
    let read = |path: &str| std::fs::read_to_string(Path::new(path)).unwrap_or_default();
    resolve(spec, &read("/etc/passwd"), &read("/etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\n";

    #[test]
    fn names_and_numbers_resolve() {
        let user = resolve("user", PASSWD, GROUP).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.home.as_str()),
            (1000, 1000, "/home/user")
        );
        assert_eq!(user.groups, [1000, 10]);
        assert_eq!(resolve("1000", PASSWD, GROUP).unwrap().home, "/home/user");
        let root = resolve("", PASSWD, GROUP).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
    }

    #[test]
    fn a_group_can_be_given_and_unknown_numbers_are_taken() {
        let user = resolve("user:wheel", PASSWD, GROUP).unwrap();
        assert_eq!(
            (user.uid, user.gid, user.groups.clone()),
            (1000, 10, vec![10])
        );
        let anon = resolve("4242:4343", PASSWD, GROUP).unwrap();
        assert_eq!((anon.uid, anon.gid, anon.home.as_str()), (4242, 4343, "/"));
        assert!(resolve("nobody-here", PASSWD, GROUP).is_err());
        assert!(resolve("user:nogroup", PASSWD, GROUP).is_err());
    }
}
