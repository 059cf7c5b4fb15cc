//! The agent's copy of the cluster: every node record, and what the overlay needs of
//! every block, loaded by one list per prefix and kept current by a watch that goes on
//! exactly from that list. A reconcile reads this memory instead of the whole datastore, and
//! only changes that alter the overlay wake the reconcile loop: not a node's heartbeat,
//! nor a pod starting or stopping in its own node's block. (Without it every pod event
//! anywhere made every agent re-read every node and every block.)
//!
//! The same blocks say which pod holds each address; with a publisher for them, the
//! policy controller learns a new pod's addresses at ADD, seconds before the API
//! reports status.podIPs, without a second watch.
//!
//! A watch that fails (etcd unreachable, or compacted past our revision) is followed by
//! a fresh list after a backoff, so the cache converges again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calyx_ipam::model::{Block, NodeRecord};
use calyx_ipam::store::{Store, StoreError, WatchEvent};

/// Called when the overlay may need to change.
pub type OnChange = Arc<dyn Fn() + Send + Sync>;

use crate::overlay::desired::BlockRouting;
use crate::source::{PodAddresses, Publisher};

/// What the cache keeps of a block: its routing, and the pods its addresses are for.
#[derive(Clone)]
struct BlockEntry {
    routing: BlockRouting,
    pods: Vec<((String, String), std::net::IpAddr)>,
}

impl BlockEntry {
    fn of(block: &Block) -> BlockEntry {
        BlockEntry {
            routing: BlockRouting::of(block),
            pods: block
                .allocations
                .iter()
                .filter_map(|(&ordinal, a)| {
                    let pod = (a.attrs.namespace.clone()?, a.attrs.pod.clone()?);
                    Some((pod, block.ip_at(ordinal)))
                })
                .collect(),
        }
    }
}

/// What a change to the cache changed.
#[derive(Default, Clone, Copy)]
struct Changed {
    overlay: bool,
    pods: bool,
}

/// One prefix's documents, by key.
struct Section<T> {
    items: BTreeMap<String, T>,
    listed: bool,
}

impl<T> Default for Section<T> {
    fn default() -> Self {
        Section {
            items: BTreeMap::new(),
            listed: false,
        }
    }
}

#[derive(Default)]
struct Contents {
    nodes: Section<NodeRecord>,
    blocks: Section<BlockEntry>,
}

/// How the documents under one prefix enter the cache.
trait Entry: Sized + Clone {
    const PREFIX: &'static str;
    fn decode(json: &str) -> Result<Self, serde_json::Error>;
    /// Whether replacing `old` by `new` changes the overlay.
    fn changes_overlay(old: &Self, new: &Self) -> bool;
    /// Whether these documents say which pod holds which address.
    const HOLDS_PODS: bool = false;
    /// Whether replacing `old` by `new` changes which pod holds which address.
    fn changes_pods(_old: &Self, _new: &Self) -> bool {
        false
    }
    fn section(contents: &mut Contents) -> &mut Section<Self>;
}

impl Entry for NodeRecord {
    const PREFIX: &'static str = calyx_ipam::model::NODES_PREFIX;
    fn decode(json: &str) -> Result<Self, serde_json::Error> {
        NodeRecord::from_document(json)
    }
    /// Heartbeats are judged at each resync (liveness), not on arrival.
    fn changes_overlay(old: &Self, new: &Self) -> bool {
        let mut old = old.clone();
        old.heartbeat = new.heartbeat;
        old != *new
    }
    fn section(contents: &mut Contents) -> &mut Section<Self> {
        &mut contents.nodes
    }
}

impl Entry for BlockEntry {
    const PREFIX: &'static str = calyx_ipam::model::BLOCKS_PREFIX;
    const HOLDS_PODS: bool = true;
    fn decode(json: &str) -> Result<Self, serde_json::Error> {
        Ok(BlockEntry::of(&Block::from_document(json)?))
    }
    fn changes_overlay(old: &Self, new: &Self) -> bool {
        !old.routing.routes_like(&new.routing)
    }
    fn changes_pods(old: &Self, new: &Self) -> bool {
        old.pods != new.pods
    }
    fn section(contents: &mut Contents) -> &mut Section<Self> {
        &mut contents.blocks
    }
}

pub struct ClusterCache {
    contents: Mutex<Contents>,
    /// Where the pods' addresses go, if anyone wants them.
    pods: Option<Publisher<PodAddresses>>,
    /// Why the datastore cannot be followed right now (None while both watches run).
    problems: Mutex<BTreeMap<&'static str, String>>,
}

/// How long to wait before listing again after a watch failed, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl ClusterCache {
    /// Starts following `nodes/` and `blocks/`; `changed` is called whenever the
    /// overlay may need to change (including when a listing completes).
    pub fn spawn(
        store: &'static dyn Store,
        changed: OnChange,
        pods: Option<Publisher<PodAddresses>>,
    ) -> Arc<ClusterCache> {
        let cache = Arc::new(ClusterCache {
            contents: Mutex::new(Contents::default()),
            pods,
            problems: Mutex::new(BTreeMap::new()),
        });
        tokio::spawn(follow::<NodeRecord>(cache.clone(), store, changed.clone()));
        tokio::spawn(follow::<BlockEntry>(cache.clone(), store, changed));
        cache
    }

    /// Every node and block; None until both prefixes have been listed once (an
    /// empty cluster must not be mistaken for one not read yet).
    pub fn snapshot(&self) -> Option<(Vec<NodeRecord>, Vec<BlockRouting>)> {
        let contents = self.lock();
        if !(contents.nodes.listed && contents.blocks.listed) {
            return None;
        }
        Some((
            contents.nodes.items.values().cloned().collect(),
            contents
                .blocks
                .items
                .values()
                .map(|b| b.routing.clone())
                .collect(),
        ))
    }

    /// Hands the pods' addresses to their publisher, once blocks are listed.
    fn publish_pods(&self) {
        let Some(publisher) = &self.pods else {
            return;
        };
        let addresses = {
            let contents = self.lock();
            if !contents.blocks.listed {
                return;
            }
            let mut addresses = PodAddresses::default();
            for block in contents.blocks.items.values() {
                for (pod, ip) in &block.pods {
                    addresses.pods.entry(pod.clone()).or_default().push(*ip);
                }
            }
            addresses
        };
        publisher.publish(Arc::new(addresses));
    }

    /// What keeps the agent from following the datastore, for /readyz; None when
    /// every watch runs.
    pub fn datastore_problem(&self) -> Option<String> {
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        (!problems.is_empty()).then(|| {
            problems
                .iter()
                .map(|(prefix, why)| format!("{prefix}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    fn set_problem(&self, prefix: &'static str, problem: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(why) => problems.insert(prefix, why),
            None => problems.remove(prefix),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.contents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces a whole section with a fresh listing: what that changes (everything,
    /// for the first listing).
    fn replace<T: Entry>(&self, items: BTreeMap<String, T>) -> Changed {
        let mut contents = self.lock();
        let section = T::section(&mut contents);
        let all = !section.listed || section.items.len() != items.len();
        let mut changed = Changed {
            overlay: all,
            pods: all && T::HOLDS_PODS,
        };
        for (key, new) in &items {
            let c = change(section.items.get(key), new);
            changed.overlay |= c.overlay;
            changed.pods |= c.pods;
        }
        section.items = items;
        section.listed = true;
        changed
    }

    fn put<T: Entry>(&self, key: String, new: T) -> Changed {
        let mut contents = self.lock();
        let section = T::section(&mut contents);
        let changed = change(section.items.get(&key), &new);
        section.items.insert(key, new);
        changed
    }

    fn remove<T: Entry>(&self, key: &str) -> Changed {
        let gone = T::section(&mut self.lock()).items.remove(key).is_some();
        Changed {
            overlay: gone,
            pods: gone && T::HOLDS_PODS,
        }
    }
}

fn change<T: Entry>(old: Option<&T>, new: &T) -> Changed {
    match old {
        Some(old) => Changed {
            overlay: T::changes_overlay(old, new),
            pods: T::changes_pods(old, new),
        },
        None => Changed {
            overlay: true,
            pods: T::HOLDS_PODS,
        },
    }
}

/// Lists and watches one prefix for as long as the agent runs.
async fn follow<T: Entry>(cache: Arc<ClusterCache>, store: &'static dyn Store, changed: OnChange) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let error = follow_once::<T>(&cache, store, &changed).await;
        // A watch that served for a while earns a quick re-list; repeated failures
        // (etcd down) back off, so a broken watch never becomes a listing storm.
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(200);
        }
        if matches!(error, StoreError::Damaged { .. }) {
            // The cache keeps what it had, and so does the kernel: nothing is flushed.
            tracing::error!(prefix = T::PREFIX, error = %error, retry_in = ?backoff, "DATASTORE DAMAGED: keeping the last known cluster and the kernel state; not ready until it reads again");
        } else {
            tracing::warn!(prefix = T::PREFIX, error = %error, retry_in = ?backoff, "datastore watch ended; listing again");
        }
        cache.set_problem(T::PREFIX, Some(error.to_string()));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One list, then the watch from its revision until the watch fails.
async fn follow_once<T: Entry>(
    cache: &ClusterCache,
    store: &dyn Store,
    changed: &OnChange,
) -> StoreError {
    let (found, mut events) = match store.list_and_watch(T::PREFIX).await {
        Ok(listed) => listed,
        Err(e) => return e,
    };
    cache.set_problem(T::PREFIX, None);
    let items = found
        .into_iter()
        .filter_map(|(key, v)| decode_or_warn::<T>(&key, &v.value).map(|item| (key, item)))
        .collect();
    let listed = cache.replace::<T>(items);
    if listed.overlay {
        changed();
    }
    if listed.pods {
        cache.publish_pods();
    }
    while let Some(event) = events.recv().await {
        let what = match event {
            Ok(WatchEvent::Put { key, value }) => match decode_or_warn::<T>(&key, &value.value) {
                Some(item) => cache.put(key, item),
                None => cache.remove::<T>(&key),
            },
            Ok(WatchEvent::Delete { key, .. }) => cache.remove::<T>(&key),
            Err(e) => return e,
        };
        if what.overlay {
            changed();
        }
        if what.pods {
            cache.publish_pods();
        }
    }
    StoreError::Unavailable {
        location: store.location(),
        reason: "watch stream ended".into(),
    }
}

/// A document the agent cannot read is left out (and said so), not fatal: the rest of
/// the cluster still gets its routes.
fn decode_or_warn<T: Entry>(key: &str, json: &str) -> Option<T> {
    match T::decode(json) {
        Ok(item) => Some(item),
        Err(e) => {
            tracing::warn!(key, error = %e, "unreadable document; leaving it out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use calyx_e2e::etcd::Etcd;
    use calyx_ipam::model::{block_key, node_key, AllocationAttrs};
    use calyx_ipam::store::{self, Expect, Found, Read, Versioned, WatchReceiver, Write};

    use super::*;

    /// A real store that counts the listings made through it.
    struct Counting {
        inner: Box<dyn Store>,
        listings: AtomicUsize,
    }

    #[async_trait]
    impl Store for Counting {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Found, StoreError> {
            self.listings.fetch_add(1, Ordering::SeqCst);
            self.inner.list(prefix).await
        }
        async fn list_and_watch(&self, prefix: &str) -> Result<(Found, WatchReceiver), StoreError> {
            self.listings.fetch_add(1, Ordering::SeqCst);
            self.inner.list_and_watch(prefix).await
        }
        async fn read(&self, reads: &[Read]) -> Result<Vec<Found>, StoreError> {
            self.inner.read(reads).await
        }
        async fn commit(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
            self.inner.commit(writes).await
        }
        async fn watch(&self, prefix: &str, after: u64) -> Result<WatchReceiver, StoreError> {
            self.inner.watch(prefix, after).await
        }
        async fn check_writable(&self) -> Result<(), StoreError> {
            self.inner.check_writable().await
        }
    }

    fn node(name: &str, n: u8, heartbeat: u64) -> NodeRecord {
        NodeRecord {
            heartbeat,
            ..crate::overlay::desired::tests::node(name, n)
        }
    }

    fn block(cidr: &str, owner: &str) -> Block {
        Block::new(cidr.parse().unwrap(), "pool", owner)
    }

    fn put<T: serde::Serialize>(key: String, value: &T, expect: Expect) -> Write {
        Write::Put {
            key,
            value: serde_json::to_string(value).unwrap(),
            expect,
        }
    }

    /// Writes `value` at `key` over whatever is there; returns the store revision.
    async fn upsert<T: serde::Serialize>(s: &dyn Store, key: String, value: &T) -> u64 {
        let current = s.get(&key).await.unwrap();
        let expect = Expect::from_current(current.as_ref());
        s.commit(vec![put(key, value, expect)]).await.unwrap()
    }

    struct Followed {
        store: &'static Counting,
        cache: Arc<ClusterCache>,
        wakeups: Arc<AtomicUsize>,
    }

    fn follow_store(inner: Box<dyn Store>) -> Followed {
        let store: &'static Counting = Box::leak(Box::new(Counting {
            inner,
            listings: AtomicUsize::new(0),
        }));
        let wakeups = Arc::new(AtomicUsize::new(0));
        let counter = wakeups.clone();
        let cache = ClusterCache::spawn(
            store,
            Arc::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
            None,
        );
        Followed {
            store,
            cache,
            wakeups,
        }
    }

    /// Waits (up to 15 s) until the cache's snapshot satisfies `ok`.
    async fn until(
        cache: &ClusterCache,
        what: &str,
        ok: impl Fn(&[NodeRecord], &[BlockRouting]) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some((nodes, blocks)) = cache.snapshot() {
                if ok(&nodes, &blocks) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "cache never showed {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (up to 15 s) until the cache has called `changed` more than `before`
    /// times; returns the count. The cache calls it just after its contents change, so
    /// a snapshot can show a change a moment before its wake-up is counted.
    async fn woken_past(f: &Followed, before: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = f.wakeups.load(Ordering::SeqCst);
            if now > before {
                return now;
            }
            assert!(Instant::now() < deadline, "never woken past {before}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn follows_changes_and_wakes_only_for_the_overlay(inner: Box<dyn Store>) {
        let f = follow_store(inner);
        let store: &dyn Store = f.store;
        until(&f.cache, "the empty cluster", |n, b| {
            n.is_empty() && b.is_empty()
        })
        .await;
        upsert(store, node_key("a"), &node("a", 1, 1)).await;
        let mut own = block("10.244.1.0/26", "a");
        upsert(store, block_key(&own.cidr), &own).await;
        until(&f.cache, "node a and its block", |n, b| {
            n.len() == 1 && b.len() == 1
        })
        .await;
        // Two listings, node a and its block: four wake-ups, all counted before going on.
        let woken = woken_past(&f, 3).await;

        // A heartbeat and a pod in its own node's block: cached, but no wake-up.
        upsert(store, node_key("a"), &node("a", 1, 2)).await;
        let attrs = |node: &str| AllocationAttrs {
            node: node.into(),
            ..Default::default()
        };
        own.allocate("pod-1", attrs("a"), 0).unwrap();
        upsert(store, block_key(&own.cidr), &own).await;
        until(&f.cache, "the heartbeat and the pod", |n, b| {
            n[0].heartbeat == 2 && !b[0].empty
        })
        .await;
        // A wrong wake-up would come just after the change shows: give it the time to.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            f.wakeups.load(Ordering::SeqCst),
            woken,
            "woken for no overlay change"
        );

        // A borrowed address, a new node and a deleted block each wake it.
        own.allocate("pod-on-b", attrs("b"), 0).unwrap();
        upsert(store, block_key(&own.cidr), &own).await;
        until(&f.cache, "the lent address", |_, b| b[0].lent.len() == 1).await;
        let after_borrow = woken_past(&f, woken).await;
        upsert(store, node_key("b"), &node("b", 2, 1)).await;
        until(&f.cache, "node b", |n, _| n.len() == 2).await;
        let after_node = woken_past(&f, after_borrow).await;
        let current = store.get(&block_key(&own.cidr)).await.unwrap().unwrap();
        store
            .commit(vec![Write::Delete {
                key: block_key(&own.cidr),
                expect: Expect::Revision(current.revision),
            }])
            .await
            .unwrap();
        until(&f.cache, "the block gone", |_, b| b.is_empty()).await;
        woken_past(&f, after_node).await;
        assert_eq!(
            f.store.listings.load(Ordering::SeqCst),
            2,
            "one listing per prefix"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_changes_and_wakes_only_for_the_overlay_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/store", dir.path().display());
        follows_changes_and_wakes_only_for_the_overlay(store::open(&url).unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_changes_and_wakes_only_for_the_overlay_etcd() {
        let Some(etcd) = Etcd::start() else { return };
        follows_changes_and_wakes_only_for_the_overlay(store::open(&etcd.url()).unwrap()).await;
    }

    /// The blocks were last written long before etcd compacted its history (nodes
    /// heartbeat, blocks sit still): the watch must start from the listing's revision,
    /// not the newest block's, or it fails and lists again, over and over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_compacted_history_costs_no_listing_storm_and_an_outage_is_recovered() {
        let Some(mut etcd) = Etcd::start() else {
            return;
        };
        let writer = store::open(&etcd.url()).unwrap();
        let old = block("10.244.1.0/26", "a");
        upsert(writer.as_ref(), block_key(&old.cidr), &old).await;
        let mut revision = 0;
        for heartbeat in 1..20 {
            revision = upsert(writer.as_ref(), node_key("a"), &node("a", 1, heartbeat)).await;
        }
        etcd.compact(revision);

        let f = follow_store(store::open(&etcd.url()).unwrap());
        until(&f.cache, "node a and its block", |n, b| {
            n.len() == 1 && b.len() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            f.store.listings.load(Ordering::SeqCst),
            2,
            "listed again and again"
        );
        let new = block("10.244.1.64/26", "a");
        upsert(writer.as_ref(), block_key(&new.cidr), &new).await;
        until(&f.cache, "the new block", |_, b| b.len() == 2).await;

        // etcd goes away and comes back: the cache lists again and follows on.
        etcd.stop();
        tokio::time::sleep(Duration::from_secs(1)).await;
        etcd.resume();
        let writer = store::open(&etcd.url()).unwrap();
        let third = block("10.244.1.128/26", "a");
        upsert(writer.as_ref(), block_key(&third.cidr), &third).await;
        until(&f.cache, "the block written after the outage", |_, b| {
            b.len() == 3
        })
        .await;
        assert!(f.store.listings.load(Ordering::SeqCst) > 2);
    }
}
