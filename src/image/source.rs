//! Reading an image as it comes: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) or a `docker save` directory (`manifest.json`, `<id>.json`,
//! `<layer>/layer.tar` or blobs), unpacked from its tar archive first (`archive.rs`). The result
//! names the image's configuration and its layers in order, each with the digests it must have.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::digest::Digest;
use super::ImageConfig;

/// The largest JSON document read whole (index, manifest, configuration): real ones are a few
/// KiB; more is a wrong file.
pub const JSON_MAX_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: neither an OCI image layout (oci-layout, index.json) nor a `docker save` directory (manifest.json)")]
    NotAnImage { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {JSON_MAX_BYTES} bytes: not an image's JSON document")]
    TooLarge { path: PathBuf },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: digest is {actual}, not {expected} as the image says")]
    DigestMismatch {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },
    #[error("{path} lists no image")]
    Empty { path: PathBuf },
    #[error("image {name} is for {image_arch}, {wanted}; no image for {arch} is in it", arch = wanted.arch)]
    WrongArch {
        name: String,
        image_arch: String,
        wanted: Platform,
    },
    #[error("image {name} is for the {os} operating system, not linux")]
    WrongOs { name: String, os: String },
    #[error("layer {digest} has media type {media_type}, which mote cannot unpack (tar, tar+gzip and tar+zstd only)")]
    LayerMediaType { digest: Digest, media_type: String },
    #[error(
        "manifest {digest} has media type {media_type}, which is not an image manifest or index"
    )]
    ManifestMediaType { digest: Digest, media_type: String },
    #[error("{path}: the configuration lists {diff_ids} layer digests for {layers} layers")]
    LayerCount {
        path: PathBuf,
        diff_ids: usize,
        layers: usize,
    },
    #[error("{path}: path {entry:?} leaves the image")]
    PathOutside { path: PathBuf, entry: String },
}

/// The architecture an image is read for (OCI's name for it, as Go's GOARCH): this host's,
/// or another that `mote image import --platform` chose (to fill a store for another host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    pub arch: &'static str,
    pub chosen: bool,
}

impl Platform {
    /// This host's: the guests it runs.
    pub const HOST: Platform = Platform {
        arch: crate::arch::OCI_ARCH,
        chosen: false,
    };

    /// `linux/ARCH` (or `ARCH`), ARCH being one mote runs guests of: `amd64` or `arm64`.
    pub fn parse(spec: &str) -> Result<Platform, String> {
        let arch = spec.strip_prefix("linux/").unwrap_or(spec);
        let arch = match arch {
            "amd64" => "amd64",
            "arm64" | "arm64/v8" => "arm64",
            _ => {
                return Err(format!(
                    "{spec:?}: mote runs linux/amd64 and linux/arm64 images"
                ))
            }
        };
        Ok(Platform { arch, chosen: true })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.chosen {
            write!(f, "--platform asks for linux/{}", self.arch)
        } else {
            write!(f, "this host runs {} guests", self.arch)
        }
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One layer: its blob, the digest the blob must have (OCI layouts name it; `docker save`'s
/// old form does not) and the digest its uncompressed tar must have (the configuration's
/// `rootfs.diff_ids`).
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub blob_digest: Option<Digest>,
    pub diff_id: Digest,
    pub compression: Compression,
}

/// An image read from its source, verified up to its layers (which are verified as they are
/// unpacked).
#[derive(Debug)]
pub struct SourceImage {
    /// The configuration's digest: the image's id, as Docker's, whatever form it came in.
    pub id: Digest,
    /// The name the source gives it, if any.
    pub name: Option<String>,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: Digest,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// An index entry's `platform`.
#[derive(Deserialize)]
struct DescriptorPlatform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Reads a JSON document whole, with a ceiling.
fn read_json_bytes(path: &Path) -> Result<Vec<u8>, SourceError> {
    let read = |source| SourceError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > JSON_MAX_BYTES {
        return Err(SourceError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(read)
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T, SourceError> {
    serde_json::from_slice(bytes).map_err(|source| SourceError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A relative path inside the image directory, refusing one that would leave it.
fn inside(dir: &Path, entry: &str) -> Result<PathBuf, SourceError> {
    let relative = Path::new(entry);
    let safe = relative.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if !safe || entry.is_empty() {
        return Err(SourceError::PathOutside {
            path: dir.to_path_buf(),
            entry: entry.to_string(),
        });
    }
    Ok(dir.join(relative))
}

/// Reads the image in `dir`, choosing the manifest for `platform`
/// where the source holds several.
pub fn read_image_dir(dir: &Path, platform: Platform) -> Result<SourceImage, SourceError> {
    if dir.join("oci-layout").is_file() && dir.join("index.json").is_file() {
        read_oci_layout(dir, platform)
    } else if dir.join("manifest.json").is_file() {
        read_docker_save(dir, platform)
    } else {
        Err(SourceError::NotAnImage {
            path: dir.to_path_buf(),
        })
    }
}

/// A blob of an OCI layout, read whole and verified.
fn read_blob(dir: &Path, digest: &Digest) -> Result<Vec<u8>, SourceError> {
    let path = blob_path(dir, digest);
    let bytes = read_json_bytes(&path)?;
    verify(&path, &bytes, digest)?;
    Ok(bytes)
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(digest.hex())
}

fn verify(path: &Path, bytes: &[u8], expected: &Digest) -> Result<(), SourceError> {
    let actual = Digest::of(bytes);
    if &actual != expected {
        return Err(SourceError::DigestMismatch {
            path: path.to_path_buf(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

/// The entry of `manifests` for `platform`: one whose platform is linux/its arch, or one
/// without a platform (the configuration says then). An image only for other arches is
/// refused, naming both.
fn choose<'a>(
    manifests: &'a [Descriptor],
    platform: Platform,
    path: &Path,
) -> Result<&'a Descriptor, SourceError> {
    let fits = |d: &&Descriptor| {
        d.platform
            .as_ref()
            .is_none_or(|p| p.architecture == platform.arch && p.os == "linux")
    };
    if let Some(found) = manifests.iter().find(fits) {
        return Ok(found);
    }
    let first = manifests.first().ok_or_else(|| SourceError::Empty {
        path: path.to_path_buf(),
    })?;
    let arches: Vec<String> = manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| format!("{}/{}", p.os, p.architecture))
        .collect();
    Err(SourceError::WrongArch {
        name: ref_name(first).unwrap_or_else(|| path.display().to_string()),
        image_arch: arches.join(", "),
        wanted: platform,
    })
}

fn ref_name(descriptor: &Descriptor) -> Option<String> {
    [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ]
    .iter()
    .find_map(|key| descriptor.annotations.get(*key).cloned())
}

fn read_oci_layout(dir: &Path, platform: Platform) -> Result<SourceImage, SourceError> {
    let index_path = dir.join("index.json");
    let index: Index = parse(&index_path, &read_json_bytes(&index_path)?)?;
    let mut descriptor = choose(&index.manifests, platform, &index_path)?;
    let name = ref_name(descriptor);
    // An index may point at a further index (a multi-arch image): follow it to one manifest.
    let mut nested;
    let manifest = loop {
        let bytes = read_blob(dir, &descriptor.digest)?;
        let path = blob_path(dir, &descriptor.digest);
        let manifest: Manifest = parse(&path, &bytes)?;
        let media_type = if manifest.media_type.is_empty() {
            descriptor.media_type.clone()
        } else {
            manifest.media_type.clone()
        };
        if INDEX_TYPES.contains(&media_type.as_str()) || !manifest.manifests.is_empty() {
            nested = manifest.manifests;
            descriptor = choose(&nested, platform, &path)?;
            continue;
        }
        if !MANIFEST_TYPES.contains(&media_type.as_str()) && manifest.config.is_none() {
            return Err(SourceError::ManifestMediaType {
                digest: descriptor.digest.clone(),
                media_type,
            });
        }
        break manifest;
    };
    let config_descriptor = manifest.config.ok_or_else(|| SourceError::Empty {
        path: blob_path(dir, &descriptor.digest),
    })?;
    let config_path = blob_path(dir, &config_descriptor.digest);
    let config: ImageConfig = parse(&config_path, &read_blob(dir, &config_descriptor.digest)?)?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(SourceError::LayerCount {
            path: config_path,
            diff_ids: diff_ids.len(),
            layers: manifest.layers.len(),
        });
    }
    let layers = manifest
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            Ok(Layer {
                path: blob_path(dir, &layer.digest),
                blob_digest: Some(layer.digest.clone()),
                diff_id: diff_id.clone(),
                compression: compression_of(&layer.media_type, &layer.digest)?,
            })
        })
        .collect::<Result<_, SourceError>>()?;
    let image = SourceImage {
        id: config_descriptor.digest,
        name,
        config,
        layers,
    };
    check_platform(&image, platform)?;
    Ok(image)
}

fn compression_of(media_type: &str, digest: &Digest) -> Result<Compression, SourceError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        // The second is containerd's name for Docker's form (Docker's schema has none).
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Ok(Compression::Zstd),
        other => Err(SourceError::LayerMediaType {
            digest: digest.clone(),
            media_type: other.to_string(),
        }),
    }
}

fn read_docker_save(dir: &Path, platform: Platform) -> Result<SourceImage, SourceError> {
    let manifest_path = dir.join("manifest.json");
    let entries: Vec<DockerManifestEntry> =
        parse(&manifest_path, &read_json_bytes(&manifest_path)?)?;
    let entry = entries.first().ok_or_else(|| SourceError::Empty {
        path: manifest_path.clone(),
    })?;
    let config_path = inside(dir, &entry.config)?;
    let config_bytes = read_json_bytes(&config_path)?;
    // The configuration's file is named by its digest: `<hex>.json` or `blobs/sha256/<hex>`.
    let stem = config_path
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json"))
        .unwrap_or_default();
    let id = match Digest::from_hex(stem) {
        Ok(expected) => {
            verify(&config_path, &config_bytes, &expected)?;
            expected
        }
        Err(_) => Digest::of(&config_bytes),
    };
    let config: ImageConfig = parse(&config_path, &config_bytes)?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != entry.layers.len() {
        return Err(SourceError::LayerCount {
            path: config_path,
            diff_ids: diff_ids.len(),
            layers: entry.layers.len(),
        });
    }
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let path = inside(dir, layer)?;
            // Newer `docker save` stores layers as blobs named by their digest, gzip or not.
            let blob_digest = layer
                .strip_prefix("blobs/sha256/")
                .and_then(|hex| Digest::from_hex(hex).ok());
            Ok(Layer {
                compression: sniff_compression(&path)?,
                path,
                blob_digest,
                diff_id: diff_id.clone(),
            })
        })
        .collect::<Result<_, SourceError>>()?;
    let image = SourceImage {
        id,
        name: entry
            .repo_tags
            .as_ref()
            .and_then(|tags| tags.first().cloned()),
        config,
        layers,
    };
    check_platform(&image, platform)?;
    Ok(image)
}

/// gzip's or zstd's magic number, for layers whose compression nothing names. A layer not there (a
/// first look at an archive, without its layers) is taken as uncompressed: reading it later
/// says it is missing.
fn sniff_compression(path: &Path) -> Result<Compression, SourceError> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Compression::None),
        Err(source) => {
            return Err(SourceError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut magic = Vec::with_capacity(4);
    file.take(4)
        .read_to_end(&mut magic)
        .map_err(|source| SourceError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(match magic.as_slice() {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}

/// The configuration's own word on the platform: an image for another arch is refused,
/// naming both.
fn check_platform(image: &SourceImage, platform: Platform) -> Result<(), SourceError> {
    let name = || {
        image
            .name
            .clone()
            .unwrap_or_else(|| image.id.short().to_string())
    };
    if image.config.architecture != platform.arch {
        return Err(SourceError::WrongArch {
            name: name(),
            image_arch: image.config.architecture.clone(),
            wanted: platform,
        });
    }
    if image.config.os != "linux" {
        return Err(SourceError::WrongOs {
            name: name(),
            os: image.config.os.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_linux_amd64_or_arm64() {
        let arm = Platform::parse("linux/arm64").unwrap();
        assert_eq!((arm.arch, arm.chosen), ("arm64", true));
        assert_eq!(Platform::parse("amd64").unwrap().arch, "amd64");
        assert_eq!(Platform::parse("linux/arm64/v8").unwrap().arch, "arm64");
        for bad in ["linux/riscv64", "windows/amd64", "x86_64", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(arm.to_string(), "--platform asks for linux/arm64");
        assert_eq!(
            Platform::HOST.to_string(),
            format!("this host runs {} guests", crate::arch::OCI_ARCH)
        );
    }
}
