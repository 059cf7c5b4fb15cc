//! What the overlay should look like on this node, computed from the datastore: pure
//! data and set differences, so the reconcile logic is tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use calyx_dataplane::overlay::{FdbEntry, Neighbour};
use calyx_dataplane::parse_mac;
use calyx_ipam::model::{Block, NodeRecord};
use ipnetwork::IpNetwork;

/// `route <block> via <vtep> dev vxlan.calyx onlink`; a /32 (/128) for an address
/// another node borrowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockRoute {
    pub block: IpNetwork,
    pub via: IpAddr,
}

/// A nexthop object for one remote IPv4 VTEP; its ID is the VTEP address itself
/// (32 bits, never zero, unique per VTEP).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VtepNexthop {
    pub id: u32,
    pub via: IpAddr,
}

/// The nexthop ID for routes through `vtep`: IPv4 VTEPs only (IPv6 block routes keep
/// a gateway each).
pub fn nexthop_id(vtep: IpAddr) -> Option<u32> {
    match vtep {
        IpAddr::V4(v4) => Some(u32::from(v4)).filter(|id| *id != 0),
        IpAddr::V6(_) => None,
    }
}

/// What the overlay needs of a block: its range, its node, and its addresses that
/// other nodes borrowed (address -> borrowing node). The agent keeps this, not the
/// whole block with every allocation, for every block in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRouting {
    pub cidr: IpNetwork,
    pub affinity: Option<String>,
    pub lent: BTreeMap<IpAddr, String>,
    /// Holds no address: a candidate for release to the pool, not a routing matter.
    pub empty: bool,
}

impl BlockRouting {
    pub fn of(block: &Block) -> BlockRouting {
        BlockRouting {
            cidr: block.cidr,
            affinity: block.affinity.clone(),
            lent: block
                .allocations
                .keys()
                .filter_map(|&ordinal| {
                    let borrower = block.borrower_of(ordinal)?;
                    Some((block.ip_at(ordinal), borrower.to_string()))
                })
                .collect(),
            empty: block.allocations.is_empty(),
        }
    }

    /// Whether the two route alike (emptiness aside): most block changes (a pod
    /// starting or stopping in its own node's block) do not concern other nodes.
    pub fn routes_like(&self, other: &BlockRouting) -> bool {
        self.cidr == other.cidr && self.affinity == other.affinity && self.lent == other.lent
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayState {
    pub fdb: BTreeSet<FdbEntry>,
    pub neighbours: BTreeSet<Neighbour>,
    pub nexthops: BTreeSet<VtepNexthop>,
    pub routes: BTreeSet<BlockRoute>,
    pub blackholes: BTreeSet<IpNetwork>,
}

/// For every other live node: an FDB entry (its VTEP MAC -> its underlay address) and a
/// permanent neighbour per VTEP address; a route per block it owns, through its VTEP;
/// a blackhole per block this node owns. An address a node borrowed from another's
/// block gets a /32 (/128) through the borrower's VTEP, more specific than the block's
/// route or blackhole; on the borrower itself the pod's host route does the job.
pub fn desired_overlay(
    me: &str,
    nodes: &[NodeRecord],
    is_live: &dyn Fn(&str) -> bool,
    blocks: &[BlockRouting],
) -> OverlayState {
    let mut state = OverlayState::default();
    let mut peers: BTreeMap<&str, &NodeRecord> = BTreeMap::new();
    for node in nodes {
        if node.name == me || !is_live(&node.name) {
            continue;
        }
        let Some(mac) = parse_mac(&node.vtep_mac) else {
            tracing::warn!(node = %node.name, mac = %node.vtep_mac, "node has an unreadable VTEP MAC; skipping it");
            continue;
        };
        state.fdb.insert(FdbEntry {
            mac,
            dst: node.underlay_ip,
        });
        for ip in [node.vtep_ipv4, node.vtep_ipv6].into_iter().flatten() {
            state.neighbours.insert(Neighbour { ip, mac });
            if let Some(id) = nexthop_id(ip) {
                state.nexthops.insert(VtepNexthop { id, via: ip });
            }
        }
        peers.insert(node.name.as_str(), node);
    }
    let vtep_of = |peer: &NodeRecord, v4: bool| if v4 { peer.vtep_ipv4 } else { peer.vtep_ipv6 };
    for block in blocks {
        let v4 = block.cidr.is_ipv4();
        for (&ip, borrower) in &block.lent {
            if let Some(via) = peers.get(borrower.as_str()).and_then(|p| vtep_of(p, v4)) {
                let host =
                    IpNetwork::new(ip, if v4 { 32 } else { 128 }).expect("host prefix is valid");
                state.routes.insert(BlockRoute { block: host, via });
            }
        }
        let Some(owner) = block.affinity.as_deref() else {
            continue;
        };
        if owner == me {
            state.blackholes.insert(block.cidr);
            continue;
        }
        let Some(peer) = peers.get(owner) else {
            continue;
        };
        if let Some(via) = vtep_of(peer, v4) {
            state.routes.insert(BlockRoute {
                block: block.cidr,
                via,
            });
        }
    }
    state
}

/// What to add and what to remove to turn `actual` into `desired`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayChanges {
    pub add: OverlayState,
    pub remove: OverlayState,
}

impl OverlayChanges {
    pub fn count(&self) -> usize {
        let size = |s: &OverlayState| {
            s.fdb.len()
                + s.neighbours.len()
                + s.nexthops.len()
                + s.routes.len()
                + s.blackholes.len()
        };
        size(&self.add) + size(&self.remove)
    }
}

pub fn diff(desired: &OverlayState, actual: &OverlayState) -> OverlayChanges {
    fn minus<T: Ord + Clone>(a: &BTreeSet<T>, b: &BTreeSet<T>) -> BTreeSet<T> {
        a.difference(b).cloned().collect()
    }
    OverlayChanges {
        add: OverlayState {
            fdb: minus(&desired.fdb, &actual.fdb),
            neighbours: minus(&desired.neighbours, &actual.neighbours),
            nexthops: minus(&desired.nexthops, &actual.nexthops),
            routes: minus(&desired.routes, &actual.routes),
            blackholes: minus(&desired.blackholes, &actual.blackholes),
        },
        remove: OverlayState {
            fdb: minus(&actual.fdb, &desired.fdb),
            neighbours: minus(&actual.neighbours, &desired.neighbours),
            nexthops: minus(&actual.nexthops, &desired.nexthops),
            routes: minus(&actual.routes, &desired.routes),
            blackholes: minus(&actual.blackholes, &desired.blackholes),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Node `name` with underlay 192.0.2.n and VTEP 10.244.n.0.
    pub(crate) fn node(name: &str, n: u8) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            underlay_ip: format!("192.0.2.{n}").parse().unwrap(),
            vtep_ipv4: Some(format!("10.244.{n}.0").parse().unwrap()),
            vtep_ipv6: None,
            vtep_mac: format!("66:00:00:00:00:{n:02x}"),
            heartbeat: 1,
        }
    }

    fn block(cidr: &str, owner: &str) -> BlockRouting {
        BlockRouting::of(&Block::new(cidr.parse().unwrap(), "pool", owner))
    }

    #[test]
    fn remote_nodes_get_fdb_neighbour_and_block_routes_own_blocks_blackholes() {
        let nodes = [node("a", 1), node("b", 2), node("c", 3)];
        let blocks = [
            block("10.244.1.0/26", "a"),
            block("10.244.2.0/26", "b"),
            block("10.244.2.64/26", "b"),
        ];
        let state = desired_overlay("a", &nodes, &|_| true, &blocks);
        assert_eq!(state.fdb.len(), 2);
        assert!(state.fdb.contains(&FdbEntry {
            mac: [0x66, 0, 0, 0, 0, 2],
            dst: "192.0.2.2".parse().unwrap()
        }));
        assert_eq!(state.neighbours.len(), 2);
        assert_eq!(state.nexthops.len(), 2);
        assert!(state
            .nexthops
            .iter()
            .any(|n| n.id == u32::from(std::net::Ipv4Addr::new(10, 244, 2, 0))));
        let routes: Vec<String> = state
            .routes
            .iter()
            .map(|r| format!("{} via {}", r.block, r.via))
            .collect();
        assert_eq!(
            routes,
            [
                "10.244.2.0/26 via 10.244.2.0",
                "10.244.2.64/26 via 10.244.2.0"
            ]
        );
        assert_eq!(state.blackholes.len(), 1);
    }

    #[test]
    fn a_borrowed_address_is_routed_to_its_borrower_everywhere_else() {
        let nodes = [node("a", 1), node("b", 2), node("c", 3)];
        let mut lender = Block::new("10.244.1.0/26".parse().unwrap(), "pool", "a");
        let borrowed = calyx_ipam::model::AllocationAttrs {
            node: "b".into(),
            ..Default::default()
        };
        lender.allocate("pod-on-b", borrowed, 0).unwrap();
        let own = calyx_ipam::model::AllocationAttrs {
            node: "a".into(),
            ..Default::default()
        };
        lender.allocate("pod-on-a", own, 0).unwrap();
        let lender = BlockRouting::of(&lender);
        assert_eq!(lender.lent.len(), 1, "only the borrowed address is lent");
        assert!(!lender.empty);
        let route = BlockRoute {
            block: "10.244.1.0/32".parse().unwrap(),
            via: "10.244.2.0".parse().unwrap(),
        };
        // The lender routes it out of its own block's blackhole; a third node too.
        for me in ["a", "c"] {
            let state = desired_overlay(me, &nodes, &|_| true, std::slice::from_ref(&lender));
            assert!(state.routes.contains(&route), "on {me}: {:?}", state.routes);
        }
        // The borrower itself has the pod's host route instead.
        let state = desired_overlay("b", &nodes, &|_| true, &[lender]);
        assert!(!state.routes.contains(&route));
    }

    #[test]
    fn departed_nodes_lose_their_entries() {
        let nodes = [node("a", 1), node("b", 2)];
        let blocks = [block("10.244.2.0/26", "b")];
        let state = desired_overlay("a", &nodes, &|n| n != "b", &blocks);
        assert_eq!(state, OverlayState::default());
    }

    #[test]
    fn diff_adds_missing_and_removes_extra() {
        let nodes = [node("a", 1), node("b", 2)];
        let blocks = [block("10.244.2.0/26", "b")];
        let desired = desired_overlay("a", &nodes, &|_| true, &blocks);
        let mut actual = desired.clone();
        actual.routes.clear();
        actual.blackholes.insert("10.9.9.0/26".parse().unwrap());
        let changes = diff(&desired, &actual);
        assert_eq!(changes.add.routes.len(), 1);
        assert_eq!(changes.remove.blackholes.len(), 1);
        assert_eq!(changes.count(), 2);
        assert_eq!(diff(&desired, &desired).count(), 0);
    }
}
