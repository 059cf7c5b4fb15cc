//! Calyx IPAM: cluster pools carved into per-node blocks, addresses allocated to
//! handles (one per attachment: network + container + interface), all kept as JSON
//! documents in a `Store` (embedded file store or etcd).

pub mod allocator;
pub mod check;
pub mod known_blocks;
pub mod migrate;
pub mod model;
pub mod schema;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::allocator::{
    plan_allocation, plan_empty_block_release, plan_release, AllocationRequest, BlockView,
    StoredBlock,
};
use crate::known_blocks::KnownBlocks;
use crate::model::{
    affinity_prefix, block_key, block_key_of_affinity, handle_key, node_key, pool_key,
    tunnel_handle_id, Handle, IpamConfig, NodeRecord, Pool, IPAM_CONFIG_KEY,
};
use crate::store::{conflict_backoff, Expect, Read, Store, StoreError, Versioned, Write};

/// What a targeted release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released(String),
    NotAllocated,
    /// It changed since it was reported: left alone.
    Changed,
    /// The address belongs to a handle that holds it, as a running pod's does: left
    /// alone unless forced (freeing it would hand a live pod's address out again).
    InUse(String),
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pool exhausted: {0}")]
    PoolExhausted(String),
    #[error("no enabled address pool to allocate from")]
    NoPools,
    #[error("pool {cidr} overlaps pool {other}")]
    PoolOverlap { cidr: String, other: String },
    #[error("node {node} still has {count} address(es) in use ({examples}); release them first or use --force")]
    NodeNotEmpty {
        node: String,
        count: usize,
        examples: String,
    },
    #[error(
        "gave up after {attempts} conflicting updates in {elapsed:?}; the datastore is too busy"
    )]
    TooManyConflicts { attempts: u32, elapsed: Duration },
    #[error("host IPAM lock {path}: {reason}")]
    HostLock { path: String, reason: String },
    #[error(transparent)]
    Schema(schema::SchemaError),
}

impl From<schema::SchemaError> for IpamError {
    /// A store failure stays one (an outage is waited out the same way everywhere).
    fn from(e: schema::SchemaError) -> IpamError {
        match e {
            schema::SchemaError::Store(e) => IpamError::Store(e),
            other => IpamError::Schema(other),
        }
    }
}

/// How long an operation keeps retrying compare-and-swap conflicts.
const CONFLICT_DEADLINE: Duration = Duration::from_secs(10);

/// Seconds since the Unix epoch: the clock of allocation times, cooldowns and the
/// empty-block grace period.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What `Ipam::release_node` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRelease {
    pub handles_released: Vec<String>,
    pub blocks_released: Vec<String>,
    pub node_record_deleted: bool,
}

pub struct Ipam<'s> {
    store: &'s dyn Store,
    host_lock: Option<std::path::PathBuf>,
    /// The blocks each node's index named at this client's last allocation there.
    known_blocks: KnownBlocks,
}

impl<'s> Ipam<'s> {
    pub fn new(store: &'s dyn Store) -> Ipam<'s> {
        Ipam {
            store,
            host_lock: None,
            known_blocks: Default::default(),
        }
    }

    /// Makes every read-plan-commit cycle hold an exclusive `flock` on `path`, so the
    /// processes of one host (a burst of plugin calls) take turns instead of
    /// conflicting on their node's block and backing off; other hosts still coordinate
    /// through the store's compare-and-swap. Calico's plugin does the same.
    pub fn with_host_lock(mut self, path: impl Into<std::path::PathBuf>) -> Ipam<'s> {
        self.host_lock = Some(path.into());
        self
    }

    /// Keeps what this client learns of its node's blocks in `file` for the next
    /// process (see `known_blocks`): the CNI plugin runs once per ADD.
    pub fn with_known_blocks_file(mut self, file: impl Into<std::path::PathBuf>) -> Ipam<'s> {
        self.known_blocks = KnownBlocks::in_file(file.into());
        self
    }

    pub fn store(&self) -> &'s dyn Store {
        self.store
    }

    pub async fn pools(&self) -> Result<Vec<Pool>, IpamError> {
        Ok(decode_pools(self.store, &self.store.list("pools/").await?)?)
    }

    /// Creates each of the given pools the store lacks (the network config's pools on
    /// first use, an IPv6 pool added to an IPv4 cluster); one that overlaps a
    /// different pool already stored is an error naming both.
    pub async fn ensure_pools(&self, wanted: &[Pool]) -> Result<(), IpamError> {
        if wanted.is_empty() {
            return Ok(());
        }
        let stored = self.pools().await?;
        for pool in wanted {
            if stored.iter().any(|p| p.cidr == pool.cidr) {
                continue;
            }
            match self.add_pool_among(pool, &stored).await {
                // Someone else created it at the same moment: fine.
                Err(IpamError::Store(StoreError::Conflict { .. })) | Ok(()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Adds a pool, refusing one that overlaps a pool already stored.
    pub async fn add_pool(&self, pool: &Pool) -> Result<(), IpamError> {
        let stored = self.pools().await?;
        self.add_pool_among(pool, &stored).await
    }

    async fn add_pool_among(&self, pool: &Pool, stored: &[Pool]) -> Result<(), IpamError> {
        if let Some(other) = stored.iter().find(|p| p.overlaps(&pool.cidr)) {
            return Err(IpamError::PoolOverlap {
                cidr: pool.cidr.to_string(),
                other: format!("{} ({})", other.name, other.cidr),
            });
        }
        self.store
            .commit(vec![Write::Put {
                key: pool_key(&pool.name),
                value: serde_json::to_string(pool).expect("pool serialises"),
                expect: Expect::Absent,
            }])
            .await?;
        Ok(())
    }

    /// The cluster's IPAM settings (defaults when never set).
    pub async fn config(&self) -> Result<IpamConfig, IpamError> {
        Ok(self.config_with_revision().await?.0)
    }

    async fn config_with_revision(&self) -> Result<(IpamConfig, Option<u64>), IpamError> {
        let found = self.store.get(IPAM_CONFIG_KEY).await?;
        let config = decode_config(self.store, found.as_ref())?;
        Ok((config, found.map(|v| v.revision)))
    }

    /// Changes the cluster's IPAM settings: `change` edits the current ones.
    pub async fn update_config(
        &self,
        change: impl Fn(&mut IpamConfig),
    ) -> Result<IpamConfig, IpamError> {
        self.retry_conflicts(|| async {
            let (mut config, revision) = self.config_with_revision().await?;
            change(&mut config);
            self.store
                .commit(vec![Write::Put {
                    key: IPAM_CONFIG_KEY.to_string(),
                    value: serde_json::to_string(&config).expect("config serialises"),
                    expect: revision.map_or(Expect::Absent, Expect::Revision),
                }])
                .await?;
            Ok(config)
        })
        .await
    }

    pub async fn blocks(&self) -> Result<BTreeMap<String, StoredBlock>, IpamError> {
        Ok(decode_blocks(
            self.store,
            &self.store.list("blocks/").await?,
        )?)
    }

    /// A node's `affinities/` index entries (key -> revision).
    async fn affinity_index(&self, node: &str) -> Result<BTreeMap<String, u64>, IpamError> {
        Ok(revisions(self.store.list(&affinity_prefix(node)).await?))
    }

    /// The blocks a node's index names (those that still exist): taken from `already`
    /// (read beside the index) where there, the rest read now, in one round trip.
    async fn indexed_blocks(
        &self,
        index: &BTreeMap<String, u64>,
        already: Vec<(String, Versioned)>,
    ) -> Result<BTreeMap<String, StoredBlock>, IpamError> {
        let wanted: BTreeSet<String> = index.keys().map(|k| block_key_of_affinity(k)).collect();
        let mut found = already;
        found.retain(|(key, _)| wanted.contains(key));
        let missing: Vec<Read> = wanted
            .iter()
            .filter(|key| !found.iter().any(|(k, _)| k == *key))
            .cloned()
            .map(Read::Key)
            .collect();
        if !missing.is_empty() {
            found.extend(self.read_checked(&missing).await?.concat());
        }
        Ok(decode_blocks(self.store, &found)?)
    }

    /// The blocks holding a handle's addresses (not every block in the cluster: a
    /// release reads one or two documents however big the cluster is).
    async fn blocks_of(&self, handle: &Handle) -> Result<BTreeMap<String, StoredBlock>, IpamError> {
        let keys: BTreeSet<String> = handle
            .addresses
            .iter()
            .map(|a| block_key(&a.block))
            .collect();
        let reads: Vec<Read> = keys.into_iter().map(Read::Key).collect();
        let found = self.read_checked(&reads).await?.concat();
        Ok(decode_blocks(self.store, &found)?)
    }

    /// `Store::read`, checking that every read got its answer.
    async fn read_checked(&self, reads: &[Read]) -> Result<Vec<store::Found>, IpamError> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let found = self.store.read(reads).await?;
        if found.len() != reads.len() {
            return Err(IpamError::Store(StoreError::Io {
                location: self.store.location(),
                reason: format!("asked {} reads, got {} answers", reads.len(), found.len()),
            }));
        }
        Ok(found)
    }

    /// Remembers the node's blocks: those its index named, and any the plan indexed.
    fn remember_blocks(&self, node: &str, index: &BTreeMap<String, u64>, writes: &[Write]) {
        let prefix = affinity_prefix(node);
        let blocks = index
            .keys()
            .map(String::as_str)
            .chain(writes.iter().map(Write::key))
            .filter(|key| key.starts_with(&prefix))
            .map(block_key_of_affinity)
            .collect();
        self.known_blocks.remember(node, blocks);
    }

    pub async fn handle(&self, id: &str) -> Result<Option<(Handle, u64)>, IpamError> {
        let key = handle_key(id);
        match self.store.get(&key).await? {
            Some(v) => Ok(Some((decode(self.store, &key, &v)?, v.revision))),
            None => Ok(None),
        }
    }

    pub async fn nodes(&self) -> Result<Vec<(NodeRecord, u64)>, IpamError> {
        Ok(
            decode_all(self.store, &self.store.list(model::NODES_PREFIX).await?)?
                .into_iter()
                .map(|(_, node, revision)| (node, revision))
                .collect(),
        )
    }

    /// Writes `record` as its node's record (compare-and-swap on what is stored, retried
    /// when another writer got there first), its heartbeat one past the stored one.
    /// Returns the record written.
    pub async fn register_node(&self, mut record: NodeRecord) -> Result<NodeRecord, IpamError> {
        let key = model::node_key(&record.name);
        loop {
            let current = self.store.get(&key).await?;
            let previous: Option<NodeRecord> = match &current {
                Some(v) => decode(self.store, &key, v).ok(),
                None => None,
            };
            record.heartbeat = previous.map_or(1, |p| p.heartbeat + 1);
            match self.put_node(&key, &record, current.as_ref()).await {
                Err(IpamError::Store(StoreError::Conflict { .. })) => continue,
                written => return written.map(|()| record),
            }
        }
    }

    /// One heartbeat of `node`: its stored record with the heartbeat moved by one, one
    /// read and one compare-and-swap write. None when the record is gone (register
    /// again); an unreadable record is an error naming its key.
    pub async fn heartbeat(&self, node: &str) -> Result<Option<NodeRecord>, IpamError> {
        let key = model::node_key(node);
        loop {
            let Some(current) = self.store.get(&key).await? else {
                return Ok(None);
            };
            let mut record: NodeRecord = decode(self.store, &key, &current)?;
            record.heartbeat += 1;
            match self.put_node(&key, &record, Some(&current)).await {
                Err(IpamError::Store(StoreError::Conflict { .. })) => continue,
                written => return written.map(|()| Some(record)),
            }
        }
    }

    async fn put_node(
        &self,
        key: &str,
        record: &NodeRecord,
        current: Option<&Versioned>,
    ) -> Result<(), IpamError> {
        let value = serde_json::to_string(record).map_err(|e| StoreError::Corrupt {
            location: self.store.location(),
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        let write = Write::Put {
            key: key.to_string(),
            value,
            expect: Expect::from_current(current),
        };
        self.store.commit(vec![write]).await?;
        Ok(())
    }

    pub async fn handles(&self) -> Result<Vec<Handle>, IpamError> {
        Ok(decode_all(self.store, &self.store.list("handles/").await?)?
            .into_iter()
            .map(|(_, handle, _)| handle)
            .collect())
    }

    /// Gives the request's handle one address per family. Idempotent: when the handle
    /// already holds addresses, returns them and allocates nothing. The second value
    /// says whether this call created the allocation.
    ///
    /// A failed call leaves no allocation: a commit that failed in a way that may
    /// still have applied it (etcd applied it and the answer was lost) is undone.
    pub async fn allocate(&self, request: &AllocationRequest) -> Result<(Handle, bool), IpamError> {
        let uncertain = std::sync::atomic::AtomicBool::new(false);
        let result = self.allocate_once(request, &uncertain).await;
        if result.is_err() && uncertain.load(std::sync::atomic::Ordering::Relaxed) {
            match self.release(&request.handle_id).await {
                Ok(Some(_)) => {
                    tracing::warn!(handle = %request.handle_id, "a failed commit had applied; released it")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(handle = %request.handle_id, error = %e, "a failed commit may have applied and could not be undone; DEL or `ipamctl check` will find it")
                }
            }
        }
        result
    }

    async fn allocate_once(
        &self,
        request: &AllocationRequest,
        uncertain: &std::sync::atomic::AtomicBool,
    ) -> Result<(Handle, bool), IpamError> {
        self.retry_conflicts(|| async {
            // Everything the plan needs in one round trip (one etcd transaction): the
            // node's blocks as last seen are read beside the index that names them.
            let node = &request.attrs.node;
            let mut reads = vec![
                Read::Key(handle_key(&request.handle_id)),
                Read::Prefix("pools/".into()),
                Read::Key(IPAM_CONFIG_KEY.into()),
                Read::Prefix(affinity_prefix(node)),
            ];
            reads.extend(self.known_blocks.get(node).into_iter().map(Read::Key));
            let mut found = self.read_checked(&reads).await?;
            let guessed_blocks = found.split_off(4).concat();
            let [handle, pools, config, index] =
                <[store::Found; 4]>::try_from(found).expect("four answers checked");
            if let Some((key, v)) = handle.first() {
                return Ok((decode(self.store, key, v)?, false));
            }
            let pools = decode_pools(self.store, &pools)?;
            let config = decode_config(self.store, config.first().map(|(_, v)| v))?;
            let index = revisions(index);
            // First from the node's own blocks only; every block (cluster-wide, costly
            // with many nodes) only to claim a new block or to borrow.
            let own = self.indexed_blocks(&index, guessed_blocks).await?;
            let view = BlockView {
                blocks: &own,
                affinity_index: &index,
                complete: false,
            };
            let plan = match plan_allocation(&pools, view, &config, request)? {
                Some(plan) => plan,
                None => {
                    let all = self.blocks().await?;
                    let view = BlockView {
                        blocks: &all,
                        affinity_index: &index,
                        complete: true,
                    };
                    plan_allocation(&pools, view, &config, request)?
                        .expect("a complete view always plans")
                }
            };
            self.remember_blocks(node, &index, &plan.writes);
            match self.store.commit(plan.writes).await {
                Ok(_) => Ok((plan.handle, true)),
                // Nothing applied on a conflict; anything else may have.
                Err(e @ StoreError::Conflict { .. }) => Err(e.into()),
                Err(e) => {
                    uncertain.store(true, std::sync::atomic::Ordering::Relaxed);
                    Err(e.into())
                }
            }
        })
        .await
    }

    /// Frees every address of a handle and deletes it. Returns what was released, or
    /// None when the handle did not exist (releasing twice is fine).
    pub async fn release(&self, handle_id: &str) -> Result<Option<Handle>, IpamError> {
        self.retry_conflicts(|| async {
            let Some((handle, revision)) = self.handle(handle_id).await? else {
                return Ok(None);
            };
            let blocks = self.blocks_of(&handle).await?;
            self.store
                .commit(plan_release(&handle, revision, &blocks, unix_now()))
                .await?;
            Ok(Some(handle))
        })
        .await
    }

    /// Handles with their revisions.
    pub async fn handles_with_revisions(&self) -> Result<Vec<(Handle, u64)>, IpamError> {
        Ok(decode_all(self.store, &self.store.list("handles/").await?)?
            .into_iter()
            .map(|(_, handle, revision)| (handle, revision))
            .collect())
    }

    /// Every problem in the store (see `check::find_problems`).
    pub async fn check(
        &self,
        live: Option<&check::LivePods>,
    ) -> Result<Vec<check::Problem>, IpamError> {
        let pools = self.pools().await?;
        let blocks = self.blocks().await?;
        let handles = self.handles_with_revisions().await?;
        let nodes: Vec<NodeRecord> = self.nodes().await?.into_iter().map(|(n, _)| n).collect();
        Ok(check::find_problems(
            &pools, &blocks, &handles, &nodes, live,
        ))
    }

    /// Frees one address. Only if the block still holds it at `expected_seq` (when
    /// given): a report's repair must not free what was handed out again since.
    /// When the allocation's handle exists, it is in use: without `force` nothing is
    /// released (`InUse`), with it the whole handle is.
    pub async fn release_ip(
        &self,
        ip: std::net::IpAddr,
        expected_seq: Option<u64>,
        force: bool,
    ) -> Result<ReleaseOutcome, IpamError> {
        self.retry_conflicts(|| async {
            let blocks = self.blocks().await?;
            let Some((key, stored)) = blocks.iter().find(|(_, b)| b.block.cidr.contains(ip)) else {
                return Ok(ReleaseOutcome::NotAllocated);
            };
            let ordinal = stored.block.ordinal_of(ip).expect("block contains ip");
            let Some(allocation) = stored.block.allocations.get(&ordinal).cloned() else {
                return Ok(ReleaseOutcome::NotAllocated);
            };
            if expected_seq.is_some_and(|seq| seq != allocation.seq) {
                return Ok(ReleaseOutcome::Changed);
            }
            if let Some((handle, revision)) = self.handle(&allocation.handle).await? {
                if !force {
                    return Ok(ReleaseOutcome::InUse(allocation.handle));
                }
                self.store
                    .commit(plan_release(&handle, revision, &blocks, unix_now()))
                    .await?;
                return Ok(ReleaseOutcome::Released(allocation.handle));
            }
            let mut block = stored.block.clone();
            block.release(ordinal, &allocation.handle, allocation.seq, unix_now());
            self.store
                .commit(vec![Write::Put {
                    key: key.clone(),
                    value: serde_json::to_string(&block).expect("block serialises"),
                    expect: Expect::Revision(stored.revision),
                }])
                .await?;
            Ok(ReleaseOutcome::Released(allocation.handle))
        })
        .await
    }

    /// Releases a handle by its ID. A handle whose addresses the blocks record for it
    /// is in use (a running pod's): without `force` it is left alone (`InUse`).
    pub async fn release_handle(
        &self,
        handle_id: &str,
        force: bool,
    ) -> Result<ReleaseOutcome, IpamError> {
        if !force {
            let Some((handle, _)) = self.handle(handle_id).await? else {
                return Ok(ReleaseOutcome::NotAllocated);
            };
            let blocks = self.blocks_of(&handle).await?;
            let held = handle.addresses.iter().any(|a| {
                blocks.values().any(|b| {
                    b.block
                        .ordinal_of(a.ip)
                        .and_then(|o| b.block.allocations.get(&o))
                        .is_some_and(|alloc| alloc.handle == handle_id)
                })
            });
            if held {
                return Ok(ReleaseOutcome::InUse(handle_id.to_string()));
            }
        }
        Ok(match self.release(handle_id).await? {
            Some(_) => ReleaseOutcome::Released(handle_id.to_string()),
            None => ReleaseOutcome::NotAllocated,
        })
    }

    /// Releases a handle only if its document is still at `revision`.
    pub async fn release_handle_at(
        &self,
        handle_id: &str,
        revision: u64,
    ) -> Result<ReleaseOutcome, IpamError> {
        self.retry_conflicts(|| async {
            let Some((handle, current)) = self.handle(handle_id).await? else {
                return Ok(ReleaseOutcome::NotAllocated);
            };
            if current != revision {
                return Ok(ReleaseOutcome::Changed);
            }
            let blocks = self.blocks_of(&handle).await?;
            self.store
                .commit(plan_release(&handle, current, &blocks, unix_now()))
                .await?;
            Ok(ReleaseOutcome::Released(handle_id.to_string()))
        })
        .await
    }

    /// Gives `node`'s blocks that have been empty for the grace period back to the
    /// pools (see `plan_empty_block_release`). Returns the released blocks' keys.
    pub async fn release_empty_blocks(&self, node: &str) -> Result<Vec<String>, IpamError> {
        self.retry_conflicts(|| async {
            let (blocks, config, index) =
                tokio::join!(self.blocks(), self.config(), self.affinity_index(node));
            let (blocks, index) = (blocks?, index?);
            let view = BlockView {
                blocks: &blocks,
                affinity_index: &index,
                complete: true,
            };
            let writes = plan_empty_block_release(node, view, &config?, unix_now());
            let keys = writes
                .iter()
                .map(|w| w.key().to_string())
                .filter(|key| key.starts_with("blocks/"))
                .collect();
            if !writes.is_empty() {
                self.store.commit(writes).await?;
            }
            Ok(keys)
        })
        .await
    }

    /// Frees everything a departed node holds: its blocks, its tunnel addresses, its
    /// node record, and (with `force`) the addresses of pods still recorded on it, in
    /// its blocks or borrowed from others. Without `force` it refuses while any pod
    /// address remains. A block of the node that still lends addresses to pods on
    /// other nodes stays, without affinity, until it empties. Step by step, each step a
    /// CAS commit: safe to re-run after an interruption.
    pub async fn release_node(&self, node: &str, force: bool) -> Result<NodeRelease, IpamError> {
        let tunnel = tunnel_handle_id(node);
        let blocks = self.blocks().await?;
        // Every address held for the node, in its own blocks or borrowed from others;
        // all but its tunnel addresses belong to pods.
        let held: Vec<(std::net::IpAddr, String)> = blocks
            .values()
            .flat_map(|b| {
                b.block
                    .allocations
                    .iter()
                    .filter(|(_, a)| a.attrs.node == node)
                    .map(|(ordinal, a)| (b.block.ip_at(*ordinal), a.handle.clone()))
            })
            .collect();
        let in_use: Vec<&(std::net::IpAddr, String)> = held
            .iter()
            .filter(|(_, handle)| *handle != tunnel)
            .collect();
        if !in_use.is_empty() && !force {
            let examples: Vec<String> = in_use
                .iter()
                .take(3)
                .map(|(ip, handle)| format!("{ip} of {handle}"))
                .collect();
            return Err(IpamError::NodeNotEmpty {
                node: node.to_string(),
                count: in_use.len(),
                examples: examples.join(", "),
            });
        }
        let mut report = NodeRelease::default();
        let handles: BTreeSet<&String> = held
            .iter()
            .map(|(_, handle)| handle)
            .chain([&tunnel])
            .collect();
        for handle in handles {
            if self.release(handle).await?.is_some() {
                report.handles_released.push(handle.clone());
                continue;
            }
            // No handle document: free the addresses it left in the blocks.
            for (ip, _) in held.iter().filter(|(_, h)| h == handle) {
                if let ReleaseOutcome::Released(_) = self.release_ip(*ip, None, true).await? {
                    report.handles_released.push(handle.clone());
                }
            }
        }
        report.blocks_released = self
            .retry_conflicts(|| async {
                let (blocks, index) = tokio::join!(self.blocks(), self.affinity_index(node));
                let (blocks, index) = (blocks?, index?);
                let mut writes: Vec<Write> = blocks
                    .iter()
                    .filter(|(_, b)| b.block.affinity.as_deref() == Some(node))
                    .map(|(key, b)| {
                        let expect = Expect::Revision(b.revision);
                        if b.block.allocations.is_empty() {
                            return Write::Delete {
                                key: key.clone(),
                                expect,
                            };
                        }
                        let mut unaffine = b.block.clone();
                        unaffine.affinity = None;
                        Write::Put {
                            key: key.clone(),
                            value: serde_json::to_string(&unaffine).expect("block serialises"),
                            expect,
                        }
                    })
                    .collect();
                let keys: Vec<String> = writes.iter().map(|w| w.key().to_string()).collect();
                writes.extend(index.into_iter().map(|(key, revision)| Write::Delete {
                    key,
                    expect: Expect::Revision(revision),
                }));
                if !writes.is_empty() {
                    self.store.commit(writes).await?;
                }
                Ok(keys)
            })
            .await?;
        let key = node_key(node);
        if let Some(v) = self.store.get(&key).await? {
            self.store
                .commit(vec![Write::Delete {
                    key,
                    expect: Expect::Revision(v.revision),
                }])
                .await?;
            report.node_record_deleted = true;
        }
        Ok(report)
    }

    /// The handles of `network` on `node` that are not in `keep` (CNI GC's
    /// valid attachments): the ones to tear down and release.
    pub async fn stale_handles(
        &self,
        network: &str,
        node: &str,
        keep: &BTreeSet<String>,
    ) -> Result<Vec<Handle>, IpamError> {
        Ok(self
            .handles()
            .await?
            .into_iter()
            .filter(|h| h.network == network && h.attrs.node == node && !keep.contains(&h.id))
            .collect())
    }

    /// Runs a read-plan-commit loop, retrying compare-and-swap conflicts with jittered
    /// backoff. Within one process, such loops on the same store take turns: a
    /// process never races itself (many concurrent allocations on one block would
    /// otherwise starve each other); processes and hosts coordinate through the store.
    async fn retry_conflicts<T, F, Fut>(&self, mut attempt_once: F) -> Result<T, IpamError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, IpamError>>,
    {
        let turn = local_turn(&self.store.location());
        let _turn = turn.lock().await;
        let _host_turn = match &self.host_lock {
            Some(path) => Some(exclusive_turn(path).await?),
            None => None,
        };
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            match attempt_once().await {
                Err(IpamError::Store(StoreError::Conflict { key })) => {
                    attempts += 1;
                    let elapsed = started.elapsed();
                    if elapsed > CONFLICT_DEADLINE {
                        return Err(IpamError::TooManyConflicts { attempts, elapsed });
                    }
                    tracing::debug!(%key, attempts, "conflicting update, retrying");
                    tokio::time::sleep(conflict_backoff(attempts)).await;
                }
                other => return other,
            }
        }
    }
}

fn decode<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
    v: &Versioned,
) -> Result<T, StoreError> {
    serde_json::from_str(&v.value).map_err(|e| StoreError::Corrupt {
        location: store.location(),
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn decode_pools(
    store: &dyn Store,
    entries: &[(String, Versioned)],
) -> Result<Vec<Pool>, StoreError> {
    Ok(decode_all(store, entries)?
        .into_iter()
        .map(|(_, pool, _)| pool)
        .collect())
}

/// The cluster's IPAM settings document, or the defaults when it was never written.
fn decode_config(store: &dyn Store, found: Option<&Versioned>) -> Result<IpamConfig, StoreError> {
    found.map_or(Ok(IpamConfig::default()), |v| {
        decode(store, IPAM_CONFIG_KEY, v)
    })
}

/// Key -> revision, for index entries whose presence is all that counts.
fn revisions(entries: Vec<(String, Versioned)>) -> BTreeMap<String, u64> {
    entries
        .into_iter()
        .map(|(key, v)| (key, v.revision))
        .collect()
}

fn decode_blocks(
    store: &dyn Store,
    entries: &[(String, Versioned)],
) -> Result<BTreeMap<String, StoredBlock>, StoreError> {
    Ok(decode_all(store, entries)?
        .into_iter()
        .map(|(key, block, revision)| (key, StoredBlock { block, revision }))
        .collect())
}

fn decode_all<T: DeserializeOwned>(
    store: &dyn Store,
    entries: &[(String, Versioned)],
) -> Result<Vec<(String, T, u64)>, StoreError> {
    entries
        .iter()
        .map(|(key, v)| Ok((key.clone(), decode(store, key, v)?, v.revision)))
        .collect()
}

/// Waits (up to the conflict deadline) for the exclusive lock on `path`; the lock is
/// held until the returned file is dropped. A holder may remove the file before it
/// lets go (`remove_lock_file`): a waiter that then gets the lock of the removed file
/// starts over on the path, so two processes never both think they hold it.
pub async fn exclusive_turn(path: &std::path::Path) -> Result<std::fs::File, IpamError> {
    use std::os::unix::fs::MetadataExt;
    let error = |reason: String| IpamError::HostLock {
        path: path.display().to_string(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| error(e.to_string()))?;
    }
    let deadline = Instant::now() + CONFLICT_DEADLINE;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| error(e.to_string()))?;
        let file = match file.try_lock() {
            // Free: no thread needed (starting one costs more than the lock).
            Ok(()) => file,
            Err(std::fs::TryLockError::WouldBlock) => {
                // flock blocks the thread: wait for it off the runtime, with a deadline.
                let waiting = tokio::task::spawn_blocking(move || file.lock().map(|()| file));
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, waiting).await {
                    Ok(Ok(Ok(file))) => file,
                    Ok(Ok(Err(e))) => return Err(error(e.to_string())),
                    Ok(Err(e)) => return Err(error(e.to_string())),
                    Err(_) => {
                        return Err(error(format!(
                            "still held by another process after {CONFLICT_DEADLINE:?}"
                        )))
                    }
                }
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(error(e.to_string())),
        };
        let held = file.metadata().map_err(|e| error(e.to_string()))?;
        match std::fs::metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Ok(file),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(error(e.to_string())),
        }
    }
}

/// Removes the lock file at `path` while its lock is still held (see `exclusive_turn`).
pub fn remove_lock_file(path: &std::path::Path, _held: &std::fs::File) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "remove lock file");
        }
    }
}

/// The in-process turn for writers of one store location.
fn local_turn(location: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static TURNS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let turns = TURNS.get_or_init(Default::default);
    let mut turns = turns.lock().unwrap_or_else(|e| e.into_inner());
    turns.entry(location.to_string()).or_default().clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::AllocationRequest;
    use crate::model::AllocationAttrs;
    use crate::store::file::FileStore;
    use crate::store::{Found, Read, Versioned, WatchReceiver};

    /// A store whose commits apply and then report the store unavailable, as an etcd
    /// whose answer is lost does.
    struct LosesAnswers(FileStore);

    #[async_trait::async_trait]
    impl Store for LosesAnswers {
        fn location(&self) -> String {
            self.0.location()
        }
        async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.0.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
            self.0.list(prefix).await
        }
        async fn list_and_watch(&self, prefix: &str) -> Result<(Found, WatchReceiver), StoreError> {
            self.0.list_and_watch(prefix).await
        }
        async fn read(&self, reads: &[Read]) -> Result<Vec<Found>, StoreError> {
            self.0.read(reads).await
        }
        async fn commit(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
            let allocating = writes.iter().any(|w| w.key().starts_with("handles/"))
                && writes.iter().all(|w| matches!(w, Write::Put { .. }));
            let revision = self.0.commit(writes).await?;
            if allocating {
                return Err(StoreError::Unavailable {
                    location: self.location(),
                    reason: "the answer was lost".into(),
                });
            }
            Ok(revision)
        }
        async fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
            self.0.watch(prefix, after).await
        }
        async fn check_writable(&self) -> Result<(), StoreError> {
            self.0.check_writable().await
        }
    }

    #[tokio::test]
    async fn an_allocation_whose_commit_answer_was_lost_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let store = LosesAnswers(FileStore::new(dir.path().join("store")));
        let ipam = Ipam::new(&store);
        let pool = Pool::with_defaults("10.9.0.0/24".parse().unwrap(), None).unwrap();
        ipam.ensure_pools(&[pool]).await.unwrap();
        let request = AllocationRequest {
            handle_id: "n.c1.eth0".into(),
            network: "n".into(),
            attrs: AllocationAttrs {
                node: "n1".into(),
                ..Default::default()
            },
            host_interface: None,
            pool_filter: vec![],
        };
        let err = ipam.allocate(&request).await.unwrap_err();
        assert!(
            matches!(err, IpamError::Store(StoreError::Unavailable { .. })),
            "{err}"
        );
        assert!(
            ipam.handle("n.c1.eth0").await.unwrap().is_none(),
            "the handle stayed"
        );
        let held: usize = ipam
            .blocks()
            .await
            .unwrap()
            .values()
            .map(|b| b.block.allocations.len())
            .sum();
        assert_eq!(held, 0, "an address stayed allocated");
    }
}
