//! What every proxy mode needs to know about this node: where NodePorts answer, which
//! interfaces are local pods', and the mark that asks for masquerading.

use ipnetwork::IpNetwork;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14), the same in every
/// mode so that a node switched between modes, or runbooks, agree on it.
pub const MASQUERADE_MARK: u32 = 0x4000;

/// The host-side veths of Calyx pods (`cyx` + a hash), in nftables' wildcard form:
/// traffic arriving on one comes from a local pod.
pub const POD_INTERFACES_NFT: &str = "cyx*";

/// The same interfaces in iptables' wildcard form.
pub const POD_INTERFACES_IPTABLES: &str = "cyx+";

/// The node's settings the rules depend on.
#[derive(Debug, Clone, Default)]
pub struct NodeSettings {
    /// The node addresses (as CIDRs) NodePorts answer on (`--nodeport-addresses`).
    pub nodeport_addresses: Vec<IpNetwork>,
}
