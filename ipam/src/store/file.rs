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

/// One commit, as a journal line. Unknown fields are refused, so a flipped byte in a
/// field name is found rather than read past.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalLine {
    rev: u64,
    writes: Vec<JournalWrite>,
}

/// Every journal line ends with `,"crc32":N}`: the CRC-32 of the line without that
/// field (`{"rev":..,"writes":[..]}`), so a byte changed after the write is found, not
/// read as a different allocation. Lines from before checksums have none and still
/// read.
const CRC_FIELD: &[u8] = b",\"crc32\":";

impl JournalLine {
    fn encode(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec(self).expect("journal line serialises");
        let crc = crc32fast::hash(&text);
        text.pop(); // the closing brace, put back after the checksum
        text.extend_from_slice(CRC_FIELD);
        text.extend_from_slice(crc.to_string().as_bytes());
        text.extend_from_slice(b"}\n");
        text
    }

    /// One line (without its newline); Err says what is wrong with it.
    fn decode(line: &[u8]) -> Result<JournalLine, LineError> {
        let at = line.windows(CRC_FIELD.len()).rposition(|w| w == CRC_FIELD);
        let Some(at) = at else {
            return serde_json::from_slice(line).map_err(LineError::Parse);
        };
        let digits = line[at + CRC_FIELD.len()..]
            .strip_suffix(b"}")
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u32>().ok())
            .ok_or(LineError::Checksum)?;
        let mut body = line[..at].to_vec();
        body.push(b'}');
        if crc32fast::hash(&body) != digits {
            return Err(LineError::Checksum);
        }
        serde_json::from_slice(&body).map_err(LineError::Parse)
    }
}

enum LineError {
    Parse(serde_json::Error),
    Checksum,
}

/// A put (with its value) or a delete (without).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// A line or file that is not what Calyx wrote: names the file and the line.
    Parse {
        file: PathBuf,
        line: Option<u64>,
        error: serde_json::Error,
    },
    /// The files say that something committed is gone, or they changed under a reader
    /// in a way no Calyx writer changes them.
    Damaged(String),
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
    /// Complete journal lines read, for messages that name a line.
    lines: u64,
    contents: Arc<Contents>,
}

/// How far the journal's committed lines go, as the last writer recorded it in the
/// lock file after its fsync (without an fsync of its own: it guards against a journal
/// cut after the fact, not against a power cut, which the fsync covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CommittedEnd {
    journal: (u64, u64),
    end: u64,
}

impl CommittedEnd {
    const LEN: usize = 63;

    fn encode(&self) -> String {
        let ((dev, ino), end) = (self.journal, self.end);
        format!("{dev:020} {ino:020} {end:020}\n")
    }

    fn decode(text: &[u8]) -> Option<CommittedEnd> {
        let text = std::str::from_utf8(text.get(..Self::LEN)?).ok()?;
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>().ok());
        let (dev, ino, end) = (parts.next()??, parts.next()??, parts.next()??);
        Some(CommittedEnd {
            journal: (dev, ino),
            end,
        })
    }

    fn read(lock_path: &Path) -> Option<CommittedEnd> {
        let mut buf = [0u8; Self::LEN];
        let mut file = File::open(lock_path).ok()?;
        file.read_exact(&mut buf).ok()?;
        Self::decode(&buf)
    }
}

impl View {
    /// Brings the view up to date with the files; says whether anything changed.
    /// Refuses, rather than reads as less, a store whose files vanished or shrank
    /// under this reader, or whose journal lost committed lines.
    fn refresh(
        &mut self,
        path: &Path,
        journal_path: &Path,
        lock_path: &Path,
    ) -> Result<bool, ReadError> {
        let mut changed = false;
        let snapshot = stat(path)?;
        if snapshot.is_none() && self.snapshot.is_some() {
            return Err(ReadError::Damaged(format!(
                "{} vanished while in use (moved or deleted outside Calyx)",
                path.display()
            )));
        }
        if snapshot != self.snapshot {
            self.reload_snapshot(path)?;
            changed = true;
        }
        let mut journal = match File::open(journal_path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if self.journal.is_some() {
                    return Err(ReadError::Damaged(format!(
                        "{} vanished while in use (moved or deleted outside Calyx)",
                        journal_path.display()
                    )));
                }
                // Compaction replaces the journal but never removes it: commits were
                // recorded here, so it was removed outside Calyx.
                if let Some(c) = CommittedEnd::read(lock_path) {
                    return Err(ReadError::Damaged(format!(
                        "{} is missing, though {} records commits up to byte {}",
                        journal_path.display(),
                        lock_path.display(),
                        c.end
                    )));
                }
                return Ok(changed);
            }
            Err(e) => return Err(e.into()),
        };
        let meta = journal.metadata()?;
        let identity = (meta.dev(), meta.ino());
        let first_look = self.journal != Some(identity);
        if first_look {
            // A new journal (the first, or one left by a compaction): start over from
            // the snapshot it goes with.
            if self.journal.is_some() {
                self.reload_snapshot(path)?;
                changed = true;
            }
            self.journal = Some(identity);
            self.offset = 0;
            self.lines = 0;
        } else if meta.size() < self.offset {
            return Err(ReadError::Damaged(format!(
                "{} shrank from {} to {} bytes while in use (cut outside Calyx)",
                journal_path.display(),
                self.offset,
                meta.size()
            )));
        }
        // Only when there is something new to judge: an unchanged journal was judged.
        let committed = (first_look || meta.size() != self.offset)
            .then(|| CommittedEnd::read(lock_path))
            .flatten()
            .filter(|c| c.journal == identity);
        // A record read while a writer rewrote it can say anything: a judgement
        // against it is believed only when a second read gives the same record.
        let reread_agrees = |c: &CommittedEnd| CommittedEnd::read(lock_path).as_ref() == Some(c);
        let confirmed = committed.filter(|c| {
            c.end > meta.size()
                && reread_agrees(c)
                // The size again too: a writer may have appended since the stat above.
                && fs::metadata(journal_path).is_ok_and(|m| c.end > m.size())
        });
        if let Some(c) = confirmed {
            return Err(ReadError::Damaged(format!(
                "{} is {} bytes long but its commits went up to byte {}: committed \
                 writes were cut off (restore the file or a backup)",
                journal_path.display(),
                meta.size(),
                c.end
            )));
        }
        if meta.size() > self.offset {
            journal.seek(SeekFrom::Start(self.offset))?;
            let mut data = Vec::with_capacity((meta.size() - self.offset) as usize);
            journal.read_to_end(&mut data)?;
            // Only complete lines: a torn last line is a commit that never finished.
            let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let contents = Arc::make_mut(&mut self.contents);
            for line in data[..complete].split(|b| *b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                self.lines += 1;
                let parsed = JournalLine::decode(line).map_err(|e| match e {
                    LineError::Parse(error) => ReadError::Parse {
                        file: journal_path.to_path_buf(),
                        line: Some(self.lines),
                        error,
                    },
                    LineError::Checksum => ReadError::Damaged(format!(
                        "{} line {}: checksum mismatch (the line changed after it was written)",
                        journal_path.display(),
                        self.lines
                    )),
                })?;
                if first_look && self.snapshot.is_none() && self.lines == 1 && parsed.rev > 1 {
                    // Compaction wrote a snapshot before this journal began.
                    return Err(ReadError::Damaged(format!(
                        "{} is missing: its journal starts at revision {}",
                        path.display(),
                        parsed.rev
                    )));
                }
                contents.apply(parsed);
            }
            if complete > 0 {
                self.offset += complete as u64;
                changed = true;
            }
            // Everything up to the committed end was written as whole lines: a line
            // there without its newline lost it after the fact.
            if let Some(c) = committed.filter(|c| c.end > self.offset && reread_agrees(c)) {
                return Err(ReadError::Damaged(format!(
                    "{}: the committed line ending at byte {} is incomplete (changed after \
                     it was written)",
                    journal_path.display(),
                    c.end
                )));
            }
        }
        // An empty journal without a snapshot: a compaction's (it wrote the snapshot
        // first, and records the new journal as committed to byte 0) whose snapshot
        // went, or a new store's first writer between creating the journal and writing
        // its first line (no record names the journal yet): nothing to read then.
        let compacted =
            || CommittedEnd::read(lock_path).filter(|c| c.journal == identity && c.end == 0);
        if first_look
            && self.snapshot.is_none()
            && self.lines == 0
            && meta.size() == 0
            && compacted().is_some_and(|c| reread_agrees(&c))
        {
            return Err(ReadError::Damaged(format!(
                "{} is missing beside an empty journal {}",
                path.display(),
                journal_path.display()
            )));
        }
        Ok(changed)
    }

    fn reload_snapshot(&mut self, path: &Path) -> Result<(), ReadError> {
        let (id, contents) = match File::open(path) {
            Ok(mut file) => {
                let id = FileId::of(&file.metadata()?);
                let mut data = Vec::with_capacity(id.size as usize);
                file.read_to_end(&mut data)?;
                let contents = serde_json::from_slice(&data).map_err(|error| ReadError::Parse {
                    file: path.to_path_buf(),
                    line: None,
                    error,
                })?;
                (Some(id), contents)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => (None, Contents::default()),
            Err(e) => return Err(e.into()),
        };
        self.snapshot = id;
        self.contents = Arc::new(contents);
        self.offset = 0;
        self.lines = 0;
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
    /// Whether a store was ever written here (its snapshot or its journal exists).
    pub fn exists(&self) -> bool {
        self.path.exists() || self.journal_path.exists()
    }

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
            ReadError::Parse { file, line, error } => StoreError::Corrupt {
                location: self.location(),
                key: match line {
                    Some(n) => format!("{} line {n}", file.display()),
                    None => file.display().to_string(),
                },
                reason: error.to_string(),
            },
            ReadError::Damaged(reason) => StoreError::Damaged {
                location: self.location(),
                reason,
            },
        }
    }

    /// The view brought up to date (callers hold it while they use it).
    fn current(&self) -> Result<std::sync::MutexGuard<'_, View>, StoreError> {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        view.refresh(&self.path, &self.journal_path, &self.lock_path)
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
        let lock = self.lock()?;
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
        let text = line.encode();
        self.append(&mut view, &text, &lock)?;
        Arc::make_mut(&mut view.contents).apply(line);
        let snapshot_size = view.snapshot.map_or(0, |id| id.size);
        if view.offset > COMPACT_MIN.max(snapshot_size) {
            // The commit is durable already: a compaction that fails (a full disk) is
            // tried again at the next commit, and must not make this one look failed.
            if let Err(e) = self.compact(&mut view, &lock) {
                tracing::warn!(store = %self.path.display(), error = %e, "compaction failed; the journal keeps growing until it succeeds");
            }
        }
        Ok(revision)
    }

    /// Appends one line durably: either it is written and synced, or the journal is
    /// cut back to where it was. Under the lock, with the view current: anything past
    /// the view's offset is a torn line from a crashed writer (never a committed one:
    /// `refresh` checked the committed end), cut off first.
    fn append(&self, view: &mut View, text: &[u8], lock: &File) -> Result<(), StoreError> {
        let journal_error =
            |what: &str, e| self.io_error(&format!("{what} {}", self.journal_path.display()), e);
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.journal_path)
            .map_err(|e| journal_error("open", e))?;
        let meta = journal.metadata().map_err(|e| journal_error("stat", e))?;
        let identity = (meta.dev(), meta.ino());
        let created = view.journal != Some(identity);
        if created {
            view.journal = Some(identity);
            view.offset = 0;
            view.lines = 0;
        }
        if meta.size() < view.offset {
            return Err(StoreError::Damaged {
                location: self.location(),
                reason: format!(
                    "{} shrank from {} to {} bytes under this writer (cut outside Calyx)",
                    self.journal_path.display(),
                    view.offset,
                    meta.size()
                ),
            });
        }
        if meta.size() > view.offset {
            tracing::warn!(
                journal = %self.journal_path.display(),
                bytes = meta.size() - view.offset,
                "cutting off the unfinished line of a writer that crashed"
            );
            journal
                .set_len(view.offset)
                .map_err(|e| journal_error("cut the torn line off", e))?;
        }
        let written = journal.write_all(text).and_then(|()| journal.sync_data());
        if let Err(e) = written {
            // Nothing of a failed commit may stay: a later reader would apply it.
            if let Err(undo) = journal.set_len(view.offset) {
                tracing::error!(journal = %self.journal_path.display(), error = %undo, "could not cut back a failed append");
            }
            return Err(journal_error("append to", e));
        }
        if created {
            // The journal's directory entry, once.
            self.sync_dir()
                .map_err(|e| journal_error("sync the directory of", e))?;
        }
        view.offset += text.len() as u64;
        view.lines += 1;
        record_committed_end(
            lock,
            &self.lock_path,
            CommittedEnd {
                journal: identity,
                end: view.offset,
            },
        );
        Ok(())
    }

    /// The whole state to a new snapshot, then a new empty journal, recorded as
    /// committed to byte 0 (so that readers can tell it from a new store's journal
    /// that its first writer has not written yet).
    fn compact(&self, view: &mut View, lock: &File) -> std::io::Result<()> {
        let data = serde_json::to_vec(&*view.contents).expect("store contents serialise");
        self.replace_file(&self.path, &data)?;
        self.replace_file(&self.journal_path, b"")?;
        view.snapshot = stat(&self.path)?;
        view.journal = fs::metadata(&self.journal_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        view.offset = 0;
        if let Some(journal) = view.journal {
            record_committed_end(lock, &self.lock_path, CommittedEnd { journal, end: 0 });
        }
        Ok(())
    }
}

/// Writes the committed-end record at the start of the lock file (a pwrite, no fsync:
/// see `CommittedEnd`); a failure only weakens the cut-off check, so it is logged.
fn record_committed_end(lock: &File, lock_path: &Path, record: CommittedEnd) {
    use std::os::unix::fs::FileExt;
    if let Err(e) = lock.write_at(record.encode().as_bytes(), 0) {
        tracing::warn!(lock = %lock_path.display(), error = %e, "record the committed end");
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
        let lock_path = self.lock_path.clone();
        let location = self.location();
        let prefix = prefix.to_string();
        let mut first = report_first;
        tokio::spawn(async move {
            loop {
                let changed = view.refresh(&path, &journal_path, &lock_path);
                if let Err(ReadError::Damaged(reason)) = changed {
                    // The watch ends here: its reader learns of the damage instead of
                    // seeing every document deleted.
                    let damaged = StoreError::Damaged { location, reason };
                    let _ = tx.send(Err(damaged)).await;
                    return;
                }
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
        let text = fs::read_to_string(&journal).unwrap();
        assert!(text.ends_with("}\n") && text.lines().last().unwrap().contains(r#""key":"c""#));
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

    async fn store_with(dir: &Path, keys: &[&str]) -> FileStore {
        let store = FileStore::new(dir.join("store"));
        for key in keys {
            store
                .commit(vec![put(key, json!(1), Expect::Absent)])
                .await
                .unwrap();
        }
        store
    }

    fn damaged(err: StoreError, mentions: &str) {
        match &err {
            StoreError::Damaged { reason, .. } => {
                assert!(
                    reason.contains(mentions),
                    "{err}: should mention {mentions:?}"
                )
            }
            other => panic!("expected Damaged, got {other}"),
        }
    }

    #[tokio::test]
    async fn a_committed_line_cut_off_after_the_fact_is_damage_not_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let writer = store_with(dir.path(), &["a", "b"]).await;
        let journal = dir.path().join("store.journal");
        let len = fs::metadata(&journal).unwrap().len();
        // Cut inside the last committed line, and also exactly at a line boundary.
        for cut in [len - 5, len - (len / 2)] {
            let file = OpenOptions::new().write(true).open(&journal).unwrap();
            file.set_len(cut).unwrap();
            let fresh = FileStore::new(dir.path().join("store"));
            damaged(
                fresh.list("").await.unwrap_err(),
                "committed writes were cut off",
            );
            let err = fresh
                .commit(vec![put("c", json!(3), Expect::Absent)])
                .await
                .unwrap_err();
            damaged(err, "cut off");
            // The writer that saw the whole journal says it shrank.
            damaged(writer.list("").await.unwrap_err(), "shrank");
        }
    }

    #[tokio::test]
    async fn a_journal_shortened_under_a_writer_is_never_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let writer = store_with(dir.path(), &["a", "b"]).await;
        let journal = dir.path().join("store.journal");
        OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap()
            .set_len(0)
            .unwrap();
        let err = writer
            .commit(vec![put("c", json!(3), Expect::Absent)])
            .await
            .unwrap_err();
        damaged(err, "shrank");
        assert_eq!(
            fs::metadata(&journal).unwrap().len(),
            0,
            "no zero bytes written"
        );
    }

    #[tokio::test]
    async fn a_missing_snapshot_is_an_error_naming_it_never_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let writer = FileStore::new(&path);
        let big = "x".repeat(2000);
        for i in 0..200 {
            writer
                .commit(vec![put(&format!("k/{i}"), json!(big), Expect::Absent)])
                .await
                .unwrap();
        }
        assert!(path.exists(), "compaction wrote a snapshot");
        // An empty journal right after compaction, and one with lines after it.
        for extra in [false, true] {
            if extra {
                writer
                    .commit(vec![put("later", json!(1), Expect::Absent)])
                    .await
                    .unwrap();
            }
            let moved = dir.path().join("moved");
            fs::rename(&path, &moved).unwrap();
            let err = FileStore::new(&path).list("").await.unwrap_err();
            damaged(err, &path.display().to_string());
            damaged(writer.list("").await.unwrap_err(), "vanished");
            fs::rename(&moved, &path).unwrap();
            assert_eq!(writer.list("k/").await.unwrap().len(), 200);
        }
    }

    #[tokio::test]
    async fn files_moved_away_under_a_watcher_end_its_watch_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &["k/a", "k/b"]).await;
        let (found, mut watch) = store.list_and_watch("k/").await.unwrap();
        assert_eq!(found.len(), 2);
        fs::rename(
            dir.path().join("store.journal"),
            dir.path().join("elsewhere"),
        )
        .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), watch.recv())
            .await
            .expect("the watch reports")
            .expect("an event");
        damaged(event.unwrap_err(), "vanished");
        damaged(store.list("k/").await.unwrap_err(), "vanished");
    }

    #[tokio::test]
    async fn a_garbage_journal_line_is_named_by_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        store_with(dir.path(), &["a", "b"]).await;
        let journal = dir.path().join("store.journal");
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(b"this is no journal line\n").unwrap();
        let err = FileStore::new(dir.path().join("store"))
            .list("")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("{} line 3", journal.display())),
            "{text}"
        );
    }

    mod journal_reader_never_panics {
        use super::*;
        use proptest::prelude::*;

        fn read_back(snapshot: Option<&[u8]>, journal: &[u8], lock: &[u8]) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store");
            if let Some(data) = snapshot {
                fs::write(&path, data).unwrap();
            }
            fs::write(dir.path().join("store.journal"), journal).unwrap();
            fs::write(dir.path().join("store.lock"), lock).unwrap();
            let store = FileStore::new(&path);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            match runtime.block_on(store.list("")) {
                Ok(_) => {}
                Err(StoreError::Corrupt { .. } | StoreError::Damaged { .. }) => {}
                Err(other) => panic!("unexpected error kind: {other}"),
            }
        }

        /// Journal lines as a writer makes them, so the cases reach past the first line.
        fn journal_lines() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec((1u64..6, "[a-c/]{1,4}", prop::option::of(0u32..9)), 0..6)
                .prop_map(|lines| {
                    let mut out = Vec::new();
                    for (rev, key, value) in lines {
                        let write = match value {
                            Some(v) => json!({"key": key, "value": v}),
                            None => json!({"key": key}),
                        };
                        out.extend(json!({"rev": rev, "writes": [write]}).to_string().bytes());
                        out.push(b'\n');
                    }
                    out
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_bytes_as_journal(journal in prop::collection::vec(any::<u8>(), 0..300)) {
                read_back(None, &journal, b"");
            }

            #[test]
            fn written_lines_then_damage(
                lines in journal_lines(),
                cut in any::<prop::sample::Index>(),
                garbage in prop::collection::vec(any::<u8>(), 0..40),
                lock in prop::collection::vec(any::<u8>(), 0..80),
            ) {
                let mut journal = lines.clone();
                journal.truncate(cut.index(lines.len() + 1));
                journal.extend(garbage);
                read_back(None, &journal, &lock);
                read_back(Some(br#"{"revision":3,"keys":{}}"#), &journal, &lock);
                read_back(Some(b"{not json"), &journal, &lock);
            }

            #[test]
            fn any_bytes_as_the_committed_end_record(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
                let _ = CommittedEnd::decode(&bytes);
            }
        }
    }

    /// Any one byte of a committed journal changed after the fact: a fresh reader
    /// either refuses the store or reads exactly what was committed, never something
    /// else.
    #[tokio::test]
    async fn every_single_byte_change_in_the_journal_is_found_or_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let writer = store_with(dir.path(), &["a", "b/c"]).await;
        writer
            .commit(vec![Write::Delete {
                key: "a".into(),
                expect: Expect::Revision(1),
            }])
            .await
            .unwrap();
        let committed = writer.list("").await.unwrap();
        let journal = dir.path().join("store.journal");
        let original = fs::read(&journal).unwrap();
        for at in 0..original.len() {
            for flip in [0x01u8, 0x20, 0x80] {
                let mut damaged = original.clone();
                damaged[at] ^= flip;
                fs::write(&journal, &damaged).unwrap();
                // Keep the file's identity so the committed-end record applies.
                if let Ok(read) = FileStore::new(dir.path().join("store")).list("").await {
                    assert_eq!(
                        read, committed,
                        "byte {at} ^ {flip:#x} read as other contents"
                    );
                }
            }
        }
        fs::write(&journal, &original).unwrap();
        assert_eq!(
            FileStore::new(dir.path().join("store"))
                .list("")
                .await
                .unwrap(),
            committed
        );
    }
}
