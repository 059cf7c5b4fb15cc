//! The documents IPAM keeps in the store, and the pure arithmetic on them.
//!
//! Key layout (under the store's prefix, `/calyx/v1/` by default):
//! `pools/<name>`, `blocks/<cidr with '/' as '-'>`, `handles/<id>`, `nodes/<name>`,
//! `affinities/<node>/<cidr with '/' as '-'>` (index of a node's blocks), `config/ipam`.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

pub const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
pub const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

/// A cluster address pool; blocks are carved from it and handed to nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    pub name: String,
    pub cidr: IpNetwork,
    pub block_size: u8,
    #[serde(default = "yes")]
    pub vxlan: bool,
    #[serde(default = "yes")]
    pub nat_outgoing: bool,
    #[serde(default)]
    pub disabled: bool,
}

fn yes() -> bool {
    true
}

/// Pools for CIDRs given on a command line or in a config, each with the block size
/// of its family (None: the default); an error names the CIDR at fault.
pub fn pools_from_cidrs(
    cidrs: &[IpNetwork],
    block_size_v4: Option<u8>,
    block_size_v6: Option<u8>,
) -> Result<Vec<Pool>, String> {
    cidrs
        .iter()
        .map(|cidr| {
            let size = if cidr.is_ipv4() {
                block_size_v4
            } else {
                block_size_v6
            };
            Pool::with_defaults(*cidr, size).map_err(|e| format!("{cidr}: {e}"))
        })
        .collect()
}

impl Pool {
    /// Whether `cidr` shares any address with this pool.
    pub fn overlaps(&self, cidr: &IpNetwork) -> bool {
        let a = &self.cidr;
        a.is_ipv4() == cidr.is_ipv4() && (a.contains(cidr.network()) || cidr.contains(a.network()))
    }

    /// A pool with the default block size for its family and a name derived from the CIDR.
    pub fn with_defaults(cidr: IpNetwork, block_size: Option<u8>) -> Result<Pool, String> {
        let block_size = block_size.unwrap_or(match cidr {
            IpNetwork::V4(_) => DEFAULT_BLOCK_SIZE_V4,
            IpNetwork::V6(_) => DEFAULT_BLOCK_SIZE_V6,
        });
        let pool = Pool {
            name: default_pool_name(&cidr),
            cidr: IpNetwork::new(cidr.network(), cidr.prefix()).map_err(|e| e.to_string())?,
            block_size,
            vxlan: true,
            nat_outgoing: true,
            disabled: false,
        };
        pool.validate()?;
        Ok(pool)
    }

    pub fn validate(&self) -> Result<(), String> {
        let max = max_prefix(&self.cidr);
        if self.block_size < self.cidr.prefix() || self.block_size > max {
            return Err(format!(
                "blockSize {} does not fit pool {}: it must be between /{} and /{}",
                self.block_size,
                self.cidr,
                self.cidr.prefix(),
                max
            ));
        }
        if max - self.block_size > 20 {
            return Err(format!(
                "blockSize {} is too large a block (more than 2^20 addresses); use /{} or longer",
                self.block_size,
                max - 20
            ));
        }
        Ok(())
    }

    pub fn is_ipv4(&self) -> bool {
        self.cidr.is_ipv4()
    }

    /// How many blocks the pool holds (capped: a v6 pool can hold astronomically many).
    pub fn block_count(&self) -> u128 {
        let bits = u32::from(self.block_size - self.cidr.prefix());
        if bits >= 64 {
            u64::MAX as u128
        } else {
            1u128 << bits
        }
    }

    /// The `index`th block of the pool.
    pub fn block_cidr(&self, index: u128) -> IpNetwork {
        let host_bits = u32::from(max_prefix(&self.cidr) - self.block_size);
        let base = ip_to_u128(self.cidr.network());
        let addr = base + (index << host_bits);
        IpNetwork::new(u128_to_ip(addr, self.cidr.is_ipv4()), self.block_size)
            .expect("block prefix validated against the pool")
    }
}

pub fn default_pool_name(cidr: &IpNetwork) -> String {
    let family = if cidr.is_ipv4() { "ipv4" } else { "ipv6" };
    format!(
        "default-{family}-{}",
        cidr.to_string().replace(['/', ':', '.'], "-")
    )
}

/// One allocated address inside a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", from = "FlatAllocation")]
pub struct Allocation {
    pub handle: String,
    /// Block-local sequence number of this allocation; a release names it, so a stale
    /// release can never free an address that was handed out again since.
    pub seq: u64,
    #[serde(flatten)]
    pub attrs: AllocationAttrs,
}

/// An `Allocation` as stored, read field by field: serde's `flatten` buffers every
/// entry first, and every allocation decodes all of its node's blocks (several times
/// slower with it).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FlatAllocation {
    handle: String,
    seq: u64,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    node: String,
    #[serde(default)]
    container_id: Option<String>,
    #[serde(default)]
    ifname: Option<String>,
    time: u64,
}

impl From<FlatAllocation> for Allocation {
    fn from(flat: FlatAllocation) -> Allocation {
        Allocation {
            handle: flat.handle,
            seq: flat.seq,
            attrs: AllocationAttrs {
                pod: flat.pod,
                namespace: flat.namespace,
                node: flat.node,
                container_id: flat.container_id,
                ifname: flat.ifname,
                time: flat.time,
            },
        }
    }
}

/// Who an allocation is for; informational, used by `ipamctl` and GC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationAttrs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    /// Unix seconds.
    pub time: u64,
}

/// A block of a pool, affine to one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    pub cidr: IpNetwork,
    pub pool: String,
    pub affinity: Option<String>,
    /// ordinal -> allocation
    pub allocations: BTreeMap<u32, Allocation>,
    /// Ordinals at or above this were never handed out.
    pub never_used_from: u32,
    /// Freed ordinals, oldest first: reuse is FIFO so a freed address rests as long as
    /// possible before it is handed out again (and at least the cluster's cooldown).
    pub released: VecDeque<Freed>,
    /// Incremented on every allocation.
    pub seq: u64,
    /// When the block's last allocation was released (Unix seconds); None while it
    /// holds any. An empty block goes back to the pool after a grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_since: Option<u64>,
}

/// An ordinal freed at `at` (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freed {
    pub ordinal: u32,
    pub at: u64,
}

/// Cluster-wide IPAM settings (`config/ipam`); every field has a default, so a store
/// without the document behaves like Calico's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfig {
    /// Never allocate from another node's block: fail with "pool exhausted" instead of
    /// borrowing when this node can claim no more blocks.
    #[serde(default)]
    pub strict_affinity: bool,
    /// How many blocks one node may claim per IP family; None is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blocks_per_node: Option<u32>,
    /// A freed address is not handed out again for this long.
    #[serde(default)]
    pub ip_cooldown_seconds: u64,
    /// An empty block goes back to the pool after this long (its node keeps one).
    #[serde(default = "default_empty_block_grace")]
    pub empty_block_grace_seconds: u64,
}

fn default_empty_block_grace() -> u64 {
    15 * 60
}

impl Default for IpamConfig {
    fn default() -> Self {
        IpamConfig {
            strict_affinity: false,
            max_blocks_per_node: None,
            ip_cooldown_seconds: 0,
            empty_block_grace_seconds: default_empty_block_grace(),
        }
    }
}

pub const IPAM_CONFIG_KEY: &str = "config/ipam";

impl Block {
    pub fn new(cidr: IpNetwork, pool: &str, affinity: &str) -> Block {
        Block {
            cidr,
            pool: pool.to_string(),
            affinity: Some(affinity.to_string()),
            allocations: BTreeMap::new(),
            never_used_from: 0,
            released: VecDeque::new(),
            seq: 0,
            empty_since: None,
        }
    }

    pub fn size(&self) -> u32 {
        let bits = u32::from(max_prefix(&self.cidr) - self.cidr.prefix());
        1u32 << bits
    }

    pub fn free_count(&self) -> u32 {
        self.size() - self.allocations.len() as u32
    }

    pub fn is_ipv4(&self) -> bool {
        self.cidr.is_ipv4()
    }

    pub fn ip_at(&self, ordinal: u32) -> IpAddr {
        u128_to_ip(
            ip_to_u128(self.cidr.network()) + u128::from(ordinal),
            self.is_ipv4(),
        )
    }

    pub fn ordinal_of(&self, ip: IpAddr) -> Option<u32> {
        if !self.cidr.contains(ip) {
            return None;
        }
        Some((ip_to_u128(ip) - ip_to_u128(self.cidr.network())) as u32)
    }

    /// Whether an address can be handed out at `now` (Unix seconds) when freed
    /// addresses must rest `cooldown` seconds.
    pub fn can_allocate(&self, now: u64, cooldown: u64) -> bool {
        self.never_used_from < self.size()
            || self
                .released
                .front()
                .is_some_and(|f| now.saturating_sub(f.at) >= cooldown)
    }

    /// Takes the next free ordinal: never-used ones first, then the oldest released if
    /// it has rested `cooldown` seconds by `attrs.time`.
    pub fn allocate(
        &mut self,
        handle: &str,
        attrs: AllocationAttrs,
        cooldown: u64,
    ) -> Option<(u32, u64)> {
        if !self.can_allocate(attrs.time, cooldown) {
            return None;
        }
        let ordinal = if self.never_used_from < self.size() {
            self.never_used_from += 1;
            self.never_used_from - 1
        } else {
            self.released.pop_front()?.ordinal
        };
        self.seq += 1;
        self.empty_since = None;
        let allocation = Allocation {
            handle: handle.to_string(),
            seq: self.seq,
            attrs,
        };
        self.allocations.insert(ordinal, allocation);
        Some((ordinal, self.seq))
    }

    /// Frees `ordinal` at `now` (Unix seconds) if it is still held by `handle` at
    /// sequence `seq`.
    pub fn release(&mut self, ordinal: u32, handle: &str, seq: u64, now: u64) -> bool {
        match self.allocations.get(&ordinal) {
            Some(a) if a.handle == handle && a.seq == seq => {
                self.allocations.remove(&ordinal);
                self.released.push_back(Freed { ordinal, at: now });
                if self.allocations.is_empty() {
                    self.empty_since = Some(now);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether the allocation at `ordinal` is for a pod on another node than the
    /// block's: a borrowed address, which needs its own /32 route.
    pub fn borrower_of(&self, ordinal: u32) -> Option<&str> {
        let allocation = self.allocations.get(&ordinal)?;
        (self.affinity.as_deref() != Some(allocation.attrs.node.as_str()))
            .then_some(allocation.attrs.node.as_str())
    }
}

/// One address a handle holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandleAddress {
    pub ip: IpAddr,
    pub block: IpNetwork,
    pub seq: u64,
}

/// What one attachment (network + container + interface) holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Handle {
    pub id: String,
    pub network: String,
    pub addresses: Vec<HandleAddress>,
    /// The host-side interface of the attachment, so teardown finds it even when the
    /// runtime's arguments differ between ADD and DEL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_interface: Option<String>,
    #[serde(flatten)]
    pub attrs: AllocationAttrs,
}

/// A node as its agent registered it: what every other node needs to reach its pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    /// The node's address on the underlay: VXLAN packets for it go there.
    pub underlay_ip: IpAddr,
    /// The VXLAN device's addresses (from the node's own block), per family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_ipv4: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_ipv6: Option<IpAddr>,
    /// The VXLAN device's MAC, `aa:bb:..` form.
    pub vtep_mac: String,
    /// Bumped by the agent periodically; others judge liveness by whether it moves.
    pub heartbeat: u64,
}

/// Where node records live: `nodes/<name>`.
pub const NODES_PREFIX: &str = "nodes/";
/// Where blocks live: `blocks/<cidr with - for />`.
pub const BLOCKS_PREFIX: &str = "blocks/";

pub fn node_key(name: &str) -> String {
    format!("{NODES_PREFIX}{name}")
}

impl NodeRecord {
    /// A node record as the store holds it.
    pub fn from_document(json: &str) -> Result<NodeRecord, serde_json::Error> {
        serde_json::from_str(json)
    }
}

impl Block {
    /// A block as the store holds it.
    pub fn from_document(json: &str) -> Result<Block, serde_json::Error> {
        serde_json::from_str(json)
    }
}

/// The network name the tunnel handles start with; no CNI network may use it, or a
/// pod's handle could equal a node's tunnel handle (node names hold dots).
pub const TUNNEL_NETWORK: &str = "vxlan-tunnel-addr";

/// The IPAM handle of a node's VXLAN tunnel addresses.
pub fn tunnel_handle_id(node: &str) -> String {
    format!("{TUNNEL_NETWORK}.{node}")
}

pub fn pool_key(name: &str) -> String {
    format!("pools/{name}")
}

pub fn block_key(cidr: &IpNetwork) -> String {
    format!("{BLOCKS_PREFIX}{}", cidr.to_string().replace('/', "-"))
}

/// The index entry naming one of a node's blocks, so an allocation reads that node's
/// blocks instead of every block in the cluster. A hint only: a missing or stale
/// entry costs a full read, never a wrong allocation (block writes are CAS).
pub fn affinity_key(node: &str, block: &IpNetwork) -> String {
    format!(
        "{}{}",
        affinity_prefix(node),
        block.to_string().replace('/', "-")
    )
}

/// The block an `affinities/<node>/<cidr>` index entry names.
pub fn block_key_of_affinity(index_key: &str) -> String {
    let cidr = index_key.rsplit('/').next().unwrap_or_default();
    format!("{BLOCKS_PREFIX}{cidr}")
}

pub fn affinity_prefix(node: &str) -> String {
    format!("affinities/{node}/")
}

pub fn handle_key(id: &str) -> String {
    format!("handles/{id}")
}

/// The handle ID of one attachment, as in the data model: network + container + ifname.
/// `<network>.<containerID>.<ifname>`, with every '.' inside the container ID and the
/// interface name written as `%2E`, so the last two dots always split the parts and two
/// attachments never share a handle (`pod.a` + `net1` against `pod` + `a.net1`). Neither
/// part may hold a raw '%' (the plugin validates both), and IDs and names without dots,
/// as every runtime's hex container IDs are, keep the form they always had.
pub fn handle_id(network: &str, container_id: &str, ifname: &str) -> String {
    let escape = |part: &str| part.replace('.', "%2E");
    format!("{network}.{}.{}", escape(container_id), escape(ifname))
}

pub fn max_prefix(net: &IpNetwork) -> u8 {
    if net.is_ipv4() {
        32
    } else {
        128
    }
}

pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn u128_to_ip(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((value as u32).into())
    } else {
        IpAddr::V6(value.into())
    }
}

/// Node names as Kubernetes has them (DNS subdomains, capitals tolerated): the name
/// keys the node's record and blocks in the store, so "" or "../x" must not pass.
pub fn validate_node_name(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        && !name.starts_with(['.', '-'])
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err("is not a node name (1 to 253 letters, digits, '-', '_' and '.', no \"..\")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_ids_are_injective_and_keep_the_dotless_form() {
        assert_eq!(handle_id("k8s", "c0ffee", "eth0"), "k8s.c0ffee.eth0");
        assert_ne!(
            handle_id("n", "pod.a", "net1"),
            handle_id("n", "pod", "a.net1")
        );
        assert_eq!(handle_id("a.b", "c.d", "e.f"), "a.b.c%2Ed.e%2Ef");
    }

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn an_allocation_is_stored_with_flat_fields_and_read_back_whole() {
        let allocation = Allocation {
            handle: "net.c1.eth0".into(),
            seq: 7,
            attrs: AllocationAttrs {
                pod: Some("web-0".into()),
                namespace: Some("shop".into()),
                node: "n1".into(),
                container_id: None,
                ifname: Some("eth0".into()),
                time: 1_700_000_000,
            },
        };
        let text = serde_json::to_string(&allocation).unwrap();
        assert_eq!(
            text,
            r#"{"handle":"net.c1.eth0","seq":7,"pod":"web-0","namespace":"shop","node":"n1","ifname":"eth0","time":1700000000}"#
        );
        assert_eq!(
            serde_json::from_str::<Allocation>(&text).unwrap(),
            allocation
        );
        let missing = serde_json::from_str::<Allocation>(r#"{"handle":"h","seq":1,"time":0}"#);
        assert!(missing.unwrap_err().to_string().contains("node"));
    }

    #[test]
    fn pool_blocks_are_carved_in_order() {
        let pool = Pool::with_defaults(net("10.244.0.0/16"), None).unwrap();
        assert_eq!(pool.block_size, 26);
        assert_eq!(pool.block_count(), 1024);
        assert_eq!(pool.block_cidr(0), net("10.244.0.0/26"));
        assert_eq!(pool.block_cidr(5), net("10.244.1.64/26"));
        assert_eq!(pool.block_cidr(1023), net("10.244.255.192/26"));
    }

    #[test]
    fn ipv6_pool_defaults_to_122_blocks() {
        let pool = Pool::with_defaults(net("fd00:10:244::/56"), None).unwrap();
        assert_eq!(pool.block_size, 122);
        assert_eq!(pool.block_cidr(1), net("fd00:10:244::40/122"));
        // 2^66 blocks: capped, the allocator only ever walks the first few.
        assert_eq!(pool.block_count(), u64::MAX as u128);
    }

    #[test]
    fn pool_cidr_is_normalised_and_block_size_checked() {
        let pool = Pool::with_defaults(net("10.244.3.7/16"), Some(24)).unwrap();
        assert_eq!(pool.cidr, net("10.244.0.0/16"));
        let err = Pool::with_defaults(net("10.244.0.0/16"), Some(8)).unwrap_err();
        assert!(err.contains("blockSize 8"), "{err}");
        let err = Pool::with_defaults(net("10.244.0.0/16"), Some(33)).unwrap_err();
        assert!(err.contains("blockSize 33"), "{err}");
    }

    #[test]
    fn block_reuses_freed_addresses_oldest_first_after_never_used() {
        let mut block = Block::new(net("10.0.0.0/30"), "p", "n1");
        let attrs = AllocationAttrs::default();
        let (a, sa) = block.allocate("a", attrs.clone(), 0).unwrap();
        let (b, sb) = block.allocate("b", attrs.clone(), 0).unwrap();
        assert_eq!((a, b), (0, 1));
        assert!(block.release(b, "b", sb, 0));
        assert!(block.release(a, "a", sa, 0));
        // Never-used ordinals come first, then b (freed first), then a.
        let order: Vec<u32> = (0..4)
            .map(|i| {
                block
                    .allocate(&format!("h{i}"), attrs.clone(), 0)
                    .unwrap()
                    .0
            })
            .collect();
        assert_eq!(order, vec![2, 3, 1, 0]);
        assert!(block.allocate("full", attrs, 0).is_none());
        assert_eq!(block.free_count(), 0);
    }

    #[test]
    fn stale_release_does_not_free_a_newer_allocation() {
        let mut block = Block::new(net("10.0.0.0/31"), "p", "n1");
        let attrs = AllocationAttrs::default();
        let (o, s) = block.allocate("h", attrs.clone(), 0).unwrap();
        assert!(block.release(o, "h", s, 0));
        block.allocate("x", attrs.clone(), 0).unwrap();
        let (o2, s2) = block.allocate("h", attrs, 0).unwrap();
        assert_eq!(o2, o);
        assert!(
            !block.release(o, "h", s, 0),
            "old sequence must not free it"
        );
        assert!(block.release(o, "h", s2, 0));
    }

    #[test]
    fn freed_addresses_rest_for_the_cooldown() {
        let mut block = Block::new(net("10.0.0.0/31"), "p", "n1");
        let at = |time| AllocationAttrs {
            node: "n1".into(),
            time,
            ..Default::default()
        };
        let (a, sa) = block.allocate("a", at(100), 30).unwrap();
        block.allocate("b", at(100), 30).unwrap();
        assert!(block.release(a, "a", sa, 110));
        assert!(
            block.allocate("c", at(139), 30).is_none(),
            "29 s after release"
        );
        assert!(!block.can_allocate(139, 30));
        assert_eq!(block.allocate("c", at(140), 30).unwrap().0, a);
    }

    #[test]
    fn an_emptied_block_remembers_since_when() {
        let mut block = Block::new(net("10.0.0.0/30"), "p", "n1");
        let attrs = AllocationAttrs {
            node: "n2".into(),
            time: 5,
            ..Default::default()
        };
        let (o, s) = block.allocate("h", attrs.clone(), 0).unwrap();
        assert_eq!(block.borrower_of(o), Some("n2"));
        assert_eq!(block.empty_since, None);
        block.release(o, "h", s, 50);
        assert_eq!(block.empty_since, Some(50));
        block.allocate("h2", attrs, 0).unwrap();
        assert_eq!(block.empty_since, None);
    }

    #[test]
    fn ordinals_map_to_addresses_both_ways() {
        let block = Block::new(net("fd00::40/122"), "p", "n1");
        assert_eq!(block.ip_at(3), "fd00::43".parse::<IpAddr>().unwrap());
        assert_eq!(block.ordinal_of("fd00::7f".parse().unwrap()), Some(63));
        assert_eq!(block.ordinal_of("fd00::80".parse().unwrap()), None);
        assert_eq!(block_key(&net("10.1.0.0/26")), "blocks/10.1.0.0-26");
    }
}
