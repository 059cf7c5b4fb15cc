//! The embedded store: all documents in one JSON file, for a single host.
//!
//! Readers read the file as it is (it is only ever replaced whole, by rename, so a
//! reader sees one consistent revision). Writers hold an exclusive `flock` on a
//! sibling lock file, re-read, check every expectation, write a temporary file,
//! fsync it, rename it over the store and fsync the directory: a crash leaves either
//! the old or the new store, never half of one.
//!
//! Because the file is only ever replaced whole, its identity (inode, size, mtime)
//! changes with every write; parsed contents are cached under that identity, so the
//! several reads of one allocation parse the file once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Expect, Store, StoreError, Versioned, WatchEvent, WatchReceiver, Write};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Contents {
    revision: u64,
    keys: BTreeMap<String, Entry>,
}

/// Values stay raw JSON text: reading the file only splits it into documents, and
/// writing copies them back verbatim; each reader decodes just what it asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(rename = "rev")]
    revision: u64,
    value: Box<RawValue>,
}

pub struct FileStore {
    path: PathBuf,
    lock_path: PathBuf,
    cache: Mutex<Option<(FileId, Arc<Contents>)>>,
}

/// What tells one version of the store file from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// How often a watcher looks at the file for new revisions. A look that finds the
/// same file costs an open and an fstat (the parse is cached by file identity).
const WATCH_POLL: Duration = Duration::from_millis(10);

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        let path = path.into();
        let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
        lock_name.push(".lock");
        let lock_path = path.with_file_name(lock_name);
        FileStore {
            path,
            lock_path,
            cache: Mutex::new(None),
        }
    }

    fn io_error(&self, what: &str, err: std::io::Error) -> StoreError {
        let location = self.location();
        let reason = format!("{what}: {err}");
        match err.kind() {
            ErrorKind::PermissionDenied
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::StorageFull => StoreError::Unavailable { location, reason },
            _ => StoreError::Io { location, reason },
        }
    }

    fn read(&self) -> Result<Arc<Contents>, StoreError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (id, contents) =
            read_contents(&self.path, cache.as_ref()).map_err(|err| match err {
                ReadError::Io(e) => self.io_error(&format!("read {}", self.path.display()), e),
                ReadError::Parse(e) => StoreError::Corrupt {
                    location: self.location(),
                    key: "(whole file)".into(),
                    reason: e.to_string(),
                },
            })?;
        *cache = id.map(|id| (id, contents.clone()));
        Ok(contents)
    }

    fn lock(&self) -> Result<File, StoreError> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| self.io_error(&format!("create {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| self.io_error(&format!("open {}", self.lock_path.display()), e))?;
        file.lock()
            .map_err(|e| self.io_error(&format!("lock {}", self.lock_path.display()), e))?;
        Ok(file)
    }

    fn write_atomically(&self, contents: Contents) -> Result<(), StoreError> {
        let tmp = self
            .path
            .with_extension(format!("tmp.{}", std::process::id()));
        let data = serde_json::to_vec(&contents).expect("store contents serialise");
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(&data)?;
            file.sync_data()?;
            let id = FileId::of(&file.metadata()?);
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            Ok(id)
        })();
        match result {
            Ok(id) => {
                *self.cache.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((id, Arc::new(contents)));
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(self.io_error(&format!("write {}", self.path.display()), e))
            }
        }
    }

    fn commit_locked(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        let _lock = self.lock()?;
        let current = self.read()?;
        let mut contents = Contents::clone(&current);
        for write in &writes {
            let (key, expect) = match write {
                Write::Put { key, expect, .. } | Write::Delete { key, expect } => (key, expect),
            };
            let current = contents.keys.get(key).map(|e| e.revision);
            let holds = match (expect, current) {
                (Expect::Absent, None) => true,
                (Expect::Revision(want), Some(have)) => *want == have,
                _ => false,
            };
            if !holds {
                return Err(StoreError::Conflict { key: key.clone() });
            }
        }
        contents.revision += 1;
        let revision = contents.revision;
        for write in writes {
            match write {
                Write::Put { key, value, .. } => {
                    let value = RawValue::from_string(value).map_err(|e| StoreError::Corrupt {
                        location: self.location(),
                        key: key.clone(),
                        reason: format!("refusing to write a value that is not JSON: {e}"),
                    })?;
                    contents.keys.insert(key, Entry { revision, value });
                }
                Write::Delete { key, .. } => {
                    contents.keys.remove(&key);
                }
            }
        }
        self.write_atomically(contents)?;
        Ok(revision)
    }
}

enum ReadError {
    Io(std::io::Error),
    Parse(serde_json::Error),
}

type Cached = (FileId, Arc<Contents>);

/// Reads and parses the store file, unless it is still the version in `cached`. A
/// missing file is an empty store (with no id).
fn read_contents(
    path: &Path,
    cached: Option<&Cached>,
) -> Result<(Option<FileId>, Arc<Contents>), ReadError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok((None, Arc::default())),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let id = FileId::of(&file.metadata().map_err(ReadError::Io)?);
    if let Some((cached_id, contents)) = cached {
        if *cached_id == id {
            return Ok((Some(id), contents.clone()));
        }
    }
    let mut data = Vec::with_capacity(id.size as usize);
    std::io::Read::read_to_end(&mut file, &mut data).map_err(ReadError::Io)?;
    let contents = serde_json::from_slice(&data).map_err(ReadError::Parse)?;
    Ok((Some(id), Arc::new(contents)))
}

fn snapshot_under(contents: &Contents, prefix: &str) -> BTreeMap<String, Entry> {
    contents
        .keys
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[async_trait]
impl Store for FileStore {
    fn location(&self) -> String {
        format!("file://{}", self.path.display())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let contents = self.read()?;
        Ok(contents.keys.get(key).map(|e| Versioned {
            value: e.value.get().to_string(),
            revision: e.revision,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let contents = self.read()?;
        Ok(snapshot_under(&contents, prefix)
            .into_iter()
            .map(|(k, e)| {
                let v = Versioned {
                    value: e.value.get().to_string(),
                    revision: e.revision,
                };
                (k, v)
            })
            .collect())
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        // Blocking file I/O is fine here: the callers are the short-lived CNI binary
        // and ipamctl on current-thread runtimes; the agent runs it off its reactor.
        self.commit_locked(writes)
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchReceiver, StoreError> {
        let (tx, rx) = mpsc::channel(1024);
        let path = self.path.clone();
        let prefix = prefix.to_string();
        let current = self.read()?;
        let mut seen = snapshot_under(&current, &prefix);
        let mut last: Option<Cached> = None;
        // Report what changed after `after_revision` in the first snapshot too.
        seen.retain(|_, e| e.revision <= after_revision);
        tokio::spawn(async move {
            loop {
                let unchanged =
                    |id: &Option<FileId>| id.is_some() && *id == last.as_ref().map(|(i, _)| *i);
                if let Ok((id, contents)) = read_contents(&path, last.as_ref()) {
                    if unchanged(&id) {
                        tokio::time::sleep(WATCH_POLL).await;
                        continue;
                    }
                    last = id.map(|id| (id, contents.clone()));
                    let now = snapshot_under(&contents, &prefix);
                    for (key, entry) in &now {
                        if seen.get(key).map(|e| e.revision) != Some(entry.revision) {
                            let value = Versioned {
                                value: entry.value.get().to_string(),
                                revision: entry.revision,
                            };
                            let event = WatchEvent::Put {
                                key: key.clone(),
                                value,
                            };
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    for key in seen.keys().filter(|k| !now.contains_key(*k)) {
                        let event = WatchEvent::Delete {
                            key: key.clone(),
                            revision: contents.revision,
                        };
                        if tx.send(Ok(event)).await.is_err() {
                            return;
                        }
                    }
                    seen = now;
                }
                tokio::time::sleep(WATCH_POLL).await;
            }
        });
        Ok(rx)
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        // Taking the lock proves the lock file is writable; the store file is replaced
        // by rename, so the directory must be writable too.
        let probe = self
            .path
            .with_extension(format!("probe.{}", std::process::id()));
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| self.io_error(&format!("write in {}", probe.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(key: &str, value: serde_json::Value, expect: Expect) -> Write {
        Write::Put {
            key: key.into(),
            value: value.to_string(),
            expect,
        }
    }

    #[tokio::test]
    async fn compare_and_swap_applies_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("store"));
        let rev = store
            .commit(vec![put("a", json!(1), Expect::Absent)])
            .await
            .unwrap();
        assert_eq!(rev, 1);
        // Second write of "a" as absent conflicts and "b" must not be written either.
        let err = store
            .commit(vec![
                put("b", json!(2), Expect::Absent),
                put("a", json!(3), Expect::Absent),
            ])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { ref key } if key == "a"));
        assert_eq!(store.get("b").await.unwrap(), None);
        store
            .commit(vec![put("a", json!(4), Expect::Revision(1))])
            .await
            .unwrap();
        let a = store.get("a").await.unwrap().unwrap();
        assert_eq!((a.value.as_str(), a.revision), ("4", 2));
        store
            .commit(vec![Write::Delete {
                key: "a".into(),
                expect: Expect::Revision(2),
            }])
            .await
            .unwrap();
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn list_returns_only_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("store"));
        for key in ["blocks/1", "blocks/2", "handles/x", "blocksx"] {
            store
                .commit(vec![put(key, json!(key), Expect::Absent)])
                .await
                .unwrap();
        }
        let keys: Vec<String> = store
            .list("blocks/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["blocks/1", "blocks/2"]);
    }

    #[tokio::test]
    async fn watch_reports_puts_and_deletes_after_a_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("store"));
        store
            .commit(vec![put("n/a", json!(1), Expect::Absent)])
            .await
            .unwrap();
        let mut rx = store.watch("n/", 1).await.unwrap();
        store
            .commit(vec![put("n/b", json!(2), Expect::Absent)])
            .await
            .unwrap();
        store
            .commit(vec![Write::Delete {
                key: "n/a".into(),
                expect: Expect::Revision(1),
            }])
            .await
            .unwrap();
        let mut events = Vec::new();
        while events.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("watch event in time")
                .unwrap()
                .unwrap();
            events.push(event);
        }
        assert!(events
            .iter()
            .any(|e| matches!(e, WatchEvent::Put { key, .. } if key == "n/b")));
        assert!(events
            .iter()
            .any(|e| matches!(e, WatchEvent::Delete { key, .. } if key == "n/a")));
    }
}
