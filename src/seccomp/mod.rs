//! Per-thread seccomp filters. Each kind of thread runs under its own allow-list, written as
//! JSON in `resources/seccomp/` and compiled to BPF by `build.rs`; anything else kills the
//! process. Threads install theirs before they touch anything a guest or a client controls:
//! workers through [`crate::thread::spawn_named`], the main thread in two steps (see
//! [`Filter::Build`] and [`Filter::Vmm`]). Filters stack and are inherited by threads spawned
//! later, so a thread spawned by the main thread runs under `build` and its own filter.

pub mod dispatch;
pub mod format;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use log::{debug, info};
use seccompiler::sock_filter;

use format::FilterMap;

use crate::host_file::{self, HostFileError};

// The filters compiled from `resources/seccomp/<target>.json` at build time: `BUILT_IN`, each
// filter's name and instructions.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error(transparent)]
    Read(#[from] HostFileError),
    #[error("invalid seccomp filter file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the seccomp filter file {path} has no `{name}` filter")]
    Missing { path: PathBuf, name: &'static str },
    #[error("cannot install the `{name}` seccomp filter: {source}")]
    Install {
        name: &'static str,
        source: seccompiler::Error,
    },
}

/// The kinds of filter, one per kind of thread (the main thread has two, one after the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// The main thread once start-up is done: it serves pre-boot API requests and builds the
    /// VM. Every thread spawned from then on inherits it, so it allows all that `vcpu` does.
    Build,
    /// Stacked on `build` once the VM is built, before the event loop serves the guest: the
    /// running monitor's main thread.
    Vmm,
    /// The API thread (`mote_api`), from its start.
    Api,
    /// Each vCPU thread (`mote_vcpu{N}`), from its start.
    Vcpu,
    /// The stall watch of a VM restored through the Uffd memory backend
    /// (`mote_uffd_watch`, `snapshot/uffd/watch.rs`), from its start.
    UffdWatch,
    /// The threads of the `Lazy` memory backend's pager (`mote_pager`, `mote_prefetch`,
    /// `snapshot/lazy/pager.rs`), from their start.
    LazyPager,
}

impl Filter {
    pub const ALL: [Filter; 6] = [
        Filter::Build,
        Filter::Vmm,
        Filter::Api,
        Filter::Vcpu,
        Filter::UffdWatch,
        Filter::LazyPager,
    ];

    /// The filter's key in the JSON file.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Build => "build",
            Filter::Vmm => "vmm",
            Filter::Api => "api",
            Filter::Vcpu => "vcpu",
            Filter::UffdWatch => "uffd_watch",
            Filter::LazyPager => "lazy_pager",
        }
    }
}

/// Where the filters come from (`--no-seccomp`, `--seccomp-filter PATH`, or built in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SeccompConfig {
    #[default]
    BuiltIn,
    /// A JSON file (seccompiler's format, compiled at start-up) or a compiled one.
    Custom(PathBuf),
    Disabled,
}

/// A filter's instructions: the built-in ones are the binary's static data, used in place.
#[derive(Debug, Clone)]
enum Program {
    BuiltIn(&'static [sock_filter]),
    Loaded(Arc<[sock_filter]>),
}

impl std::ops::Deref for Program {
    type Target = [sock_filter];

    fn deref(&self) -> &[sock_filter] {
        match self {
            Program::BuiltIn(program) => program,
            Program::Loaded(program) => program,
        }
    }
}

/// One thread's filter, cheap to clone and send to the thread that installs it; empty when
/// filtering is off.
#[derive(Debug, Clone, Default)]
pub struct ThreadFilter {
    name: &'static str,
    program: Option<Program>,
}

impl ThreadFilter {
    /// Installs the filter on the calling thread; from here on, a call outside it kills the
    /// process.
    pub fn apply(&self) -> Result<(), SeccompError> {
        let Some(program) = &self.program else {
            return Ok(());
        };
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
            name: self.name,
            source,
        })?;
        debug!("seccomp filter `{}` installed", self.name);
        Ok(())
    }

    pub fn is_enabled(&self) -> bool {
        self.program.is_some()
    }
}

/// The filters for every kind of thread.
#[derive(Debug, Clone, Default)]
pub struct SeccompFilters {
    build: ThreadFilter,
    vmm: ThreadFilter,
    api: ThreadFilter,
    vcpu: ThreadFilter,
    uffd_watch: ThreadFilter,
    lazy_pager: ThreadFilter,
}

impl SeccompFilters {
    /// No filtering (`--no-seccomp`).
    pub fn disabled() -> Self {
        Self::default()
    }

    pub fn load(config: &SeccompConfig) -> Result<Self, SeccompError> {
        match config {
            SeccompConfig::Disabled => {
                info!("seccomp filtering is off (--no-seccomp)");
                Ok(Self::disabled())
            }
            SeccompConfig::BuiltIn => Ok(Self::built_in()),
            SeccompConfig::Custom(path) => {
                let filters = read_filter_file(path)?;
                info!("seccomp filters from {}", path.display());
                Self::from_map(filters, path)
            }
        }
    }

    fn built_in() -> Self {
        let take = |filter: Filter| ThreadFilter {
            name: filter.name(),
            // A start-up invariant: the JSON has every kind (a test checks it), and a missing
            // one must not leave its threads unfiltered.
            program: Some(Program::BuiltIn(
                BUILT_IN
                    .iter()
                    .find(|(name, _)| *name == filter.name())
                    .map(|(_, program)| *program)
                    .expect("resources/seccomp/ has a filter for every kind of thread"),
            )),
        };
        Self {
            build: take(Filter::Build),
            vmm: take(Filter::Vmm),
            api: take(Filter::Api),
            vcpu: take(Filter::Vcpu),
            uffd_watch: take(Filter::UffdWatch),
            lazy_pager: take(Filter::LazyPager),
        }
    }

    fn from_map(mut filters: FilterMap, path: &Path) -> Result<Self, SeccompError> {
        let mut take = |filter: Filter| {
            let program = filters.remove(filter.name()).ok_or(SeccompError::Missing {
                path: path.to_path_buf(),
                name: filter.name(),
            })?;
            Ok::<_, SeccompError>(ThreadFilter {
                name: filter.name(),
                program: Some(Program::Loaded(program.into())),
            })
        };
        Ok(Self {
            build: take(Filter::Build)?,
            vmm: take(Filter::Vmm)?,
            api: take(Filter::Api)?,
            vcpu: take(Filter::Vcpu)?,
            uffd_watch: take(Filter::UffdWatch)?,
            lazy_pager: take(Filter::LazyPager)?,
        })
    }

    pub fn get(&self, filter: Filter) -> ThreadFilter {
        match filter {
            Filter::Build => self.build.clone(),
            Filter::Vmm => self.vmm.clone(),
            Filter::Api => self.api.clone(),
            Filter::Vcpu => self.vcpu.clone(),
            Filter::UffdWatch => self.uffd_watch.clone(),
            Filter::LazyPager => self.lazy_pager.clone(),
        }
    }

    /// Installs `filter` on the calling thread.
    pub fn apply(&self, filter: Filter) -> Result<(), SeccompError> {
        self.get(filter).apply()
    }
}

/// The filters this process runs under, chosen once at start-up.
static PROCESS_FILTERS: OnceLock<SeccompFilters> = OnceLock::new();

/// Sets the filters for the rest of the process's life; the first call wins (the binary makes
/// it once, before it spawns a thread).
pub fn init(filters: SeccompFilters) {
    if PROCESS_FILTERS.set(filters).is_err() {
        log::warn!("seccomp filters were already chosen; keeping the first");
    }
}

/// The filter for threads of kind `filter`: none when [`init`] was not called (a library user
/// or a unit test that runs no guest-facing thread).
pub fn thread_filter(filter: Filter) -> ThreadFilter {
    PROCESS_FILTERS
        .get()
        .map(|filters| filters.get(filter))
        .unwrap_or_default()
}

/// Installs `filter` on the calling thread (the main thread's two steps).
pub fn apply(filter: Filter) -> Result<(), SeccompError> {
    thread_filter(filter).apply()
}

/// The largest `--seccomp-filter` file read (mote's own JSON is some 30 KiB).
const FILTER_FILE_MAX_BYTES: u64 = 1 << 20;

/// Reads a `--seccomp-filter` file: the compiled form when it starts with [`format::MAGIC`],
/// JSON in seccompiler's format otherwise.
fn read_filter_file(path: &Path) -> Result<FilterMap, SeccompError> {
    let bytes = host_file::read_capped("the seccomp filter file", path, FILTER_FILE_MAX_BYTES)?;
    let invalid = |reason: String| SeccompError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.starts_with(format::MAGIC) {
        return format::deserialize(&bytes).map_err(|err| invalid(err.to_string()));
    }
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|err| invalid(err.to_string()))?;
    let compiled = seccompiler::compile_from_json(bytes.as_slice(), arch)
        .map_err(|err| invalid(err.to_string()))?;
    Ok(compiled
        .into_iter()
        .map(|(name, program)| (name, dispatch::with_search_dispatch(&program)))
        .collect())
}

#[cfg(test)]
mod dispatch_tests;
#[cfg(all(test, target_arch = "x86_64"))]
mod rule_tests;
#[cfg(test)]
mod tests;
