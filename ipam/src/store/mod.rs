//! The datastore abstraction: versioned JSON documents under one key prefix, written
//! only by compare-and-swap on each key's revision. Both backends (the embedded file
//! store and etcd) implement it with the same semantics.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

pub mod etcd;
pub mod file;

/// A document (JSON text, decoded by its reader) and the revision at which it was last
/// written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub revision: u64,
}

/// What a write expects to find before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist at exactly this revision.
    Revision(u64),
}

impl Expect {
    pub fn from_current(current: Option<&Versioned>) -> Expect {
        current.map_or(Expect::Absent, |v| Expect::Revision(v.revision))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Put {
        key: String,
        /// JSON text.
        value: String,
        expect: Expect,
    },
    Delete {
        key: String,
        expect: Expect,
    },
}

impl Write {
    pub fn key(&self) -> &str {
        match self {
            Write::Put { key, .. } | Write::Delete { key, .. } => key,
        }
    }
}

/// One part of a `Store::read`: a single key, or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Key(String),
    Prefix(String),
}

/// What one `Read` found: (key, document) pairs sorted by key; at most one for a
/// `Read::Key`.
pub type Found = Vec<(String, Versioned)>;

#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Put { key: String, value: Versioned },
    Delete { key: String, revision: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// One of the writes' expectations did not hold; nothing was written.
    #[error("conflicting update on {key}")]
    Conflict { key: String },
    /// The store cannot be reached or used right now; worth retrying later.
    #[error("datastore {location} unavailable: {reason}")]
    Unavailable { location: String, reason: String },
    #[error("datastore {location}: {reason}")]
    Io { location: String, reason: String },
    #[error("datastore {location}: corrupt document {key}: {reason}")]
    Corrupt {
        location: String,
        key: String,
        reason: String,
    },
    /// The store's files lost or changed what was committed: never read as less.
    #[error("datastore {location} is damaged: {reason}")]
    Damaged { location: String, reason: String },
    #[error("bad datastore URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
}

pub type WatchReceiver = mpsc::Receiver<Result<WatchEvent, StoreError>>;

#[async_trait]
pub trait Store: Send + Sync {
    /// Where the store lives, for messages.
    fn location(&self) -> String;

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Every key under `prefix`, sorted by key, read at one consistent revision.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// `list`, and a watch that goes on exactly from that listing: no change after it
    /// missed (a delete included), none it already showed repeated. (Watching from the
    /// newest document's revision instead can miss deletes, and fails once the store
    /// has compacted past it.)
    async fn list_and_watch(&self, prefix: &str) -> Result<(Found, WatchReceiver), StoreError>;

    /// Several reads at one consistent revision, in one round trip (one etcd
    /// transaction): an allocation needs four or five documents before it can plan.
    async fn read(&self, reads: &[Read]) -> Result<Vec<Found>, StoreError>;

    /// Applies all writes atomically if every expectation holds, else none and
    /// `StoreError::Conflict`. Returns the new store revision.
    async fn commit(&self, writes: Vec<Write>) -> Result<u64, StoreError>;

    /// Streams changes under `prefix` made after `after_revision`.
    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchReceiver, StoreError>;

    /// Checks that the store can be written (CNI STATUS).
    async fn check_writable(&self) -> Result<(), StoreError>;
}

/// Opens the store a datastore URL names: `file:///path` (the default embedded store)
/// or `etcd://host:port[,host:port]`.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    let bad = |reason: &str| StoreError::BadUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    if url.starts_with("etcd://") || url.starts_with("etcds://") {
        return Ok(Box::new(etcd::EtcdStore::new(etcd::EtcdConfig::from_url(
            url,
        )?)));
    }
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "file" => {
            // `file://relative/x` parses with host "relative" and path "/x": a second,
            // silently different store. Only `file:///absolute/path` is accepted.
            if let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) {
                return Err(bad(&format!(
                    "file:// URLs take an absolute path and no host (got host {host:?}); \
                     write file:///absolute/path"
                )));
            }
            if parsed.query().is_some() || parsed.fragment().is_some() {
                return Err(bad("a file:// URL takes no query or fragment"));
            }
            if parsed.path().is_empty() || parsed.path() == "/" {
                return Err(bad(
                    "file:// needs a path, e.g. file:///var/lib/calyx/store",
                ));
            }
            Ok(Box::new(file::FileStore::new(parsed.path())))
        }
        other => Err(bad(&format!(
            "unknown scheme {other:?}; use file:///path or etcd://host:port"
        ))),
    }
}

/// The path of the embedded store `url` names, when no store was ever written there:
/// a command that only reads must say so instead of reporting an empty store.
pub fn missing_file_store(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if parsed.scheme() != "file" {
        return None;
    }
    let store = file::FileStore::new(parsed.path());
    (!store.exists()).then(|| parsed.path().to_string())
}

/// Jittered exponential backoff for compare-and-swap retries.
pub fn conflict_backoff(attempt: u32) -> Duration {
    let base_us = 200u64 << attempt.min(6);
    Duration::from_micros(base_us / 2 + fastrand::u64(0..=base_us))
}
