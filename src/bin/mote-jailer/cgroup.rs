//! The jail's cgroup v2: `<cgroup2 mount>/<parent>/<id>`, with the controllers its settings
//! need delegated down to it, the settings written, and the monitor moved in. Until
//! [`Cgroup::keep`], dropping it removes every directory it made.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use crate::args::CgroupSetting;
use crate::JailError;

/// Where the kernel's list of mounts is.
const MOUNTS: &str = "/proc/self/mounts";

pub struct Cgroup {
    pub path: PathBuf,
    /// Directories this jailer made, outermost first: removed in reverse on failure.
    created: Vec<PathBuf>,
}

/// The first cgroup2 mount (on a hybrid host, e.g. /sys/fs/cgroup/unified).
fn mount_point() -> Result<PathBuf, JailError> {
    let mounts = std::fs::read_to_string(MOUNTS).map_err(|source| JailError::Io {
        what: "read",
        path: MOUNTS.into(),
        source,
    })?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .and_then(|fields| fields.get(1).map(PathBuf::from))
        .ok_or(JailError::NoCgroup2)
}

fn read(path: &Path) -> Result<String, JailError> {
    std::fs::read_to_string(path).map_err(|source| JailError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write_cgroup_file(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(|source| JailError::CgroupWrite {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn create_error(path: PathBuf, source: std::io::Error) -> JailError {
    JailError::Io {
        what: "create",
        path,
        source,
    }
}

impl Cgroup {
    /// Makes the cgroup and writes `settings` into it. `parent` is relative to the cgroup2
    /// mount.
    pub fn create(parent: &Path, id: &str, settings: &[CgroupSetting]) -> Result<Self, JailError> {
        if parent
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(JailError::BadParentCgroup(parent.to_path_buf()));
        }
        let mount = mount_point()?;
        let controllers: BTreeSet<&str> = settings
            .iter()
            .filter_map(|s| s.controller.as_deref())
            .collect();
        let available = read(&mount.join("cgroup.controllers"))?;
        if let Some(missing) = controllers
            .iter()
            .find(|c| !available.split_whitespace().any(|a| a == **c))
        {
            return Err(JailError::NoController {
                controller: missing.to_string(),
                mount,
                available: available.trim().to_string(),
            });
        }
        let mut cgroup = Cgroup {
            path: mount.clone(),
            created: Vec::new(),
        };
        // Each level delegates the controllers to the next, down to the parent of ours,
        // which may be shared with other jails and so may exist already.
        let mut dir = mount;
        for component in parent.components() {
            cgroup.delegate(&dir, &controllers)?;
            dir = dir.join(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => cgroup.created.push(dir.clone()),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(create_error(dir, source)),
            }
        }
        cgroup.delegate(&dir, &controllers)?;
        let dir = dir.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => cgroup.created.push(dir.clone()),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(JailError::CgroupExists(dir))
            }
            Err(source) => return Err(create_error(dir, source)),
        }
        cgroup.path = dir;
        for setting in settings {
            write_cgroup_file(&cgroup.path.join(&setting.file), &setting.value)?;
        }
        Ok(cgroup)
    }

    /// Enables `controllers` for the children of `dir` where they are not yet.
    fn delegate(&self, dir: &Path, controllers: &BTreeSet<&str>) -> Result<(), JailError> {
        let control = dir.join("cgroup.subtree_control");
        let enabled = read(&control)?;
        for controller in controllers {
            if !enabled.split_whitespace().any(|c| c == *controller) {
                write_cgroup_file(&control, &format!("+{controller}"))?;
            }
        }
        Ok(())
    }

    /// Moves process `pid` (and so the threads and children it will have) into the cgroup.
    pub fn join(&self, pid: u32) -> Result<(), JailError> {
        write_cgroup_file(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    /// The cgroup stays once the monitor is in it.
    pub fn keep(mut self) {
        self.created.clear();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // An empty cgroup is removed with rmdir (its control files go with it).
            let _ = std::fs::remove_dir(dir);
        }
    }
}
