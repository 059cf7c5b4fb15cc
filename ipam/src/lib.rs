//! Calyx IPAM: cluster pools carved into per-node blocks, addresses allocated to
//! handles (one per attachment: network + container + interface), all kept as JSON
//! documents in a `Store` (embedded file store or etcd).

pub mod allocator;
pub mod check;
pub mod model;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::allocator::{plan_allocation, plan_release, AllocationRequest, StoredBlock};
use crate::model::{handle_key, pool_key, Handle, NodeRecord, Pool};
use crate::store::{conflict_backoff, Expect, Store, StoreError, Versioned, Write};

/// What a targeted release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Released(String),
    NotAllocated,
    /// It changed since it was reported: left alone.
    Changed,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("pool exhausted: {0}")]
    PoolExhausted(String),
    #[error("no enabled address pool to allocate from")]
    NoPools,
    #[error(
        "gave up after {attempts} conflicting updates in {elapsed:?}; the datastore is too busy"
    )]
    TooManyConflicts { attempts: u32, elapsed: Duration },
}

/// How long an operation keeps retrying compare-and-swap conflicts.
const CONFLICT_DEADLINE: Duration = Duration::from_secs(10);

pub struct Ipam<'s> {
    store: &'s dyn Store,
}

impl<'s> Ipam<'s> {
    pub fn new(store: &'s dyn Store) -> Ipam<'s> {
        Ipam { store }
    }

    pub fn store(&self) -> &'s dyn Store {
        self.store
    }

    pub async fn pools(&self) -> Result<Vec<Pool>, IpamError> {
        Ok(decode_all(self.store, &self.store.list("pools/").await?)?
            .into_iter()
            .map(|(_, pool, _)| pool)
            .collect())
    }

    /// Creates the given pools when the store has none yet (first use of a cluster).
    pub async fn ensure_pools(&self, wanted: &[Pool]) -> Result<(), IpamError> {
        if wanted.is_empty() || !self.store.list("pools/").await?.is_empty() {
            return Ok(());
        }
        let writes = wanted
            .iter()
            .map(|pool| Write::Put {
                key: pool_key(&pool.name),
                value: serde_json::to_string(pool).expect("pool serialises"),
                expect: Expect::Absent,
            })
            .collect();
        match self.store.commit(writes).await {
            // Someone else created them at the same moment: fine either way.
            Ok(_) | Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn blocks(&self) -> Result<BTreeMap<String, StoredBlock>, IpamError> {
        Ok(decode_all(self.store, &self.store.list("blocks/").await?)?
            .into_iter()
            .map(|(key, block, revision)| (key, StoredBlock { block, revision }))
            .collect())
    }

    pub async fn handle(&self, id: &str) -> Result<Option<(Handle, u64)>, IpamError> {
        let key = handle_key(id);
        match self.store.get(&key).await? {
            Some(v) => Ok(Some((decode(self.store, &key, &v)?, v.revision))),
            None => Ok(None),
        }
    }

    pub async fn nodes(&self) -> Result<Vec<(NodeRecord, u64)>, IpamError> {
        Ok(decode_all(self.store, &self.store.list("nodes/").await?)?
            .into_iter()
            .map(|(_, node, revision)| (node, revision))
            .collect())
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
    pub async fn allocate(&self, request: &AllocationRequest) -> Result<(Handle, bool), IpamError> {
        self.retry_conflicts(|| async {
            // Three independent reads: one round trip's wait instead of three on etcd.
            let (existing, pools, blocks) =
                tokio::join!(self.handle(&request.handle_id), self.pools(), self.blocks());
            if let Some((existing, _)) = existing? {
                return Ok((existing, false));
            }
            let (pools, blocks) = (pools?, blocks?);
            let plan = plan_allocation(&pools, &blocks, request)?;
            self.store.commit(plan.writes).await?;
            Ok((plan.handle, true))
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
            let blocks = self.blocks().await?;
            self.store
                .commit(plan_release(&handle, revision, &blocks))
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
    /// When the allocation's handle exists, the whole handle is released.
    pub async fn release_ip(
        &self,
        ip: std::net::IpAddr,
        expected_seq: Option<u64>,
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
                self.store
                    .commit(plan_release(&handle, revision, &blocks))
                    .await?;
                return Ok(ReleaseOutcome::Released(allocation.handle));
            }
            let mut block = stored.block.clone();
            block.release(ordinal, &allocation.handle, allocation.seq);
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
            let blocks = self.blocks().await?;
            self.store
                .commit(plan_release(&handle, current, &blocks))
                .await?;
            Ok(ReleaseOutcome::Released(handle_id.to_string()))
        })
        .await
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

fn decode_all<T: DeserializeOwned>(
    store: &dyn Store,
    entries: &[(String, Versioned)],
) -> Result<Vec<(String, T, u64)>, StoreError> {
    entries
        .iter()
        .map(|(key, v)| Ok((key.clone(), decode(store, key, v)?, v.revision)))
        .collect()
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
