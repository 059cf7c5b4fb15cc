//! UDP has no connection to close: when an endpoint goes away, conntrack entries that
//! DNAT to it would keep a client with a fixed source port talking to nothing until
//! they expire (kubernetes#19029, #59368, #125467). After each apply, the entries of
//! removed endpoints are deleted, and so are the un-NATed entries of a Service port
//! that just got its first endpoint (made while it was rejecting).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

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
    /// The `conntrack` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-D", "-p", "udp"].map(String::from).to_vec();
        let mut push = |k: &str, v: String| {
            args.push(k.into());
            args.push(v);
        };
        match self {
            Deletion::ToEndpoint {
                address,
                port,
                endpoint,
            } => {
                push("--orig-dst", address.to_string());
                push("--orig-port-dst", port.to_string());
                push("--dst-nat", endpoint.to_string());
            }
            Deletion::NodePortToEndpoint { port, endpoint } => {
                push("--orig-port-dst", port.to_string());
                push("--dst-nat", endpoint.to_string());
            }
            Deletion::ToService { address, port } => {
                push("--orig-dst", address.to_string());
                push("--orig-port-dst", port.to_string());
            }
            Deletion::ToNodePort { port } => push("--orig-port-dst", port.to_string()),
        }
        if let Some(family) = match self {
            Deletion::ToEndpoint { address, .. } | Deletion::ToService { address, .. } => {
                Some(address.is_ipv6())
            }
            Deletion::NodePortToEndpoint { endpoint, .. } => Some(endpoint.is_ipv6()),
            Deletion::ToNodePort { .. } => None,
        } {
            args.push("-f".into());
            args.push(if family { "ipv6" } else { "ipv4" }.into());
        }
        args
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

/// Runs the deletions with the `conntrack` tool; a failure is logged, never fatal
/// (the entries time out eventually, and the next change retries nothing).
pub fn delete(deletions: &BTreeSet<Deletion>) {
    for d in deletions {
        let args = d.args();
        match std::process::Command::new("conntrack").args(&args).output() {
            // conntrack exits 1 when nothing matched.
            Ok(out) if out.status.success() || out.status.code() == Some(1) => {
                tracing::debug!(args = ?args, "conntrack entries deleted");
            }
            Ok(out) => tracing::warn!(
                args = ?args,
                error = %String::from_utf8_lossy(&out.stderr).trim(),
                "conntrack -D failed"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot run conntrack"),
        }
    }
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
        let args: Vec<Vec<String>> = d.iter().map(Deletion::args).collect();
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
