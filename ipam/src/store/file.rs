//! The embedded store, for a single host: every document in a snapshot file plus an
//! append-only journal beside it (`<path>.journal`).
//!
//! A commit takes an exclusive `flock` on a sibling lock file, brings its view up to
//! date, checks every expectation and appends one journal line (the new revision and
//! its writes), then one fdatasync: a small append instead of rewriting every
//! document, so a commit costs the same however big the store is. Readers keep what
//! they parsed and replay only journal lines they have not seen; a line without its
//! newline (a crash mid-append) is ignored by readers and cut off by the next writer.
//!
//! When the journal outgrows the snapshot, the writer compacts: the whole state goes
//! to a new snapshot (temporary file, fsync, rename, fsync of the directory), then an
//! empty journal replaces the old one the same way. A reader that sees either file
//! replaced starts over from the snapshot, and journal lines at or below the
//! snapshot's revision are skipped, so a crash between the steps loses nothing.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Expect, Found, Read, Store, StoreError, Versioned, WatchEvent, WatchReceiver, Write};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Contents {
    revision: u64,
    keys: BTreeMap<String, Entry>,
}

/// Values stay raw JSON text: reading only splits the files into documents, and
/// writing copies them back verbatim; each reader decodes just what it asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(rename = "rev")]
    revision: u64,
    value: Box<RawValue>,
}

/// One commit, as a journal line.
#[derive(Debug, Serialize, Deserialize)]
struct JournalLine {
    rev: u64,
    writes: Vec<JournalWrite>,
}

/// A put (with its value) or a delete (without).
#[derive(Debug, Serialize, Deserialize)]
struct JournalWrite {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
}

impl Contents {
    fn apply(&mut self, line: JournalLine) {
        if line.rev <= self.revision {
            return; // already in the snapshot
        }
        for write in line.writes {
            match write.value {
                Some(value) => {
                    let entry = Entry {
                        revision: line.rev,
                        value,
                    };
                    self.keys.insert(write.key, entry);
                }
                None => {
                    self.keys.remove(&write.key);
                }
            }
        }
        self.revision = line.rev;
    }
}

/// What tells one version of a file from another.
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

enum ReadError {
    Io(std::io::Error),
    Parse(serde_json::Error),
}

impl From<std::io::Error> for ReadError {
    fn from(e: std::io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// What one reader has parsed of the two files.
#[derive(Debug, Clone, Default)]
struct View {
    snapshot: Option<FileId>,
    /// (dev, inode) of the journal read, and how far its complete lines go.
    journal: Option<(u64, u64)>,
    offset: u64,
    contents: Arc<Contents>,
}

impl View {
    /// Brings the view up to date with the files; says whether anything changed.
    fn refresh(&mut self, path: &Path, journal_path: &Path) -> Result<bool, ReadError> {
        let mut changed = false;
        if stat(path)? != self.snapshot {
            self.reload_snapshot(path)?;
            changed = true;
        }
        let mut journal = match File::open(journal_path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(changed),
            Err(e) => return Err(e.into()),
        };
        let meta = journal.metadata()?;
        let identity = (meta.dev(), meta.ino());
        if self.journal != Some(identity) {
            // A new journal (the first, or one left by a compaction): start over from
            // the snapshot it goes with.
            if self.journal.is_some() {
                self.reload_snapshot(path)?;
                changed = true;
            }
            self.journal = Some(identity);
            self.offset = 0;
        }
        if meta.size() <= self.offset {
            return Ok(changed);
        }
        journal.seek(SeekFrom::Start(self.offset))?;
        let mut data = Vec::with_capacity((meta.size() - self.offset) as usize);
        journal.read_to_end(&mut data)?;
        // Only complete lines: a torn last line is a commit that never finished.
        let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete == 0 {
            return Ok(changed);
        }
        let contents = Arc::make_mut(&mut self.contents);
        for line in data[..complete].split(|b| *b == b'\n') {
            if !line.is_empty() {
                contents.apply(serde_json::from_slice(line).map_err(ReadError::Parse)?);
            }
        }
        self.offset += complete as u64;
        Ok(true)
    }

    fn reload_snapshot(&mut self, path: &Path) -> Result<(), ReadError> {
        let (id, contents) = match File::open(path) {
            Ok(mut file) => {
                let id = FileId::of(&file.metadata()?);
                let mut data = Vec::with_capacity(id.size as usize);
                file.read_to_end(&mut data)?;
                (
                    Some(id),
                    serde_json::from_slice(&data).map_err(ReadError::Parse)?,
                )
            }
            Err(e) if e.kind() == ErrorKind::NotFound => (None, Contents::default()),
            Err(e) => return Err(e.into()),
        };
        self.snapshot = id;
        self.contents = Arc::new(contents);
        self.offset = 0;
        self.journal = None;
        Ok(())
    }
}

fn stat(path: &Path) -> Result<Option<FileId>, std::io::Error> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(FileId::of(&meta))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A journal shorter than this is never compacted.
const COMPACT_MIN: u64 = 256 * 1024;

/// How often a watcher looks at the files for new revisions. A look that finds them
/// unchanged costs two stats.
const WATCH_POLL: Duration = Duration::from_millis(10);

pub struct FileStore {
    path: PathBuf,
    journal_path: PathBuf,
    lock_path: PathBuf,
    view: Mutex<View>,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        let path = path.into();
        let sibling = |suffix: &str| {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            path.with_file_name(name)
        };
        FileStore {
            journal_path: sibling(".journal"),
            lock_path: sibling(".lock"),
            path,
            view: Mutex::new(View::default()),
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

    fn read_error(&self, err: ReadError) -> StoreError {
        match err {
            ReadError::Io(e) => self.io_error(&format!("read {}", self.path.display()), e),
            ReadError::Parse(e) => StoreError::Corrupt {
                location: self.location(),
                key: "(whole file)".into(),
                reason: e.to_string(),
            },
        }
    }

    /// The view brought up to date (callers hold it while they use it).
    fn current(&self) -> Result<std::sync::MutexGuard<'_, View>, StoreError> {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.refresh(&self.path, &self.journal_path)
            .map_err(|e| self.read_error(e))?;
        Ok(view)
    }

    fn contents(&self) -> Result<Arc<Contents>, StoreError> {
        Ok(self.current()?.contents.clone())
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

    fn sync_dir(&self) -> std::io::Result<()> {
        match self.path.parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }

    /// Writes `data` to `target` by a synced temporary file and rename.
    fn replace_file(&self, target: &Path, data: &[u8]) -> std::io::Result<()> {
        let tmp = target.with_extension(format!("tmp.{}", std::process::id()));
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(data)?;
            file.sync_data()?;
            fs::rename(&tmp, target)?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn commit_locked(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        let _lock = self.lock()?;
        let mut view = self.current()?;
        for write in &writes {
            let (key, expect) = match write {
                Write::Put { key, expect, .. } | Write::Delete { key, expect } => (key, expect),
            };
            let current = view.contents.keys.get(key).map(|e| e.revision);
            let holds = match (expect, current) {
                (Expect::Absent, None) => true,
                (Expect::Revision(want), Some(have)) => *want == have,
                _ => false,
            };
            if !holds {
                return Err(StoreError::Conflict { key: key.clone() });
            }
        }
        let revision = view.contents.revision + 1;
        let mut line = JournalLine {
            rev: revision,
            writes: Vec::with_capacity(writes.len()),
        };
        for write in writes {
            line.writes.push(match write {
                Write::Put { key, value, .. } => {
                    let value = RawValue::from_string(value).map_err(|e| StoreError::Corrupt {
                        location: self.location(),
                        key: key.clone(),
                        reason: format!("refusing to write a value that is not JSON: {e}"),
                    })?;
                    JournalWrite {
                        key,
                        value: Some(value),
                    }
                }
                Write::Delete { key, .. } => JournalWrite { key, value: None },
            });
        }
        let mut text = serde_json::to_vec(&line).expect("journal line serialises");
        text.push(b'\n');
        self.append(&mut view, &text)
            .map_err(|e| self.io_error(&format!("append to {}", self.journal_path.display()), e))?;
        Arc::make_mut(&mut view.contents).apply(line);
        let snapshot_size = view.snapshot.map_or(0, |id| id.size);
        if view.offset > COMPACT_MIN.max(snapshot_size) {
            self.compact(&mut view)
                .map_err(|e| self.io_error(&format!("compact {}", self.path.display()), e))?;
        }
        Ok(revision)
    }

    /// Appends one line durably. Under the lock, with the view current: anything past
    /// the view's offset is a torn line from a crashed writer, cut off first.
    fn append(&self, view: &mut View, text: &[u8]) -> std::io::Result<()> {
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal_path)?;
        let meta = journal.metadata()?;
        let identity = (meta.dev(), meta.ino());
        let created = view.journal != Some(identity);
        if created {
            view.journal = Some(identity);
            view.offset = 0;
        }
        if meta.size() != view.offset {
            journal.set_len(view.offset)?;
        }
        journal.write_all(text)?;
        journal.sync_data()?;
        if created {
            self.sync_dir()?; // the journal's directory entry, once
        }
        view.offset += text.len() as u64;
        Ok(())
    }

    /// The whole state to a new snapshot, then a new empty journal.
    fn compact(&self, view: &mut View) -> std::io::Result<()> {
        let data = serde_json::to_vec(&*view.contents).expect("store contents serialise");
        self.replace_file(&self.path, &data)?;
        self.replace_file(&self.journal_path, b"")?;
        view.snapshot = stat(&self.path)?;
        view.journal = fs::metadata(&self.journal_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        view.offset = 0;
        Ok(())
    }
}

/// The entries whose keys start with `prefix`, in key order.
fn entries_under<'c>(
    contents: &'c Contents,
    prefix: &'c str,
) -> impl Iterator<Item = (&'c String, &'c Entry)> {
    contents
        .keys
        .range(prefix.to_string()..)
        .take_while(move |(k, _)| k.starts_with(prefix))
}

fn snapshot_under(contents: &Contents, prefix: &str) -> BTreeMap<String, Entry> {
    entries_under(contents, prefix)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn versioned(entry: &Entry) -> Versioned {
    Versioned {
        value: entry.value.get().to_string(),
        revision: entry.revision,
    }
}

fn found_under(contents: &Contents, prefix: &str) -> Found {
    entries_under(contents, prefix)
        .map(|(k, e)| (k.clone(), versioned(e)))
        .collect()
}

impl FileStore {
    /// Polls the files for changes under `prefix`, reporting each against `seen` (what
    /// the receiver knows); with `report_first`, also what `view` itself holds beyond
    /// `seen`.
    fn poll_changes(
        &self,
        mut view: View,
        mut seen: BTreeMap<String, Entry>,
        prefix: &str,
        report_first: bool,
    ) -> WatchReceiver {
        let (tx, rx) = mpsc::channel(1024);
        let (path, journal_path) = (self.path.clone(), self.journal_path.clone());
        let prefix = prefix.to_string();
        let mut first = report_first;
        tokio::spawn(async move {
            loop {
                let changed = view.refresh(&path, &journal_path);
                if matches!(changed, Ok(true)) || (first && changed.is_ok()) {
                    first = false;
                    let now = snapshot_under(&view.contents, &prefix);
                    for (key, entry) in &now {
                        if seen.get(key).map(|e| e.revision) != Some(entry.revision) {
                            let event = WatchEvent::Put {
                                key: key.clone(),
                                value: versioned(entry),
                            };
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                    }
                    for key in seen.keys().filter(|k| !now.contains_key(*k)) {
                        let event = WatchEvent::Delete {
                            key: key.clone(),
                            revision: view.contents.revision,
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
        rx
    }
}

#[async_trait]
impl Store for FileStore {
    fn location(&self) -> String {
        format!("file://{}", self.path.display())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let view = self.current()?;
        Ok(view.contents.keys.get(key).map(versioned))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(found_under(self.contents()?.as_ref(), prefix))
    }

    async fn list_and_watch(&self, prefix: &str) -> Result<(Found, WatchReceiver), StoreError> {
        // One view for both: the watch compares later views against this one.
        let view = self.current()?.clone();
        let found = found_under(&view.contents, prefix);
        let seen = snapshot_under(&view.contents, prefix);
        Ok((found, self.poll_changes(view, seen, prefix, false)))
    }

    async fn read(&self, reads: &[Read]) -> Result<Vec<Found>, StoreError> {
        let contents = self.contents()?;
        Ok(reads
            .iter()
            .map(|read| match read {
                Read::Key(key) => contents
                    .keys
                    .get(key)
                    .map(|e| (key.clone(), versioned(e)))
                    .into_iter()
                    .collect(),
                Read::Prefix(prefix) => found_under(&contents, prefix),
            })
            .collect())
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        // Blocking file I/O is fine here: the callers are the short-lived CNI binary
        // and ipamctl on current-thread runtimes; the agent runs it off its reactor.
        self.commit_locked(writes)
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchReceiver, StoreError> {
        let view = self.current()?.clone();
        let mut seen = snapshot_under(&view.contents, prefix);
        // Report what changed after `after_revision` in the first snapshot too (a
        // delete since then cannot be told: list_and_watch has no such gap).
        seen.retain(|_, e| e.revision <= after_revision);
        Ok(self.poll_changes(view, seen, prefix, true))
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        // Taking the lock proves the lock file is writable; the journal is appended to
        // and compaction replaces files by rename, so the directory must be too.
        let probe = self
            .path
            .with_extension(format!("probe.{}", std::process::id()));
        File::create(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| self.io_error(&format!("write in {}", probe.display()), e))?;
        if self.journal_path.exists() {
            OpenOptions::new()
                .append(true)
                .open(&self.journal_path)
                .map_err(|e| self.io_error(&format!("write {}", self.journal_path.display()), e))?;
        }
        Ok(())
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

    #[tokio::test]
    async fn a_torn_journal_line_is_ignored_then_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = FileStore::new(&path);
        store
            .commit(vec![put("a", json!(1), Expect::Absent)])
            .await
            .unwrap();
        // A writer that crashed mid-append left half a line.
        let journal = dir.path().join("store.journal");
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(br#"{"rev":2,"writes":[{"key":"b","val"#)
            .unwrap();
        let fresh = FileStore::new(&path);
        assert_eq!(fresh.list("").await.unwrap().len(), 1);
        let rev = fresh
            .commit(vec![put("c", json!(3), Expect::Absent)])
            .await
            .unwrap();
        assert_eq!(rev, 2);
        let keys: Vec<String> = FileStore::new(&path)
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a", "c"]);
        assert!(fs::read_to_string(&journal).unwrap().ends_with("}]}\n"));
    }

    #[tokio::test]
    async fn compaction_keeps_every_document_for_old_and_new_readers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let writer = FileStore::new(&path);
        let reader = FileStore::new(&path);
        let big = "x".repeat(2000);
        for i in 0..300 {
            writer
                .commit(vec![put(&format!("k/{i}"), json!(big), Expect::Absent)])
                .await
                .unwrap();
            if i == 10 {
                assert_eq!(reader.list("k/").await.unwrap().len(), 11);
            }
        }
        let journal = fs::metadata(dir.path().join("store.journal"))
            .unwrap()
            .len();
        assert!(journal < COMPACT_MIN, "compacted: journal {journal} bytes");
        assert!(fs::metadata(&path).unwrap().len() > COMPACT_MIN);
        // A reader that last looked before the compaction, and a new one.
        for store in [&reader, &FileStore::new(&path)] {
            let docs = store.list("k/").await.unwrap();
            assert_eq!(docs.len(), 300);
            assert!(docs.iter().all(|(_, v)| v.value.len() == 2002));
        }
        assert_eq!(reader.get("k/299").await.unwrap().unwrap().revision, 300);
    }
}
