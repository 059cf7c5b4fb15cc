//! Consistency check and repair: what `ipamctl check` reports and `ipamctl release
//! --from-report` fixes. A report records the revision and sequence number of
//! everything it names, so a repair refuses what changed since.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::allocator::StoredBlock;
use crate::model::{Handle, NodeRecord, Pool};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProblemKind {
    /// The pod (or runtime attachment) the allocation was for no longer exists.
    PodGone,
    /// A handle lists an address its block does not hold for it.
    HandleWithoutAllocation,
    /// A block holds an address for a handle that does not exist.
    AllocationWithoutHandle,
    /// A block lies outside every pool.
    OutsidePools,
    /// A block is affine to a node that is not registered.
    UnknownNode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    pub kind: ProblemKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    /// Revision of the handle document when the report was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle_revision: Option<u64>,
    /// Sequence number of the block's allocation when the report was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub detail: String,
}

/// What is alive, to find allocations whose pod is gone.
#[derive(Debug, Clone, Default)]
pub struct LivePods {
    /// (namespace, pod name), e.g. from `kubectl get pods -A -o json`.
    pub pods: BTreeSet<(String, String)>,
    /// (container ID, ifname), e.g. a runtime's attachments (CNI GC's list).
    pub attachments: BTreeSet<(String, String)>,
}

impl LivePods {
    /// Reads either `kubectl get pods -A -o json` output ({"items": [...]}) or a list
    /// of attachments ([{"containerID": .., "ifname": ..}]).
    pub fn from_json(text: &str) -> Result<LivePods, String> {
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let mut live = LivePods::default();
        if let Some(items) = doc.get("items").and_then(|i| i.as_array()) {
            for (n, item) in items.iter().enumerate() {
                let meta = &item["metadata"];
                match (meta["namespace"].as_str(), meta["name"].as_str()) {
                    (Some(ns), Some(name)) => {
                        live.pods.insert((ns.to_string(), name.to_string()));
                    }
                    _ => return Err(format!("items[{n}].metadata lacks namespace or name")),
                }
            }
        } else if let Some(list) = doc.as_array() {
            for (n, a) in list.iter().enumerate() {
                match (a["containerID"].as_str(), a["ifname"].as_str()) {
                    (Some(c), Some(i)) => {
                        live.attachments.insert((c.to_string(), i.to_string()));
                    }
                    _ => return Err(format!("[{n}] lacks containerID or ifname")),
                }
            }
        } else {
            return Err(
                "expected kubectl's {\"items\": [...]} or a list of {containerID, ifname}".into(),
            );
        }
        Ok(live)
    }

    fn holds(&self, handle: &Handle) -> Option<bool> {
        let a = &handle.attrs;
        if let (Some(ns), Some(pod)) = (&a.namespace, &a.pod) {
            if !self.pods.is_empty() || self.attachments.is_empty() {
                return Some(self.pods.contains(&(ns.clone(), pod.clone())));
            }
        }
        if let (Some(c), Some(i)) = (&a.container_id, &a.ifname) {
            return Some(self.attachments.contains(&(c.clone(), i.clone())));
        }
        None
    }
}

/// Pure: every problem in a snapshot of the store.
pub fn find_problems(
    pools: &[Pool],
    blocks: &BTreeMap<String, StoredBlock>,
    handles: &[(Handle, u64)],
    nodes: &[NodeRecord],
    live: Option<&LivePods>,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let by_id: BTreeMap<&str, &(Handle, u64)> =
        handles.iter().map(|h| (h.0.id.as_str(), h)).collect();
    let node_names: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    for stored in blocks.values() {
        let block = &stored.block;
        let cidr = block.cidr.to_string();
        if !pools.iter().any(|p| {
            p.cidr.contains(block.cidr.network()) && p.cidr.prefix() <= block.cidr.prefix()
        }) {
            problems.push(Problem {
                kind: ProblemKind::OutsidePools,
                ip: None,
                handle: None,
                block: Some(cidr.clone()),
                handle_revision: None,
                seq: None,
                detail: format!("block {cidr} is in no pool"),
            });
        }
        if let Some(node) = &block.affinity {
            if !node_names.is_empty() && !node_names.contains(node.as_str()) {
                problems.push(Problem {
                    kind: ProblemKind::UnknownNode,
                    ip: None,
                    handle: None,
                    block: Some(cidr.clone()),
                    handle_revision: None,
                    seq: None,
                    detail: format!("block {cidr} is affine to unregistered node {node}"),
                });
            }
        }
        for (ordinal, allocation) in &block.allocations {
            let ip = block.ip_at(*ordinal);
            let listed = by_id.get(allocation.handle.as_str()).is_some_and(|(h, _)| {
                h.addresses
                    .iter()
                    .any(|a| a.ip == ip && a.seq == allocation.seq)
            });
            if !listed {
                problems.push(Problem {
                    kind: ProblemKind::AllocationWithoutHandle,
                    ip: Some(ip),
                    handle: Some(allocation.handle.clone()),
                    block: Some(cidr.clone()),
                    handle_revision: None,
                    seq: Some(allocation.seq),
                    detail: format!(
                        "{ip} is held for handle {} which does not list it",
                        allocation.handle
                    ),
                });
            }
        }
    }
    for (handle, revision) in handles {
        for addr in &handle.addresses {
            let held = blocks.values().any(|b| {
                b.block.cidr == addr.block
                    && b.block.ordinal_of(addr.ip).is_some_and(|o| {
                        b.block
                            .allocations
                            .get(&o)
                            .is_some_and(|a| a.handle == handle.id && a.seq == addr.seq)
                    })
            });
            if !held {
                problems.push(Problem {
                    kind: ProblemKind::HandleWithoutAllocation,
                    ip: Some(addr.ip),
                    handle: Some(handle.id.clone()),
                    block: Some(addr.block.to_string()),
                    handle_revision: Some(*revision),
                    seq: Some(addr.seq),
                    detail: format!(
                        "handle {} lists {} but its block does not hold it",
                        handle.id, addr.ip
                    ),
                });
            }
        }
        if let Some(live) = live {
            if live.holds(handle) == Some(false) {
                let ips: Vec<String> = handle.addresses.iter().map(|a| a.ip.to_string()).collect();
                problems.push(Problem {
                    kind: ProblemKind::PodGone,
                    ip: handle.addresses.first().map(|a| a.ip),
                    handle: Some(handle.id.clone()),
                    block: None,
                    handle_revision: Some(*revision),
                    seq: None,
                    detail: format!(
                        "handle {} ({}) belongs to a pod that is gone",
                        handle.id,
                        ips.join(", ")
                    ),
                });
            }
        }
    }
    problems.sort_by(|a, b| (a.kind, &a.handle, a.ip).cmp(&(b.kind, &b.handle, b.ip)));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::{plan_allocation, AllocationRequest};
    use crate::model::{AllocationAttrs, Block};
    use crate::store::Write;

    type Snapshot = (Vec<Pool>, BTreeMap<String, StoredBlock>, Vec<(Handle, u64)>);

    /// A consistent store with `n` allocations.
    fn snapshot(n: usize) -> Snapshot {
        let pools = vec![Pool::with_defaults("10.0.0.0/24".parse().unwrap(), Some(28)).unwrap()];
        let mut blocks = BTreeMap::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let request = AllocationRequest {
                handle_id: format!("h{i}"),
                network: "net".into(),
                attrs: AllocationAttrs {
                    node: "n1".into(),
                    pod: Some(format!("p{i}")),
                    namespace: Some("ns".into()),
                    ..Default::default()
                },
                host_interface: None,
                pool_filter: vec![],
            };
            let plan = plan_allocation(
                &pools,
                crate::allocator::BlockView::all(&blocks),
                &Default::default(),
                &request,
            )
            .unwrap()
            .unwrap();
            for w in &plan.writes {
                if let Write::Put { key, value, .. } = w {
                    if key.starts_with("blocks/") {
                        let block: Block = serde_json::from_str(value).unwrap();
                        blocks.insert(key.clone(), StoredBlock { block, revision: 1 });
                    }
                }
            }
            handles.push((plan.handle, 1));
        }
        (pools, blocks, handles)
    }

    #[test]
    fn a_consistent_store_has_no_problems() {
        let (pools, blocks, handles) = snapshot(3);
        assert_eq!(find_problems(&pools, &blocks, &handles, &[], None), vec![]);
    }

    #[test]
    fn dangling_allocations_and_handles_and_gone_pods_are_found() {
        let (pools, mut blocks, mut handles) = snapshot(3);
        handles.remove(0); // h0's allocation now has no handle
        let key = blocks.keys().next().unwrap().clone();
        let ordinal = *blocks[&key].block.allocations.keys().nth(1).unwrap();
        blocks
            .get_mut(&key)
            .unwrap()
            .block
            .allocations
            .remove(&ordinal); // h1 lost its allocation
        let live = LivePods {
            pods: [("ns".to_string(), "p1".to_string())].into(),
            ..Default::default()
        };
        let kinds: Vec<ProblemKind> = find_problems(&pools, &blocks, &handles, &[], Some(&live))
            .into_iter()
            .map(|p| p.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                ProblemKind::PodGone,
                ProblemKind::HandleWithoutAllocation,
                ProblemKind::AllocationWithoutHandle
            ]
        );
    }

    #[test]
    fn live_pods_read_kubectl_output_and_attachment_lists() {
        let live = LivePods::from_json(r#"{"items":[{"metadata":{"namespace":"a","name":"b"}}]}"#)
            .unwrap();
        assert!(live.pods.contains(&("a".into(), "b".into())));
        let live = LivePods::from_json(r#"[{"containerID":"c","ifname":"eth0"}]"#).unwrap();
        assert!(live.attachments.contains(&("c".into(), "eth0".into())));
        assert!(LivePods::from_json(r#"{"items":[{"metadata":{}}]}"#)
            .unwrap_err()
            .contains("items[0]"));
    }
}
