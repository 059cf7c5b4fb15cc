//! UDP has no connection to close: when an endpoint goes away, conntrack entries that
//! DNAT to it would keep a client with a fixed source port talking to nothing until
//! they expire (kubernetes#19029, #59368, #125467). After each apply, the entries of
//! removed endpoints are deleted, and so are the un-NATed entries of a Service port
//! that just got its first endpoint (made while it was rejecting).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use calyx_dataplane::conntrack::UdpFlows;

use super::model::{PortPlan, Protocol, ServiceKey};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deletion {
    /// Flows to `address:port` that were DNATed to `endpoint`.
    ToEndpoint {
        address: IpAddr,
        port: u16,
        endpoint: IpAddr,
    },
    /// Flows to NodePort `port` that were DNATed to `endpoint`.
    NodePortToEndpoint { port: u16, endpoint: IpAddr },
    /// Every flow to `address:port` (it had no endpoint until now).
    ToService { address: IpAddr, port: u16 },
    /// Every flow to NodePort `port`.
    ToNodePort { port: u16 },
}

impl Deletion {
    /// The flows this deletes, as the dataplane's `conntrack` call takes them.
    pub fn flows(&self) -> UdpFlows {
        let (orig_dst, orig_dst_port, dst_nat) = match *self {
            Deletion::ToEndpoint {
                address,
                port,
                endpoint,
            } => (Some(address), port, Some(endpoint)),
            Deletion::NodePortToEndpoint { port, endpoint } => (None, port, Some(endpoint)),
            Deletion::ToService { address, port } => (Some(address), port, None),
            Deletion::ToNodePort { port } => (None, port, None),
        };
        UdpFlows {
            orig_dst,
            orig_dst_port,
            dst_nat,
        }
    }
}

type PortId<'a> = (&'a ServiceKey, &'a str, Protocol);

fn udp_ports(plans: &[PortPlan]) -> BTreeMap<PortId<'_>, &PortPlan> {
    plans
        .iter()
        .filter(|p| p.protocol == Protocol::Udp)
        .map(|p| ((&p.service, p.port_name.as_str(), p.protocol), p))
        .collect()
}

/// What to delete after going from `before` to `after` (one family's plans).
pub fn stale_udp(before: &[PortPlan], after: &[PortPlan]) -> BTreeSet<Deletion> {
    let (old, new) = (udp_ports(before), udp_ports(after));
    let mut out = BTreeSet::new();
    for (id, was) in &old {
        let now = new.get(id);
        let still: BTreeSet<IpAddr> = now
            .map(|p| p.all_endpoints().map(|e| e.ip()).collect())
            .unwrap_or_default();
        for gone in was
            .all_endpoints()
            .map(|e| e.ip())
            .filter(|ip| !still.contains(ip))
        {
            for address in was.cluster_ips.iter().chain(&was.external_ips) {
                out.insert(Deletion::ToEndpoint {
                    address: *address,
                    port: was.port,
                    endpoint: gone,
                });
            }
            if let Some(port) = was.node_port {
                out.insert(Deletion::NodePortToEndpoint {
                    port,
                    endpoint: gone,
                });
            }
        }
    }
    for (id, now) in &new {
        let had_any = old
            .get(id)
            .is_some_and(|p| p.all_endpoints().next().is_some());
        if had_any || now.all_endpoints().next().is_none() {
            continue;
        }
        for address in now.cluster_ips.iter().chain(&now.external_ips) {
            out.insert(Deletion::ToService {
                address: *address,
                port: now.port,
            });
        }
        if let Some(port) = now.node_port {
            out.insert(Deletion::ToNodePort { port });
        }
    }
    out
}

/// Deletes the flows of `deletions` (see `calyx_dataplane::conntrack`).
pub fn delete(deletions: &BTreeSet<Deletion>) {
    let flows: Vec<UdpFlows> = deletions.iter().map(Deletion::flows).collect();
    calyx_dataplane::conntrack::delete_udp(&flows);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{port_plans, Protocol};
    use crate::proxy::testing::{endpoint, service, slice, state};
    use calyx_dataplane::firewall::IpFamily;

    fn udp_plans(endpoints: &[&str]) -> Vec<PortPlan> {
        let mut svc = service("dns", "10.96.0.53", 53);
        svc.ports[0].protocol = Protocol::Udp;
        svc.ports[0].node_port = Some(30053);
        let mut sl = slice(
            "dns",
            5353,
            endpoints.iter().map(|e| endpoint(e, "n1")).collect(),
        );
        sl.ports[0].protocol = Protocol::Udp;
        port_plans(&state(vec![svc], vec![sl]), "n1", IpFamily::V4)
    }

    #[test]
    fn a_removed_udp_endpoint_has_its_flows_deleted() {
        let d = stale_udp(
            &udp_plans(&["10.244.1.2", "10.244.1.3"]),
            &udp_plans(&["10.244.1.3"]),
        );
        let args: Vec<Vec<String>> = d.iter().map(|d| d.flows().args()).collect();
        assert_eq!(
            args,
            [
                "-D -p udp --orig-dst 10.96.0.53 --orig-port-dst 53 --dst-nat 10.244.1.2 -f ipv4",
                "-D -p udp --orig-port-dst 30053 --dst-nat 10.244.1.2 -f ipv4",
            ]
            .map(|s| s.split(' ').map(String::from).collect::<Vec<_>>())
        );
    }

    #[test]
    fn a_first_endpoint_clears_flows_made_while_rejecting_and_no_change_clears_nothing() {
        let d = stale_udp(&udp_plans(&[]), &udp_plans(&["10.244.1.2"]));
        assert!(d.contains(&Deletion::ToService {
            address: "10.96.0.53".parse().unwrap(),
            port: 53
        }));
        assert!(d.contains(&Deletion::ToNodePort { port: 30053 }));
        assert!(stale_udp(&udp_plans(&["10.244.1.2"]), &udp_plans(&["10.244.1.2"])).is_empty());
    }
}
