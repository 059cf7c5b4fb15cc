//! What a pod's network should look like, computed from its addresses: pure data, so
//! ADD applies it, CHECK compares against it and the tests can read it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use std::path::PathBuf;

use calyx_dataplane::{format_mac, Link, RouteSpec, CALYX_ROUTE_PROTOCOL};
use ipnetwork::IpNetwork;
use sha1::{Digest, Sha1};

/// The host end of every pod veth has this MAC; pods reach their gateway through it.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];
/// The IPv4 gateway every pod uses; answered by the host veth (static neighbour entry).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway: the link-local address the kernel derives from HOST_VETH_MAC.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// One attachment's whole network, planned before anything is applied: ADD applies
/// it (`wiring`), CHECK compares what it observes with it (`differences`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub host_veth: String,
    pub ifname: String,
    pub netns: PathBuf,
    /// The pod end's MAC: derived from the attachment, so a retried ADD returns the
    /// same result.
    pub pod_mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<IpAddr>,
    /// The families whose gateway and default route this interface carries: those
    /// the pod had no default route for when it was added. A second Calyx interface
    /// of a pod gets its addresses and host routes, never the first one's routes.
    pub default_route_v4: bool,
    pub default_route_v6: bool,
    /// The host end starts held (`HELD_POD_GROUP`): a policy of the pod's namespace
    /// could isolate it, so nothing but its node reaches it or hears from it until the
    /// agent has classified it.
    pub held: bool,
}

impl PodNetwork {
    /// Whether this interface carries the default route of `ip`'s family.
    pub fn carries_default_route(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() {
            self.default_route_v4
        } else {
            self.default_route_v6
        }
    }

    /// The addresses whose family's default route goes through this interface.
    pub fn routed_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addresses
            .iter()
            .copied()
            .filter(|ip| self.carries_default_route(*ip))
    }

    /// Routes inside the pod, once the pod end has index `pod_ifindex`.
    pub fn pod_routes(&self, pod_ifindex: u32) -> Vec<RouteSpec> {
        self.routed_addresses()
            .flat_map(|ip| pod_routes(ip, pod_ifindex))
            .collect()
    }

    /// The host's routes to the pod, once the host end has index `host_ifindex`.
    pub fn host_routes(&self, host_ifindex: u32) -> Vec<RouteSpec> {
        self.addresses
            .iter()
            .map(|ip| host_route(*ip, host_ifindex))
            .collect()
    }

    /// What CHECK reports first when `seen` is not this plan; None when it matches.
    pub fn differences(&self, seen: &Observed) -> Option<String> {
        let (ifname, host_veth) = (&self.ifname, &self.host_veth);
        let Some(pod) = &seen.pod else {
            return Some(format!(
                "interface {ifname} is missing in {}",
                self.netns.display()
            ));
        };
        let Some(host) = &seen.host else {
            return Some(format!("host interface {host_veth} is missing"));
        };
        if !pod.up {
            return Some(format!("interface {ifname} is down"));
        }
        if !host.up {
            return Some(format!("host interface {host_veth} is down"));
        }
        if pod.mac != self.pod_mac {
            return Some(format!(
                "interface {ifname} has MAC {}, expected {}",
                format_mac(&pod.mac),
                format_mac(&self.pod_mac)
            ));
        }
        for ip in &self.addresses {
            if !seen.pod_addresses.contains(&(*ip, host_prefix(*ip))) {
                return Some(format!(
                    "interface {ifname} lacks address {}",
                    pod_address(*ip)
                ));
            }
        }
        for want in self.pod_routes(pod.index) {
            let present = seen.pod_routes.iter().any(|r| {
                r.destination == want.destination
                    && r.prefix_len == want.prefix_len
                    && r.gateway == want.gateway
                    && r.device == want.device
            });
            if !present {
                let via = want
                    .gateway
                    .map(|g| format!(" via {g}"))
                    .unwrap_or_default();
                return Some(format!(
                    "pod route {}/{}{via} dev {ifname} is missing",
                    want.destination, want.prefix_len
                ));
            }
        }
        for want in self.host_routes(host.index) {
            if !seen
                .host_routes
                .iter()
                .any(|r| r.destination == want.destination)
            {
                return Some(format!(
                    "host route {}/{} dev {host_veth} is missing",
                    want.destination, want.prefix_len
                ));
            }
        }
        None
    }
}

/// What CHECK reads back of one attachment.
#[derive(Debug, Default)]
pub struct Observed {
    pub host: Option<Link>,
    pub pod: Option<Link>,
    pub pod_addresses: Vec<(IpAddr, u8)>,
    pub pod_routes: Vec<RouteSpec>,
    pub host_routes: Vec<RouteSpec>,
}

/// `cyx` + 11 hex chars of sha1 of the attachment's identity. Where it cannot be
/// mistaken for another's, that is Calico's text: "<namespace>.<pod>" for a pod's eth0
/// (a namespace holds no dot), or the container ID (without dots) when the runtime
/// names no pod. Everything else (a second interface, dotted container IDs, odd
/// namespaces) hashes a JSON list of the parts, so no two attachments share a veth.
pub fn host_veth_name(
    pod_namespace: Option<&str>,
    pod_name: Option<&str>,
    container_id: &str,
    ifname: &str,
) -> String {
    let identity = match (pod_namespace, pod_name) {
        (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => {
            let dns_label = ns
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if dns_label && ifname == "eth0" {
                format!("{ns}.{pod}")
            } else {
                serde_json::json!([ns, pod, ifname]).to_string()
            }
        }
        _ if ifname == "eth0" && !container_id.contains('.') => container_id.to_string(),
        _ => serde_json::json!([container_id, ifname]).to_string(),
    };
    let digest = Sha1::digest(identity.as_bytes());
    format!(
        "{}{}",
        calyx_dataplane::HOST_VETH_PREFIX,
        &hex::encode(digest)[..11]
    )
}

/// The pod end's MAC: locally administered, unicast, from sha1 of the attachment, so
/// that ADD retried for the same container and interface gives the same result. It
/// only ever appears on the pod's own point-to-point link.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let digest = Sha1::digest(format!("{container_id}/{ifname}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] | 0x02) & 0xfe;
    mac
}

pub fn gateway_for(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(GATEWAY_V4),
        IpAddr::V6(_) => IpAddr::V6(GATEWAY_V6),
    }
}

pub use calyx_dataplane::host_prefix;

/// The pod's address as a host network (/32 or /128).
pub fn pod_address(ip: IpAddr) -> IpNetwork {
    IpNetwork::new(ip, host_prefix(ip)).expect("host prefix is valid")
}

pub fn default_destination(ip: IpAddr) -> IpNetwork {
    match ip {
        IpAddr::V4(_) => "0.0.0.0/0".parse().expect("valid"),
        IpAddr::V6(_) => "::/0".parse().expect("valid"),
    }
}

/// Routes inside the pod for one address: the gateway as an on-link host, then the
/// default route through it.
pub fn pod_routes(ip: IpAddr, pod_ifindex: u32) -> [RouteSpec; 2] {
    let gateway = gateway_for(ip);
    let unspecified = default_destination(ip).ip();
    [
        RouteSpec::direct(
            gateway,
            host_prefix(gateway),
            pod_ifindex,
            CALYX_ROUTE_PROTOCOL,
        ),
        RouteSpec {
            gateway: Some(gateway),
            link_scope: false,
            ..RouteSpec::direct(unspecified, 0, pod_ifindex, CALYX_ROUTE_PROTOCOL)
        },
    ]
}

/// The host's route to the pod address through its veth.
pub fn host_route(ip: IpAddr, host_ifindex: u32) -> RouteSpec {
    RouteSpec::direct(ip, host_prefix(ip), host_ifindex, CALYX_ROUTE_PROTOCOL)
}

/// Sysctls on the host end, by family: answer ARP for the gateway at once (proxy ARP,
/// no proxy delay), forward, and for IPv6 no router advertisements and no DAD on the
/// link-local address the pod uses as its gateway.
pub fn host_veth_sysctls(veth: &str, v4: bool, v6: bool) -> Vec<(String, &'static str)> {
    use calyx_dataplane::sysctl::iface_key;
    let mut out = Vec::new();
    if v4 {
        out.push((iface_key("net.ipv4.conf", veth, "proxy_arp"), "1"));
        out.push((iface_key("net.ipv4.neigh", veth, "proxy_delay"), "0"));
        out.push((iface_key("net.ipv4.conf", veth, "forwarding"), "1"));
    }
    if v6 {
        out.push((iface_key("net.ipv6.conf", veth, "accept_ra"), "0"));
        out.push((iface_key("net.ipv6.conf", veth, "accept_dad"), "0"));
        out.push((iface_key("net.ipv6.conf", veth, "forwarding"), "1"));
        out.push((iface_key("net.ipv6.conf", veth, "proxy_ndp"), "1"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_is_cyx_plus_11_hex_of_sha1() {
        // printf 'default.web-0' | sha1sum | cut -c1-11
        let name = host_veth_name(Some("default"), Some("web-0"), "abc", "eth0");
        assert_eq!(name, "cyx0d7763386da");
    }

    #[test]
    fn veth_name_falls_back_to_container_id_and_separates_interfaces() {
        let by_id = host_veth_name(None, Some("web-0"), "c0ffee", "eth0");
        assert_eq!(&by_id[3..], &hex::encode(Sha1::digest(b"c0ffee"))[..11]);
        let eth0 = host_veth_name(Some("ns"), Some("p"), "c", "eth0");
        let net1 = host_veth_name(Some("ns"), Some("p"), "c", "net1");
        assert_ne!(eth0, net1);
    }

    #[test]
    fn veth_names_of_different_attachments_differ() {
        let name = |ns, pod, cid, ifname| host_veth_name(ns, pod, cid, ifname);
        // Each pair once shared a name.
        assert_ne!(
            name(None, None, "pod.a", "net1"),
            name(None, None, "pod", "a.net1")
        );
        assert_ne!(
            name(Some("ns"), Some("p"), "c", "net1"),
            name(Some("ns"), Some("p.net1"), "c", "eth0")
        );
        assert_ne!(
            name(None, None, "default.web-0", "eth0"),
            name(Some("default"), Some("web-0"), "c", "eth0")
        );
        assert_ne!(
            name(Some("a.b"), Some("c"), "x", "eth0"),
            name(Some("a"), Some("b.c"), "x", "eth0")
        );
    }

    #[test]
    fn pod_mac_is_stable_unicast_and_locally_administered() {
        let mac = pod_mac("c1", "eth0");
        assert_eq!(mac, pod_mac("c1", "eth0"));
        assert_ne!(mac, pod_mac("c1", "net1"));
        assert_eq!(mac[0] & 0x03, 0x02);
    }

    #[test]
    fn ipv6_gateway_is_the_eui64_link_local_of_the_host_mac() {
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }

    #[test]
    fn pod_routes_go_through_the_link_scope_gateway() {
        let [gw, default] = pod_routes("10.244.0.5".parse().unwrap(), 7);
        assert_eq!(gw.destination.to_string(), "169.254.1.1");
        assert!(gw.link_scope && gw.prefix_len == 32);
        assert_eq!(default.prefix_len, 0);
        assert_eq!(default.gateway, Some(IpAddr::V4(GATEWAY_V4)));
        let [gw6, _] = pod_routes("fd00::5".parse().unwrap(), 7);
        assert_eq!(gw6.prefix_len, 128);
    }
}
