//! Allocation planning: from a snapshot of pools, blocks and the handle, compute the
//! writes that give a handle one address per family. Pure; the retry loop that reads
//! the snapshot and commits the plan lives in `Ipam`.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{
    affinity_key, block_key, handle_key, AllocationAttrs, Block, Handle, HandleAddress, IpamConfig,
    Pool,
};
use crate::store::{Expect, Write};
use crate::IpamError;

/// A block as read from the store, with the revision a write must expect.
#[derive(Debug, Clone)]
pub struct StoredBlock {
    pub block: Block,
    pub revision: u64,
}

#[derive(Debug, Clone)]
pub struct AllocationPlan {
    pub handle: Handle,
    pub writes: Vec<Write>,
}

#[derive(Debug, Clone)]
pub struct AllocationRequest {
    pub handle_id: String,
    pub network: String,
    /// `attrs.node` is the node the address is for; `attrs.time` is "now" for the
    /// cooldown and the empty-block clock.
    pub attrs: AllocationAttrs,
    pub host_interface: Option<String>,
    /// Allocate only from these pools (by CIDR); empty means every enabled pool.
    pub pool_filter: Vec<ipnetwork::IpNetwork>,
}

/// The blocks an allocation is planned against.
#[derive(Debug, Clone, Copy)]
pub struct BlockView<'a> {
    pub blocks: &'a BTreeMap<String, StoredBlock>,
    /// The requesting node's `affinities/` index entries, with their revisions.
    pub affinity_index: &'a BTreeMap<String, u64>,
    /// False when `blocks` holds only the node's own blocks, as read through the
    /// index (the common, cheap case): claiming and borrowing need every block.
    pub complete: bool,
}

impl<'a> BlockView<'a> {
    /// Every block, no index entries known (claims expect none).
    pub fn all(blocks: &'a BTreeMap<String, StoredBlock>) -> BlockView<'a> {
        static NO_INDEX: BTreeMap<String, u64> = BTreeMap::new();
        BlockView {
            blocks,
            affinity_index: &NO_INDEX,
            complete: true,
        }
    }
}

/// Picks one address per IP family that has a usable pool: from a block affine to the
/// node when one has room, else from a newly claimed block (up to
/// `maxBlocksPerNode`), else, unless `strictAffinity`, borrowed from another node's
/// block (the allocation names this node, so the overlay routes the /32 here).
/// Ok(None) when the view is incomplete and the plan would need every block.
pub fn plan_allocation(
    pools: &[Pool],
    view: BlockView<'_>,
    config: &IpamConfig,
    request: &AllocationRequest,
) -> Result<Option<AllocationPlan>, IpamError> {
    let usable: Vec<&Pool> = pools
        .iter()
        .filter(|p| !p.disabled)
        .filter(|p| request.pool_filter.is_empty() || request.pool_filter.contains(&p.cidr))
        .collect();
    if usable.is_empty() {
        return Err(IpamError::NoPools);
    }
    let mut handle = Handle {
        id: request.handle_id.clone(),
        network: request.network.clone(),
        addresses: Vec::new(),
        host_interface: request.host_interface.clone(),
        attrs: request.attrs.clone(),
    };
    let mut writes = Vec::new();
    for v4 in [true, false] {
        let family_pools: Vec<&Pool> = usable
            .iter()
            .copied()
            .filter(|p| p.is_ipv4() == v4)
            .collect();
        if family_pools.is_empty() {
            continue;
        }
        let node = request.attrs.node.as_str();
        let (mut block, expect) = match choose_block(&family_pools, view, config, request)? {
            Choice::Use(block, expect) => (block, expect),
            Choice::Claim(block) => (block, Expect::Absent),
            Choice::NeedAllBlocks => return Ok(None),
        };
        // The index entry that finds the node's block again without reading every
        // block: written with the claim, or added when it is missing.
        let index_key = affinity_key(node, &block.cidr);
        let indexed = view.affinity_index.get(&index_key).copied();
        let claimed = expect == Expect::Absent;
        if block.affinity.as_deref() == Some(node) && (claimed || indexed.is_none()) {
            writes.push(Write::Put {
                value: serde_json::to_string(&block.cidr).expect("cidr serialises"),
                expect: indexed.map_or(Expect::Absent, Expect::Revision),
                key: index_key,
            });
        }
        let (ordinal, seq) = block
            .allocate(
                &request.handle_id,
                request.attrs.clone(),
                config.ip_cooldown_seconds,
            )
            .expect("chosen block has a free address");
        handle.addresses.push(HandleAddress {
            ip: block.ip_at(ordinal),
            block: block.cidr,
            seq,
        });
        writes.push(Write::Put {
            key: block_key(&block.cidr),
            value: serde_json::to_string(&block).expect("block serialises"),
            expect,
        });
    }
    writes.push(Write::Put {
        key: handle_key(&handle.id),
        value: serde_json::to_string(&handle).expect("handle serialises"),
        expect: Expect::Absent,
    });
    Ok(Some(AllocationPlan { handle, writes }))
}

enum Choice {
    /// Allocate in this existing block (its write expects the revision).
    Use(Block, Expect),
    /// Claim this new block for the node.
    Claim(Block),
    NeedAllBlocks,
}

/// The block to allocate from in one family.
fn choose_block(
    family_pools: &[&Pool],
    view: BlockView<'_>,
    config: &IpamConfig,
    request: &AllocationRequest,
) -> Result<Choice, IpamError> {
    let blocks = view.blocks;
    let node = request.attrs.node.as_str();
    let (now, cooldown) = (request.attrs.time, config.ip_cooldown_seconds);
    let pool_names: BTreeSet<&str> = family_pools.iter().map(|p| p.name.as_str()).collect();
    let in_family = || {
        blocks
            .values()
            .filter(|b| pool_names.contains(b.block.pool.as_str()))
    };
    let affine = || in_family().filter(|b| b.block.affinity.as_deref() == Some(node));
    if let Some(stored) = affine().find(|b| b.block.can_allocate(now, cooldown)) {
        return Ok(Choice::Use(
            stored.block.clone(),
            Expect::Revision(stored.revision),
        ));
    }
    if !view.complete {
        return Ok(Choice::NeedAllBlocks);
    }
    let owned = affine().count();
    let at_limit = config
        .max_blocks_per_node
        .is_some_and(|max| owned >= max as usize);
    if !at_limit {
        if let Some(block) = claim_block(family_pools, blocks, node) {
            return Ok(Choice::Claim(block));
        }
    }
    if !config.strict_affinity {
        // Borrow from the block with the most room, so borrowers spread out less.
        let lender = in_family()
            .filter(|b| b.block.affinity.as_deref() != Some(node))
            .filter(|b| b.block.can_allocate(now, cooldown))
            .max_by_key(|b| b.block.free_count());
        if let Some(stored) = lender {
            return Ok(Choice::Use(
                stored.block.clone(),
                Expect::Revision(stored.revision),
            ));
        }
    }
    let family = if family_pools[0].is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    };
    let names: Vec<String> = family_pools.iter().map(|p| p.cidr.to_string()).collect();
    let why = match (at_limit, config.strict_affinity) {
        (true, true) => format!(
            "node {node} has all of its maxBlocksPerNode ({owned}) blocks full and strictAffinity forbids borrowing"
        ),
        (false, true) => format!(
            "no free block left for node {node} and strictAffinity forbids borrowing"
        ),
        _ => format!("no free {family} address for node {node}"),
    };
    Err(IpamError::PoolExhausted(format!(
        "{why} in pool(s) {}",
        names.join(", ")
    )))
}

/// The first block of the first pool (in order) that nobody has claimed yet.
fn claim_block(
    pools: &[&Pool],
    blocks: &BTreeMap<String, StoredBlock>,
    node: &str,
) -> Option<Block> {
    for pool in pools {
        let claimed = blocks
            .values()
            .filter(|b| b.block.pool == pool.name)
            .count() as u128;
        // Existing blocks of the pool occupy at most `claimed` indices, so a free one is
        // found within the first claimed + 1.
        let limit = pool.block_count().min(claimed + 1);
        for index in 0..limit {
            let cidr = pool.block_cidr(index);
            if !blocks.contains_key(&block_key(&cidr)) {
                return Some(Block::new(cidr, &pool.name, node));
            }
        }
    }
    None
}

/// The writes that free every address of `handle` at `now` (Unix seconds; only where
/// the block still holds it at the same sequence number) and delete the handle.
pub fn plan_release(
    handle: &Handle,
    handle_revision: u64,
    blocks: &BTreeMap<String, StoredBlock>,
    now: u64,
) -> Vec<Write> {
    let mut updated: BTreeMap<String, (Block, u64)> = BTreeMap::new();
    for addr in &handle.addresses {
        let key = block_key(&addr.block);
        let Some(stored) = blocks.get(&key) else {
            continue;
        };
        let (block, _) = updated
            .entry(key)
            .or_insert_with(|| (stored.block.clone(), stored.revision));
        if let Some(ordinal) = block.ordinal_of(addr.ip) {
            block.release(ordinal, &handle.id, addr.seq, now);
        }
    }
    let mut writes: Vec<Write> = updated
        .into_iter()
        .map(|(key, (block, revision))| Write::Put {
            key,
            value: serde_json::to_string(&block).expect("block serialises"),
            expect: Expect::Revision(revision),
        })
        .collect();
    writes.push(Write::Delete {
        key: handle_key(&handle.id),
        expect: Expect::Revision(handle_revision),
    });
    writes
}

/// The deletes that give `node`'s empty blocks back to their pools: blocks empty for
/// at least the grace period (and the cooldown, whose memory goes with the block),
/// keeping the node at least one block per pool family; also empty blocks that no node
/// owns any more (left by `ipamctl node release` while they still lent addresses).
/// Each delete expects the revision read, so an allocation racing it wins and the
/// block stays.
pub fn plan_empty_block_release(
    node: &str,
    view: BlockView<'_>,
    config: &IpamConfig,
    now: u64,
) -> Vec<Write> {
    let blocks = view.blocks;
    let rest = config
        .empty_block_grace_seconds
        .max(config.ip_cooldown_seconds);
    let expired = |b: &Block| {
        b.allocations.is_empty()
            && b.empty_since
                .is_some_and(|since| now.saturating_sub(since) >= rest)
    };
    let delete = |(key, stored): (&String, &StoredBlock)| Write::Delete {
        key: key.clone(),
        expect: Expect::Revision(stored.revision),
    };
    let mut writes: Vec<Write> = blocks
        .iter()
        .filter(|(_, b)| b.block.affinity.is_none() && expired(&b.block))
        .map(delete)
        .collect();
    for v4 in [true, false] {
        let mine: Vec<(&String, &StoredBlock)> = blocks
            .iter()
            .filter(|(_, b)| b.block.affinity.as_deref() == Some(node))
            .filter(|(_, b)| b.block.is_ipv4() == v4)
            .collect();
        let keep_one = usize::from(mine.iter().all(|(_, b)| b.block.allocations.is_empty()));
        for (key, stored) in mine
            .into_iter()
            .filter(|(_, b)| expired(&b.block))
            .skip(keep_one)
        {
            writes.push(delete((key, stored)));
            let index = affinity_key(node, &stored.block.cidr);
            if let Some(revision) = view.affinity_index.get(&index) {
                writes.push(Write::Delete {
                    key: index,
                    expect: Expect::Revision(*revision),
                });
            }
        }
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Freed;

    fn pool(cidr: &str, block: u8) -> Pool {
        Pool::with_defaults(cidr.parse().unwrap(), Some(block)).unwrap()
    }

    fn request(handle: &str, node: &str) -> AllocationRequest {
        AllocationRequest {
            handle_id: handle.into(),
            network: "net".into(),
            attrs: AllocationAttrs {
                node: node.into(),
                ..Default::default()
            },
            host_interface: None,
            pool_filter: vec![],
        }
    }

    fn plan(
        pools: &[Pool],
        blocks: &BTreeMap<String, StoredBlock>,
        request: &AllocationRequest,
    ) -> Result<AllocationPlan, IpamError> {
        plan_with(pools, blocks, &IpamConfig::default(), request)
    }

    fn plan_with(
        pools: &[Pool],
        blocks: &BTreeMap<String, StoredBlock>,
        config: &IpamConfig,
        request: &AllocationRequest,
    ) -> Result<AllocationPlan, IpamError> {
        plan_allocation(pools, BlockView::all(blocks), config, request)
            .map(|plan| plan.expect("a complete view always plans"))
    }

    /// Applies a plan's block writes to the snapshot, as a commit would.
    fn apply(blocks: &mut BTreeMap<String, StoredBlock>, plan: &AllocationPlan) {
        for w in &plan.writes {
            if let Write::Put { key, value, .. } = w {
                if key.starts_with("blocks/") {
                    let block: Block = serde_json::from_str(value).unwrap();
                    let revision = blocks.get(key).map_or(1, |b| b.revision + 1);
                    blocks.insert(key.clone(), StoredBlock { block, revision });
                }
            }
        }
    }

    #[test]
    fn first_allocation_claims_a_block_for_the_node() {
        let pools = vec![pool("10.244.0.0/16", 26)];
        let plan = plan(&pools, &BTreeMap::new(), &request("h1", "n1")).unwrap();
        assert_eq!(plan.handle.addresses[0].ip.to_string(), "10.244.0.0");
        assert!(matches!(
            &plan.writes[1],
            Write::Put { key, expect: Expect::Absent, .. } if key == "blocks/10.244.0.0-26"
        ));
        assert!(matches!(&plan.writes[2], Write::Put { key, .. } if key == "handles/h1"));
    }

    #[test]
    fn nodes_get_separate_blocks_and_fill_them_before_claiming_more() {
        let pools = vec![pool("10.0.0.0/24", 30)];
        let mut blocks = BTreeMap::new();
        let mut seen = Vec::new();
        for i in 0..5 {
            let plan = plan(&pools, &blocks, &request(&format!("a{i}"), "n1")).unwrap();
            seen.push(plan.handle.addresses[0].ip.to_string());
            apply(&mut blocks, &plan);
        }
        assert_eq!(
            seen,
            ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        let plan = plan(&pools, &blocks, &request("b", "n2")).unwrap();
        assert_eq!(plan.handle.addresses[0].block.to_string(), "10.0.0.8/30");
    }

    #[test]
    fn a_claim_writes_the_index_and_the_own_blocks_view_cannot_claim() {
        let pools = vec![pool("10.0.0.0/24", 31)];
        let mut blocks = BTreeMap::new();
        let p = plan(&pools, &blocks, &request("h0", "n1")).unwrap();
        let keys: Vec<&str> = p.writes.iter().map(|w| w.key()).collect();
        assert_eq!(
            keys,
            [
                "affinities/n1/10.0.0.0-31",
                "blocks/10.0.0.0-31",
                "handles/h0"
            ]
        );
        apply(&mut blocks, &p);
        let index = BTreeMap::from([("affinities/n1/10.0.0.0-31".to_string(), 1)]);
        let own = BlockView {
            blocks: &blocks,
            affinity_index: &index,
            complete: false,
        };
        let config = IpamConfig::default();
        // Room in the own block: planned from the own view, no index write.
        let p = plan_allocation(&pools, own, &config, &request("h1", "n1"))
            .unwrap()
            .unwrap();
        assert_eq!(p.writes.len(), 2);
        apply(&mut blocks, &p);
        // Full: the own view cannot claim; it asks for every block.
        let own = BlockView {
            blocks: &blocks,
            affinity_index: &index,
            complete: false,
        };
        assert!(plan_allocation(&pools, own, &config, &request("h2", "n1"))
            .unwrap()
            .is_none());
        // A node's block without an index entry (older data) gets one on use.
        let mut blocks = BTreeMap::new();
        let first = plan(&pools, &blocks, &request("h0", "n1")).unwrap();
        apply(&mut blocks, &first);
        let p = plan(&pools, &blocks, &request("h1", "n1")).unwrap();
        assert!(matches!(
            &p.writes[0],
            Write::Put { key, expect: Expect::Absent, .. } if key == "affinities/n1/10.0.0.0-31"
        ));
    }

    #[test]
    fn dual_stack_gets_one_address_per_family_in_one_plan() {
        let pools = vec![pool("10.244.0.0/16", 26), pool("fd00:10:244::/56", 122)];
        let plan = plan(&pools, &BTreeMap::new(), &request("h", "n1")).unwrap();
        let ips: Vec<String> = plan
            .handle
            .addresses
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.244.0.0", "fd00:10:244::"]);
        // Per family a block and its index entry, then the handle.
        assert_eq!(plan.writes.len(), 5);
    }

    #[test]
    fn exhausted_and_disabled_pools_give_clear_errors() {
        let pools = vec![pool("10.0.0.0/30", 31)];
        let mut blocks = BTreeMap::new();
        for i in 0..4 {
            let plan = plan(&pools, &blocks, &request(&format!("h{i}"), "n1")).unwrap();
            apply(&mut blocks, &plan);
        }
        let err = plan(&pools, &blocks, &request("h5", "n1")).unwrap_err();
        assert!(
            matches!(err, IpamError::PoolExhausted(ref m) if m.contains("10.0.0.0/30")),
            "{err}"
        );
        let mut disabled = pools.clone();
        disabled[0].disabled = true;
        let err = plan(&disabled, &BTreeMap::new(), &request("h", "n1")).unwrap_err();
        assert!(matches!(err, IpamError::NoPools));
    }

    #[test]
    fn release_frees_only_what_the_handle_still_holds() {
        let pools = vec![pool("10.0.0.0/24", 30)];
        let mut blocks = BTreeMap::new();
        let plan = plan(&pools, &blocks, &request("h", "n1")).unwrap();
        apply(&mut blocks, &plan);
        let writes = plan_release(&plan.handle, 7, &blocks, 0);
        assert_eq!(writes.len(), 2);
        let Write::Put { value, expect, .. } = &writes[0] else {
            panic!()
        };
        assert_eq!(*expect, Expect::Revision(1));
        let block: Block = serde_json::from_str(value).unwrap();
        assert!(block.allocations.is_empty());
        assert_eq!(block.released, [Freed { ordinal: 0, at: 0 }]);
        assert_eq!(block.empty_since, Some(0));
        assert!(matches!(
            &writes[1],
            Write::Delete {
                expect: Expect::Revision(7),
                ..
            }
        ));
    }

    fn apply_release(blocks: &mut BTreeMap<String, StoredBlock>, handle: &Handle, now: u64) {
        for w in plan_release(handle, 1, blocks, now) {
            if let Write::Put { key, value, .. } = w {
                blocks.get_mut(&key).unwrap().block = serde_json::from_str(&value).unwrap();
            }
        }
    }

    /// Fills a /30 pool of /31 blocks: n1 takes 0-3 (both blocks), n2 must borrow.
    fn two_full_blocks_of_n1() -> (Vec<Pool>, BTreeMap<String, StoredBlock>) {
        let pools = vec![pool("10.0.0.0/30", 31)];
        let mut blocks = BTreeMap::new();
        for i in 0..3 {
            let p = plan(&pools, &blocks, &request(&format!("h{i}"), "n1")).unwrap();
            apply(&mut blocks, &p);
        }
        (pools, blocks)
    }

    #[test]
    fn without_a_free_block_a_node_borrows_unless_strict() {
        let (pools, mut blocks) = two_full_blocks_of_n1();
        let p = plan(&pools, &blocks, &request("b", "n2")).unwrap();
        assert_eq!(p.handle.addresses[0].ip.to_string(), "10.0.0.3");
        apply(&mut blocks, &p);
        let lender = &blocks["blocks/10.0.0.2-31"].block;
        assert_eq!(lender.affinity.as_deref(), Some("n1"), "affinity stays");
        assert_eq!(lender.borrower_of(1), Some("n2"));

        let (pools, blocks) = two_full_blocks_of_n1();
        let strict = IpamConfig {
            strict_affinity: true,
            ..Default::default()
        };
        let err = plan_with(&pools, &blocks, &strict, &request("b", "n2")).unwrap_err();
        assert!(
            matches!(&err, IpamError::PoolExhausted(m) if m.contains("strictAffinity")),
            "{err}"
        );
    }

    #[test]
    fn max_blocks_per_node_caps_claims() {
        let pools = vec![pool("10.0.0.0/24", 31)];
        let capped = IpamConfig {
            max_blocks_per_node: Some(1),
            strict_affinity: true,
            ..Default::default()
        };
        let mut blocks = BTreeMap::new();
        for i in 0..2 {
            let p = plan_with(&pools, &blocks, &capped, &request(&format!("h{i}"), "n1")).unwrap();
            apply(&mut blocks, &p);
        }
        let err = plan_with(&pools, &blocks, &capped, &request("h2", "n1")).unwrap_err();
        assert!(err.to_string().contains("maxBlocksPerNode (1)"), "{err}");
        // Not strict: the capped node borrows instead (here: from n2's block).
        let p = plan_with(&pools, &blocks, &capped, &request("x", "n2")).unwrap();
        apply(&mut blocks, &p);
        let loose = IpamConfig {
            strict_affinity: false,
            ..capped
        };
        let p = plan_with(&pools, &blocks, &loose, &request("h2", "n1")).unwrap();
        assert_eq!(p.handle.addresses[0].block.to_string(), "10.0.0.2/31");
    }

    #[test]
    fn empty_blocks_go_back_after_the_grace_period_but_one_stays() {
        let pools = vec![pool("10.0.0.0/24", 31)];
        let mut blocks = BTreeMap::new();
        let mut handles = Vec::new();
        for i in 0..6 {
            let p = plan(&pools, &blocks, &request(&format!("h{i}"), "n1")).unwrap();
            apply(&mut blocks, &p);
            handles.push(p.handle);
        }
        assert_eq!(blocks.len(), 3);
        // Empty the first two blocks at t=1000.
        for h in &handles[..4] {
            apply_release(&mut blocks, h, 1000);
        }
        let config = IpamConfig::default();
        assert!(
            plan_empty_block_release("n1", BlockView::all(&blocks), &config, 1000 + 899).is_empty()
        );
        let deletes = plan_empty_block_release("n1", BlockView::all(&blocks), &config, 1000 + 900);
        let keys: Vec<&str> = deletes
            .iter()
            .map(|w| match w {
                Write::Delete { key, .. } => key.as_str(),
                Write::Put { .. } => panic!("only deletes"),
            })
            .collect();
        assert_eq!(keys, ["blocks/10.0.0.0-31", "blocks/10.0.0.2-31"]);
        // With the third block emptied too, one of the three stays with the node.
        for h in &handles[4..] {
            apply_release(&mut blocks, h, 1000);
        }
        assert_eq!(
            plan_empty_block_release("n1", BlockView::all(&blocks), &config, 5000).len(),
            2
        );
        assert!(plan_empty_block_release("n2", BlockView::all(&blocks), &config, 5000).is_empty());
    }
}
