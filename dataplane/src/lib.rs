//! The one place in Calyx that talks to the kernel's networking: typed netlink calls
//! (over rtnetlink), network-namespace entry (over netns-rs) and sysctls. Nothing
//! else in the workspace builds netlink messages.

pub mod batch;
pub mod conntrack;
pub mod device_addresses;
#[cfg(feature = "firewall")]
pub mod firewall;
#[cfg(feature = "firewall")]
pub mod ipvs;
pub mod netlink;
pub mod nexthop;
pub mod nl;
pub mod overlay;
pub mod sysctl;

pub use netlink::{Link, Netlink, RouteSpec, CALYX_ROUTE_PROTOCOL};
pub use netns_rs::NetNs;

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A netlink request the kernel refused; `op` says what and on what.
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {path}: {reason}")]
    Netns {
        path: String,
        reason: String,
        not_found: bool,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
}

impl DataplaneError {
    fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Netlink { source, .. } | DataplaneError::Io { source, .. } => {
                source.raw_os_error()
            }
            DataplaneError::Netns { .. } => None,
        }
    }

    /// The object was already there (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(17)
    }

    /// The object (link, route, address, namespace) was not there.
    pub fn is_not_found(&self) -> bool {
        match self {
            DataplaneError::Netns { not_found, .. } => *not_found,
            // ENOENT, ESRCH, ENODEV, EADDRNOTAVAIL
            _ => matches!(self.errno(), Some(2 | 3 | 19 | 99)),
        }
    }
}

pub type Result<T> = std::result::Result<T, DataplaneError>;

/// How every pod's host veth is named: this, then a digest of the attachment. The
/// policy table matches pods' interfaces by it.
pub const HOST_VETH_PREFIX: &str = "cyx";

/// The link group of a pod's host veth while no agent has classified the pod (and
/// some policy of its namespace could isolate it): the policy table drops what such a
/// veth sends or is sent, the node's own traffic aside, until the agent has written
/// the pod's entries and moved the veth back to group 0.
pub const HELD_POD_GROUP: u32 = 0xca1c;

/// The agent's state file (in the plugin's state directory) listing, one per line,
/// the namespaces where some NetworkPolicy could isolate a new pod: the plugin holds
/// the pods it wires in them (`HELD_POD_GROUP`).
pub const POLICY_NAMESPACES_FILE: &str = "policy-namespaces";

/// The prefix of one address alone: /32, or /128.
pub fn host_prefix(ip: std::net::IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Formats a MAC address the usual way (`ee:ee:ee:ee:ee:ee`).
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in out.iter_mut() {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or white space, not "." or "..".
pub fn validate_ifname(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("an interface name must be 1 to 15 characters");
    }
    if name == "." || name == ".." {
        return Err("an interface name cannot be . or ..");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err("an interface name cannot hold '/', ':' or white space");
    }
    // The kernel reads "%d" as a template ("eth%d" becomes eth0, eth1...), so the
    // interface would not be found under the name asked for.
    if name.contains('%') {
        return Err("an interface name cannot hold '%' (the kernel reads it as a template)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_rules() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a-very-long-ifname").is_err());
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("..").is_err());
        assert!(validate_ifname("eth%d").is_err());
    }

    #[test]
    fn mac_round_trips() {
        let mac = parse_mac("ee:ee:ee:ee:ee:0a").unwrap();
        assert_eq!(format_mac(&mac), "ee:ee:ee:ee:ee:0a");
        assert!(parse_mac("ee:ee").is_none());
        assert!(parse_mac("ee:ee:ee:ee:ee:ee:ee").is_none());
        assert!(parse_mac("zz:ee:ee:ee:ee:ee").is_none());
    }
}
