//! Container images for `mote run --image`: reading an OCI image layout or a `docker save`
//! archive (`source`, `archive`), verifying and applying its layers (`layer`), building a
//! root file system image from them (`rootfs`), keeping built images by id (`store`), and
//! running one as a microVM whose init is mote's own (`run`, `init_config`, `cpio`). Layers
//! may be plain tars or gzip- or zstd-compressed (`zstd`).

mod archive;
pub mod commands;
mod copy;
mod cpio;
mod digest;
pub mod init_config;
mod layer;
pub mod resolv;
mod rootfs;
pub mod run;
mod source;
pub mod store;
mod zstd;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use digest::Digest;
pub use source::Platform;
pub use store::{Store, StoredImage};

/// An image's configuration blob (OCI's image config; `docker save` writes the same).
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    pub rootfs: RootFs,
}

/// What a container of the image runs, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    #[error("layer {layer}: {source}")]
    Layer {
        layer: String,
        source: layer::LayerError,
    },
    #[error("layer {layer}: cannot read {path}: {source}")]
    LayerRead {
        layer: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("layer {layer}: its {what} digest is {actual}, not {expected}: the image is corrupt")]
    LayerDigest {
        layer: String,
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Applies the image's layers in order onto `root`, verifying each layer's digests (of its
/// blob, when the image names it, and of its tar) in the same pass.
fn unpack_layers(image: &source::SourceImage, root: &Path) -> Result<(), ImageError> {
    for layer in &image.layers {
        let name = layer
            .blob_digest
            .as_ref()
            .unwrap_or(&layer.diff_id)
            .to_string();
        let read_err = |source| ImageError::LayerRead {
            layer: name.clone(),
            path: layer.path.clone(),
            source,
        };
        let file = std::fs::File::open(&layer.path).map_err(read_err)?;
        let mut blob = digest::HashingReader::new(BufReader::with_capacity(1 << 16, file));
        let diff_id = {
            let decoded: Box<dyn Read + '_> = match layer.compression {
                source::Compression::Gzip => Box::new(flate2::read::GzDecoder::new(&mut blob)),
                source::Compression::Zstd => {
                    Box::new(zstd::ZstdDecoder::new(BufReader::new(&mut blob)))
                }
                source::Compression::None => Box::new(&mut blob),
            };
            let mut tar = digest::HashingReader::new(decoded);
            let applied = layer::apply_layer(root, &mut tar);
            // A corrupt blob most often breaks the tar stream: say which digest is wrong
            // rather than how the tar broke, when it is.
            let actual = tar.finish().map_err(read_err);
            match (applied, actual) {
                (Ok(()), Ok(actual)) => actual,
                (Err(source), _) => {
                    return Err(self::check_blob_after_failure(layer, &name).unwrap_or(
                        ImageError::Layer {
                            layer: name.clone(),
                            source,
                        },
                    ))
                }
                (Ok(()), Err(err)) => return Err(err),
            }
        };
        let blob_actual = blob.finish().map_err(read_err)?;
        if let Some(expected) = &layer.blob_digest {
            if &blob_actual != expected {
                return Err(ImageError::LayerDigest {
                    layer: name,
                    what: "blob",
                    expected: expected.clone(),
                    actual: blob_actual,
                });
            }
        }
        if diff_id != layer.diff_id {
            return Err(ImageError::LayerDigest {
                layer: name,
                what: "uncompressed tar (diff_id)",
                expected: layer.diff_id.clone(),
                actual: diff_id,
            });
        }
    }
    Ok(())
}

/// After a layer failed to apply: the digest mismatch to report instead, when its blob is not
/// what the image says.
fn check_blob_after_failure(layer: &source::Layer, name: &str) -> Option<ImageError> {
    let expected = layer.blob_digest.as_ref()?;
    let file = std::fs::File::open(&layer.path).ok()?;
    let actual = digest::HashingReader::new(BufReader::new(file))
        .finish()
        .ok()?;
    (&actual != expected).then(|| ImageError::LayerDigest {
        layer: name.to_string(),
        what: "blob",
        expected: expected.clone(),
        actual,
    })
}
