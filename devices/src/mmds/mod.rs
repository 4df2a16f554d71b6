//! MMDS, Firecracker's microVM metadata service: a JSON document the host fills through the
//! API, which the guest reads over HTTP at a link-local address (169.254.169.254 unless
//! configured) on the network interfaces allowed to reach it. Frames for that address never
//! reach the TAP: virtio-net hands them to this module and puts its answers on the guest's
//! receive queue.
//!
//! One job per module: [`store`] (the document: merge patches, the size limit, paths, IMDS
//! text), [`token`] (version 2 session tokens), [`http`] (the guest's requests and the
//! answers) and [`stack`] (which frames are MMDS's, and ARP and TCP for them).
//!
//! Crates: TCP is smoltcp's (0.12, the last release for our minimum Rust; `default-features =
//! false` with Ethernet, IPv4 and TCP only). It is a complete, well-tested TCP (windows,
//! retransmission, out-of-window and malformed segments, RST, TIME-WAIT) with fixed buffers
//! per socket and no threads or I/O of its own, so bounding memory is a matter of bounding
//! sockets and queues, which [`stack`] does. A TCP of our own would have to get all of that
//! right against a hostile guest; Firecracker's "dumbo" is not on crates.io. HTTP requests are
//! parsed with httparse, which the API already uses (zero-copy, no allocation, bounded by the
//! buffer it is given).
//!
//! Snapshots: as Firecracker, a snapshot keeps the MMDS configuration (version, interfaces,
//! address, `imds_compat`: it is part of the saved `mmds-config`) but neither the data store
//! nor the session tokens nor open connections. A restored VM's store is empty until the host
//! fills it (`PUT /mmds`, or mote's `mmds_data` in `PUT /snapshot/load`, which gives a clone
//! its own identity), tokens must be asked for again (a V2 client gets 401 and does), and a
//! connection open at the snapshot is reset.

pub mod http;
pub mod stack;
pub mod store;
pub mod token;

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use self::stack::{is_mmds_frame, MmdsStack, StackError, DEFAULT_IPV4_ADDR};
pub use self::store::{DataStore, StoreError, DEFAULT_SIZE_LIMIT};
use self::token::TokenAuthority;

/// Which MMDS the guest talks to: V1 answers any GET; V2 wants a session token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// The service every allowed interface answers from: the store, how it answers, the tokens.
#[derive(Debug)]
pub struct Mmds {
    pub store: DataStore,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: TokenAuthority,
}

/// The one service shared by the API and the interfaces.
pub type SharedMmds = Arc<Mutex<Mmds>>;

impl Mmds {
    /// An empty V1 service whose store holds at most `size_limit` bytes.
    pub fn new(size_limit: usize) -> Self {
        Self {
            store: DataStore::new(size_limit),
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: TokenAuthority::default(),
        }
    }

    pub fn shared(size_limit: usize) -> SharedMmds {
        Arc::new(Mutex::new(Self::new(size_limit)))
    }

    /// Answers as `version` from now on (tokens given before are forgotten when it changes),
    /// always as IMDS text when `imds_compat`.
    pub fn set_options(&mut self, version: MmdsVersion, imds_compat: bool) {
        if version != self.version {
            self.tokens.clear();
        }
        self.version = version;
        self.imds_compat = imds_compat;
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }
}
