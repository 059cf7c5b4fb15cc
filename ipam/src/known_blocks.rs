//! What an IPAM client remembers of each node's blocks between allocations: the block
//! keys the node's index named last time. An allocation reads them in the same round
//! trip as the index itself, so the usual allocation is one read and one commit instead
//! of two reads (index, then blocks) and a commit. A guess only: the index read beside
//! it decides which of them count, so a stale memory costs a second read, never a wrong
//! allocation.
//!
//! A long-lived client (the agent, ipam-load) keeps it in memory; the CNI plugin, one
//! process per ADD, keeps it in a small file in its state directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

type ByNode = BTreeMap<String, BTreeSet<String>>;

#[derive(Debug, Default)]
pub struct KnownBlocks {
    file: Option<PathBuf>,
    /// None until the file (if any) has been read.
    by_node: Mutex<Option<ByNode>>,
}

impl KnownBlocks {
    /// A memory that also lives in `file`, for the next process.
    pub fn in_file(file: PathBuf) -> KnownBlocks {
        KnownBlocks {
            file: Some(file),
            by_node: Mutex::new(None),
        }
    }

    pub fn get(&self, node: &str) -> BTreeSet<String> {
        let mut by_node = self.by_node.lock().unwrap_or_else(|e| e.into_inner());
        let by_node = by_node.get_or_insert_with(|| self.load());
        by_node.get(node).cloned().unwrap_or_default()
    }

    pub fn remember(&self, node: &str, blocks: BTreeSet<String>) {
        let mut by_node = self.by_node.lock().unwrap_or_else(|e| e.into_inner());
        let by_node = by_node.get_or_insert_with(|| self.load());
        if by_node.get(node) == Some(&blocks) {
            return;
        }
        by_node.insert(node.to_string(), blocks);
        self.save(by_node);
    }

    /// An unreadable or garbled file is an empty memory: it is only a guess.
    fn load(&self) -> ByNode {
        let Some(file) = &self.file else {
            return ByNode::new();
        };
        std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Best effort, by rename so a reader never sees half a file; no fsync: losing it
    /// costs one extra read.
    fn save(&self, by_node: &ByNode) {
        let Some(file) = &self.file else {
            return;
        };
        let temp = file.with_extension(format!("tmp.{}", std::process::id()));
        let written = std::fs::write(&temp, serde_json::to_vec(by_node).expect("serialises"))
            .and_then(|()| std::fs::rename(&temp, file));
        if let Err(e) = written {
            tracing::debug!(file = %file.display(), error = %e, "could not save known blocks");
            let _ = std::fs::remove_file(&temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn a_file_memory_is_seen_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known-blocks.json");
        let first = KnownBlocks::in_file(path.clone());
        assert!(first.get("n1").is_empty());
        first.remember("n1", set(&["blocks/10.0.0.0-26"]));
        first.remember("n2", set(&["blocks/10.0.0.64-26"]));
        let next = KnownBlocks::in_file(path.clone());
        assert_eq!(next.get("n1"), set(&["blocks/10.0.0.0-26"]));
        assert_eq!(next.get("n2"), set(&["blocks/10.0.0.64-26"]));
    }

    #[test]
    fn a_garbled_file_is_an_empty_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known-blocks.json");
        std::fs::write(&path, b"{\"n1\": [").unwrap();
        let memory = KnownBlocks::in_file(path.clone());
        assert!(memory.get("n1").is_empty());
        memory.remember("n1", set(&["blocks/a"]));
        assert_eq!(KnownBlocks::in_file(path).get("n1"), set(&["blocks/a"]));
    }
}
