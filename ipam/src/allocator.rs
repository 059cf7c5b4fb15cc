//! Allocation planning: from a snapshot of pools, blocks and the handle, compute the
//! writes that give a handle one address per family. Pure; the retry loop that reads
//! the snapshot and commits the plan lives in `Ipam`.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{block_key, handle_key, AllocationAttrs, Block, Handle, HandleAddress, Pool};
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
    pub attrs: AllocationAttrs,
    pub host_interface: Option<String>,
    /// Allocate only from these pools (by CIDR); empty means every enabled pool.
    pub pool_filter: Vec<ipnetwork::IpNetwork>,
}

/// Picks one address per IP family that has a usable pool: from a block affine to the
/// node when one has room, else from a newly claimed block.
pub fn plan_allocation(
    pools: &[Pool],
    blocks: &BTreeMap<String, StoredBlock>,
    request: &AllocationRequest,
) -> Result<AllocationPlan, IpamError> {
    let node = &request.attrs.node;
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
        let pool_names: BTreeSet<&str> = family_pools.iter().map(|p| p.name.as_str()).collect();
        let affine = blocks.values().find(|b| {
            b.block.affinity.as_deref() == Some(node.as_str())
                && pool_names.contains(b.block.pool.as_str())
                && b.block.free_count() > 0
        });
        let (mut block, expect) = match affine {
            Some(stored) => (stored.block.clone(), Expect::Revision(stored.revision)),
            None => (claim_block(&family_pools, blocks, node)?, Expect::Absent),
        };
        let (ordinal, seq) = block
            .allocate(&request.handle_id, request.attrs.clone())
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
    Ok(AllocationPlan { handle, writes })
}

/// The first block of the first pool (in order) that nobody has claimed yet.
fn claim_block(
    pools: &[&Pool],
    blocks: &BTreeMap<String, StoredBlock>,
    node: &str,
) -> Result<Block, IpamError> {
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
                return Ok(Block::new(cidr, &pool.name, node));
            }
        }
    }
    let family = if pools[0].is_ipv4() { "IPv4" } else { "IPv6" };
    let names: Vec<String> = pools.iter().map(|p| p.cidr.to_string()).collect();
    Err(IpamError::PoolExhausted(format!(
        "no free {family} address for node {node} in pool(s) {}",
        names.join(", ")
    )))
}

/// The writes that free every address of `handle` (only where the block still holds
/// it at the same sequence number) and delete the handle.
pub fn plan_release(
    handle: &Handle,
    handle_revision: u64,
    blocks: &BTreeMap<String, StoredBlock>,
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
            block.release(ordinal, &handle.id, addr.seq);
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let plan = plan_allocation(&pools, &BTreeMap::new(), &request("h1", "n1")).unwrap();
        assert_eq!(plan.handle.addresses[0].ip.to_string(), "10.244.0.0");
        assert!(matches!(
            &plan.writes[0],
            Write::Put { key, expect: Expect::Absent, .. } if key == "blocks/10.244.0.0-26"
        ));
        assert!(matches!(&plan.writes[1], Write::Put { key, .. } if key == "handles/h1"));
    }

    #[test]
    fn nodes_get_separate_blocks_and_fill_them_before_claiming_more() {
        let pools = vec![pool("10.0.0.0/24", 30)];
        let mut blocks = BTreeMap::new();
        let mut seen = Vec::new();
        for i in 0..5 {
            let plan = plan_allocation(&pools, &blocks, &request(&format!("a{i}"), "n1")).unwrap();
            seen.push(plan.handle.addresses[0].ip.to_string());
            apply(&mut blocks, &plan);
        }
        assert_eq!(
            seen,
            ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        );
        let plan = plan_allocation(&pools, &blocks, &request("b", "n2")).unwrap();
        assert_eq!(plan.handle.addresses[0].block.to_string(), "10.0.0.8/30");
    }

    #[test]
    fn dual_stack_gets_one_address_per_family_in_one_plan() {
        let pools = vec![pool("10.244.0.0/16", 26), pool("fd00:10:244::/56", 122)];
        let plan = plan_allocation(&pools, &BTreeMap::new(), &request("h", "n1")).unwrap();
        let ips: Vec<String> = plan
            .handle
            .addresses
            .iter()
            .map(|a| a.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.244.0.0", "fd00:10:244::"]);
        assert_eq!(plan.writes.len(), 3);
    }

    #[test]
    fn exhausted_and_disabled_pools_give_clear_errors() {
        let pools = vec![pool("10.0.0.0/30", 31)];
        let mut blocks = BTreeMap::new();
        for i in 0..4 {
            let plan = plan_allocation(&pools, &blocks, &request(&format!("h{i}"), "n1")).unwrap();
            apply(&mut blocks, &plan);
        }
        let err = plan_allocation(&pools, &blocks, &request("h5", "n1")).unwrap_err();
        assert!(
            matches!(err, IpamError::PoolExhausted(ref m) if m.contains("10.0.0.0/30")),
            "{err}"
        );
        let mut disabled = pools.clone();
        disabled[0].disabled = true;
        let err = plan_allocation(&disabled, &BTreeMap::new(), &request("h", "n1")).unwrap_err();
        assert!(matches!(err, IpamError::NoPools));
    }

    #[test]
    fn release_frees_only_what_the_handle_still_holds() {
        let pools = vec![pool("10.0.0.0/24", 30)];
        let mut blocks = BTreeMap::new();
        let plan = plan_allocation(&pools, &blocks, &request("h", "n1")).unwrap();
        apply(&mut blocks, &plan);
        let writes = plan_release(&plan.handle, 7, &blocks);
        assert_eq!(writes.len(), 2);
        let Write::Put { value, expect, .. } = &writes[0] else {
            panic!()
        };
        assert_eq!(*expect, Expect::Revision(1));
        let block: Block = serde_json::from_str(value).unwrap();
        assert!(block.allocations.is_empty());
        assert_eq!(block.released, [0]);
        assert!(matches!(
            &writes[1],
            Write::Delete {
                expect: Expect::Revision(7),
                ..
            }
        ));
    }
}
