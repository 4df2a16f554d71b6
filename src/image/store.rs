//! mote's local image store: built root file systems kept by image id, so that a second run
//! of an image starts at once. Under `$XDG_DATA_HOME/mote` (else `~/.local/share/mote`) or
//! `--store PATH`:
//!
//! ```text
//! images/<id hex>/rootfs.ext4   the image's root file system
//! images/<id hex>/image.json    its names, configuration, size and architecture
//! tmp/<pid>-<n>/                an import at work; renamed into images/ whole when done
//! runs/<pid>-<n>.*              a running container's files (its root's writable copy, …)
//! ```
//! An image appears in `images/` only by a rename of its finished directory, so the store
//! never holds a half-built one; an import that dies leaves a `tmp/` directory that the next
//! use of the store removes (its process is gone).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use log::info;
use serde::{Deserialize, Serialize};

use super::{archive, rootfs, source, unpack_layers, ContainerConfig, Digest, ImageError};

/// What the store keeps of an image besides its root file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredImage {
    pub id: Digest,
    pub names: Vec<String>,
    pub config: ContainerConfig,
    /// Bytes of the unpacked image.
    pub size: u64,
    /// When it was imported (seconds since the epoch).
    pub imported: u64,
    /// The architecture its programs are built for (OCI's name: `amd64`, `arm64`); absent in
    /// records written before it was kept, which were all this host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no image store directory: set XDG_DATA_HOME or HOME, or give --store")]
    NoHome,
    #[error("image store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("image store {path}: invalid record: {source}")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no image {reference} in the store {store}: not a path, a name or an id there")]
    NotFound { reference: String, store: PathBuf },
    #[error("{reference} is ambiguous in the store {store}: it names {count} images")]
    Ambiguous {
        reference: String,
        store: PathBuf,
        count: usize,
    },
}

pub struct Store {
    root: PathBuf,
}

const RECORD: &str = "image.json";
const ROOTFS: &str = "rootfs.ext4";

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory removed when dropped, unless kept.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A name unique to this process: `<pid>-<n>`, the pid first so that leftovers of a process
/// that is gone can be told.
fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only asks whether the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

impl Store {
    /// The default store's directory.
    pub fn default_path() -> Result<PathBuf, StoreError> {
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(data).join("mote"));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or(StoreError::NoHome)?;
        Ok(PathBuf::from(home).join(".local/share/mote"))
    }

    /// Opens (creating) the store at `root`, or the default one, and clears what processes
    /// that are gone left in `tmp/` and `runs/`.
    pub fn open(root: Option<&Path>) -> Result<Store, StoreError> {
        let root = match root {
            Some(root) => root.to_path_buf(),
            None => Store::default_path()?,
        };
        let store = Store { root };
        for dir in ["images", "tmp", "runs"] {
            let path = store.root.join(dir);
            std::fs::create_dir_all(&path).map_err(io_err(&path))?;
        }
        store.clear_leftovers();
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    fn clear_leftovers(&self) {
        for dir in ["tmp", "runs"] {
            let Ok(entries) = std::fs::read_dir(self.root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let pid = name.split('-').next().and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|pid| !process_alive(pid)) {
                    info!(
                        "removing {}, left by a process that is gone",
                        entry.path().display()
                    );
                    let path = entry.path();
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        }
    }

    /// A new directory under `tmp/` or `runs/`, removed when dropped.
    pub fn temp_dir(&self, under: &str) -> Result<TempDir, StoreError> {
        let path = self.root.join(under).join(unique_name());
        std::fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(TempDir { path, keep: false })
    }

    /// A path prefix under `runs/` for one run's files (`<prefix>.control`, …).
    pub fn run_prefix(&self) -> PathBuf {
        self.root.join("runs").join(unique_name())
    }

    fn image_dir(&self, id: &Digest) -> PathBuf {
        self.root.join("images").join(id.hex())
    }

    /// The root file system of a stored image.
    pub fn rootfs(&self, image: &StoredImage) -> PathBuf {
        self.image_dir(&image.id).join(ROOTFS)
    }

    /// Every stored image, the newest first.
    pub fn list(&self) -> Result<Vec<StoredImage>, StoreError> {
        let dir = self.root.join("images");
        let mut images = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let record = entry.path().join(RECORD);
            if record.is_file() {
                images.push(read_record(&record)?);
            }
        }
        images.sort_by(|a, b| b.imported.cmp(&a.imported).then(a.id.cmp(&b.id)));
        Ok(images)
    }

    /// The stored image `reference` names: a name, an id (`sha256:…`), or a prefix of an id's
    /// hex digits (at least 4).
    pub fn find(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
        let by_id = |image: &StoredImage| {
            hex.len() >= 4
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
                && image.id.hex().starts_with(hex)
        };
        let images = self.list()?;
        let named: Vec<&StoredImage> = images
            .iter()
            .filter(|i| i.names.iter().any(|n| n == reference))
            .collect();
        let found: Vec<&StoredImage> = if named.is_empty() {
            images.iter().filter(|i| by_id(i)).collect()
        } else {
            named
        };
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(StoreError::NotFound {
                reference: reference.to_string(),
                store: self.root.clone(),
            }),
            many => Err(StoreError::Ambiguous {
                reference: reference.to_string(),
                store: self.root.clone(),
                count: many.len(),
            }),
        }
    }

    /// Removes the image `reference` names.
    pub fn remove(&self, reference: &str) -> Result<StoredImage, StoreError> {
        let image = self.find(reference)?;
        let dir = self.image_dir(&image.id);
        // Out of images/ in one rename first, so no reader sees half an image.
        let doomed = self.root.join("tmp").join(unique_name());
        std::fs::rename(&dir, &doomed).map_err(io_err(&dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io_err(&doomed))?;
        Ok(image)
    }

    /// Imports the image at `path` (a layout or `docker save` directory, or a tar archive of
    /// either) for `platform`, named `name` (else what the image calls itself). An image
    /// already stored is not built again. Gives the stored image and whether it was there
    /// already.
    pub fn import(
        &self,
        path: &Path,
        name: Option<&str>,
        platform: source::Platform,
    ) -> Result<(StoredImage, bool), ImageError> {
        let work = self.temp_dir("tmp")?;
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else if archive::is_tar(path) {
            // A first look without the layers: an image the store has is not unpacked.
            let glance = work.path().join("glance");
            std::fs::create_dir(&glance).map_err(io_err(&glance))?;
            archive::unpack(path, &glance, Some(source::JSON_MAX_BYTES))?;
            if let Ok(image) = source::read_image_dir(&glance, platform) {
                if let Some(stored) = self.stored(&image.id)? {
                    let name = name_for(name, image.name.as_deref(), path);
                    return Ok((self.add_name(stored, name)?, true));
                }
            }
            let unpacked = work.path().join("archive");
            std::fs::create_dir(&unpacked).map_err(io_err(&unpacked))?;
            archive::unpack(path, &unpacked, None)?;
            unpacked
        } else if path.exists() {
            return Err(source::SourceError::NotAnImage {
                path: path.to_path_buf(),
            }
            .into());
        } else {
            return Err(source::SourceError::Read {
                path: path.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotFound),
            }
            .into());
        };
        let image = source::read_image_dir(&dir, platform)?;
        let name = name_for(name, image.name.as_deref(), path);
        if let Some(stored) = self.stored(&image.id)? {
            let stored = self.add_name(stored, name)?;
            return Ok((stored, true));
        }
        let build = work.path().join("image");
        let tree = work.path().join("tree");
        for dir in [&build, &tree] {
            std::fs::create_dir(dir).map_err(io_err(dir))?;
        }
        unpack_layers(&image, &tree)?;
        let size = rootfs::build_ext4(&tree, &build.join(ROOTFS))?;
        let stored = StoredImage {
            id: image.id.clone(),
            names: Vec::new(),
            config: image.config.config.clone().unwrap_or_default(),
            size,
            imported: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            architecture: Some(image.config.architecture.clone()),
        };
        write_record(&build, &stored)?;
        let dest = self.image_dir(&image.id);
        if let Err(err) = std::fs::rename(&build, &dest) {
            // Another import of the same image finished first: that one stands.
            if self.stored(&image.id)?.is_none() {
                return Err(io_err(&dest)(err).into());
            }
        }
        let stored = self.stored(&image.id)?.unwrap_or(stored);
        Ok((self.add_name(stored, name)?, false))
    }

    fn stored(&self, id: &Digest) -> Result<Option<StoredImage>, StoreError> {
        let record = self.image_dir(id).join(RECORD);
        if !record.is_file() {
            return Ok(None);
        }
        read_record(&record).map(Some)
    }

    /// Gives `image` the name `name`, taking it from any other image that had it.
    fn add_name(
        &self,
        mut image: StoredImage,
        name: Option<String>,
    ) -> Result<StoredImage, StoreError> {
        let Some(name) = name else {
            return Ok(image);
        };
        for mut other in self.list()? {
            if other.id != image.id && other.names.contains(&name) {
                other.names.retain(|n| n != &name);
                write_record(&self.image_dir(&other.id), &other)?;
            }
        }
        if !image.names.contains(&name) {
            image.names.push(name);
            write_record(&self.image_dir(&image.id), &image)?;
        }
        Ok(image)
    }
}

/// An imported image's name: the one given, else the image's own, else its file's.
fn name_for(given: Option<&str>, own: Option<&str>, path: &Path) -> Option<String> {
    given.or(own).map(str::to_string).or_else(|| {
        path.file_stem()
            .map(|stem| stem.to_string_lossy().to_string())
    })
}

fn read_record(path: &Path) -> Result<StoredImage, StoreError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Record {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a record whole (a new file renamed over the old), so a reader sees one or the other.
fn write_record(dir: &Path, image: &StoredImage) -> Result<(), StoreError> {
    let path = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.{}", unique_name()));
    let text = serde_json::to_vec_pretty(image).map_err(|source| StoreError::Record {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}
