//! A small packet tracer over the nftables mode's table (as a recording fake holds it
//! after any number of syncs), as kube-proxy's nftables tests do: which endpoints a
//! packet can reach, whether it is masqueraded, or whether it is dropped or rejected.
//! It reads the sets and maps the rules look up; the rules themselves are checked to
//! be the ones it assumes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use calyx_dataplane::firewall::nft::Table;
use ipnetwork::IpNetwork;

use crate::proxy::model::Protocol;

#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// Arrives from a local pod's veth.
    pub from_pod: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// endpoint -> masqueraded
    Dnat(BTreeMap<SocketAddr, bool>),
    Reject,
    Drop,
    /// Not a Service packet: the table leaves it alone.
    Untouched,
}

fn parse_endpoint(value: &str) -> SocketAddr {
    let (ip, port) = value.split_once(" . ").expect("ip . port");
    SocketAddr::new(ip.parse().expect("ip"), port.parse().expect("port"))
}

fn in_interval_set(table: &Table, set: &str, ip: IpAddr) -> bool {
    table.sets[set]
        .elements
        .keys()
        .any(|e| match e.parse::<IpNetwork>() {
            Ok(net) => net.contains(ip),
            Err(_) => e.parse::<IpAddr>().is_ok_and(|a| a == ip),
        })
}

fn has(table: &Table, set: &str, key: &str) -> bool {
    table.sets[set].elements.contains_key(key)
}

fn lookup<'t>(table: &'t Table, map: &str, key: &str) -> Option<&'t str> {
    table.sets[map].elements.get(key).and_then(|v| v.as_deref())
}

/// The endpoints behind a verdict `goto <chain>`; `key` is the map key prefix.
fn endpoints_of(table: &Table, verdict: &str, key: &str) -> Vec<SocketAddr> {
    let chain = verdict.strip_prefix("goto ").expect("a goto");
    let (map, n) = if let Some(n) = chain.strip_prefix("service-lb-") {
        (format!("service-endpoints-{n}"), n)
    } else if let Some(n) = chain.strip_prefix("nodeport-lb-") {
        (format!("nodeport-endpoints-{n}"), n)
    } else {
        // An affinity chain: its last rule picks among per-endpoint chains.
        let rules = &table.chains[chain].rules;
        let pick = rules.last().expect("a pick rule");
        let inner = pick
            .split('{')
            .nth(1)
            .expect("a vmap")
            .trim_end_matches('}');
        return inner
            .split(',')
            .map(|entry| {
                let target = entry.split("goto ").nth(1).expect("goto").trim();
                let dnat = &table.chains[target].rules[1];
                let to = dnat.rsplit(' ').next().expect("address");
                to.parse().expect("socket address")
            })
            .collect();
    };
    let n: usize = n.parse().expect("count");
    assert!(table.chains[chain].rules[0].contains(&format!("mod {n} map @{map}")));
    (0..n)
        .map(|i| {
            parse_endpoint(lookup(table, &map, &format!("{key} . {i}")).expect("every slot filled"))
        })
        .collect()
}

/// Where `packet`, arriving at (or sent from) a node whose local addresses are
/// `local`, goes.
pub fn trace(table: &Table, packet: &Packet, local: &[IpAddr]) -> Outcome {
    let services = &table.chains["services"].rules;
    assert!(
        services[2].ends_with("vmap @service-ips"),
        "services chain: {services:?}"
    );
    let proto = packet.protocol.name();
    let key = format!("{} . {proto} . {}", packet.dst, packet.port);
    let port_key = format!("{proto} . {}", packet.port);
    // filter prerouting (before DNAT): loadBalancerSourceRanges.
    if has(table, "firewall-ips", &key) {
        let allowed = table.sets["firewall-allow"].elements.keys().any(|e| {
            e.strip_prefix(&format!("{key} . ")).is_some_and(|range| {
                match range.parse::<IpNetwork>() {
                    Ok(net) => net.contains(packet.src),
                    Err(_) => range.parse::<IpAddr>().is_ok_and(|a| a == packet.src),
                }
            })
        });
        if !allowed {
            return Outcome::Drop;
        }
    }
    let mut masquerade = (has(table, "cluster-masquerade", &key) && !packet.from_pod)
        || has(table, "external-masquerade", &key);
    let loopback = packet.dst.is_loopback();
    let nodeport = !loopback
        && local.contains(&packet.dst)
        && in_interval_set(table, "nodeport-ips", packet.dst);
    let endpoints = if let Some(verdict) = lookup(table, "service-ips", &key) {
        Some(endpoints_of(table, verdict, &key))
    } else if nodeport {
        masquerade |= has(table, "nodeport-masquerade", &port_key);
        lookup(table, "service-nodeports", &port_key).map(|v| endpoints_of(table, v, &port_key))
    } else {
        None
    };
    if let Some(endpoints) = endpoints {
        let hairpin = has(
            table,
            "hairpin",
            &format!("{} . {}", packet.src, packet.src),
        );
        return Outcome::Dnat(
            endpoints
                .into_iter()
                .map(|ep| (ep, masquerade || (hairpin && ep.ip() == packet.src)))
                .collect(),
        );
    }
    let refusal = lookup(table, "no-endpoint-services", &key).or_else(|| {
        nodeport
            .then(|| lookup(table, "no-endpoint-nodeports", &port_key))
            .flatten()
    });
    match refusal {
        Some("goto reject-chain") => Outcome::Reject,
        Some("drop") => Outcome::Drop,
        Some(other) => panic!("unexpected verdict {other}"),
        None => Outcome::Untouched,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{port_plans, ProxyState, ServicePort};
    use crate::proxy::nftables::table::{desired_table, TABLE};
    use crate::proxy::node::NodeSettings;
    use crate::proxy::testing::{endpoint, key, service, slice, slice_mut, state};
    use calyx_dataplane::firewall::nft::{RecordingNft, TableSync};
    use calyx_dataplane::firewall::IpFamily;

    const NODE1: &str = "192.0.2.11";
    const POD1: &str = "10.244.1.2";
    const POD2: &str = "10.244.2.2";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cluster() -> ProxyState {
        let mut web = service("web", "10.96.0.10", 80);
        web.ports[0].node_port = Some(30080);
        let none = service("none", "10.96.0.11", 80);
        let mut local = service("local", "10.96.0.12", 80);
        local.ports[0].node_port = Some(30081);
        local.external_local = true;
        let mut sticky = service("sticky", "10.96.0.13", 80);
        sticky.affinity_seconds = Some(60);
        let mut lb = service("lb", "10.96.0.14", 80);
        lb.load_balancer_ips = vec![ip("203.0.113.7")];
        lb.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let mut dual = service("dual", "10.96.0.15", 80);
        dual.cluster_ips.push(ip("fd00:96::15"));
        dual.ports.push(ServicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 53,
            node_port: None,
        });
        let mut dual_slice = slice(
            "dual",
            8080,
            vec![endpoint(POD1, "n1"), endpoint("fd00:10:244:1::2", "n1")],
        );
        dual_slice.ports.push(crate::proxy::model::SlicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 5353,
        });
        state(
            vec![web, none, local, sticky, lb, dual],
            vec![
                slice(
                    "web",
                    8080,
                    vec![endpoint(POD1, "n1"), endpoint(POD2, "n2")],
                ),
                slice("local", 8080, vec![endpoint(POD2, "n2")]),
                slice(
                    "sticky",
                    8080,
                    vec![endpoint(POD1, "n1"), endpoint(POD2, "n2")],
                ),
                slice("lb", 8080, vec![endpoint(POD2, "n2")]),
                dual_slice,
            ],
        )
    }

    fn ctx() -> NodeSettings {
        NodeSettings {
            nodeport_addresses: vec![format!("{NODE1}/32").parse().unwrap()],
        }
    }

    fn synced(st: &ProxyState, node: &str, family: IpFamily) -> (RecordingNft, TableSync) {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        let table = desired_table(&port_plans(st, node, family), family, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        (fake, sync)
    }

    fn packet(src: &str, dst: &str, port: u16, from_pod: bool) -> Packet {
        Packet {
            src: ip(src),
            dst: ip(dst),
            protocol: Protocol::Tcp,
            port,
            from_pod,
        }
    }

    fn dnat(list: &[(&str, bool)]) -> Outcome {
        Outcome::Dnat(list.iter().map(|(a, m)| (a.parse().unwrap(), *m)).collect())
    }

    fn run(fake: &RecordingNft, p: &Packet) -> Outcome {
        let table = fake.table(IpFamily::of(p.dst), TABLE).unwrap();
        trace(&table, p, &[ip(NODE1)])
    }

    #[test]
    fn every_service_path_goes_where_kube_proxy_sends_it() {
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V4);
        let both = [("10.244.1.2:8080", false), ("10.244.2.2:8080", false)];
        // 1, 2: a pod reaches every endpoint and keeps its source.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            dnat(&both)
        );
        // 3: the node itself is masqueraded.
        assert_eq!(
            run(&fake, &packet(NODE1, "10.96.0.10", 80, false)),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", true)])
        );
        // 4: hairpin: only the path back to itself is masqueraded.
        assert_eq!(
            run(&fake, &packet(POD1, "10.96.0.10", 80, true)),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", false)])
        );
        // 5: NodePort from outside, masqueraded (eTP Cluster); never on loopback.
        assert_eq!(
            run(&fake, &packet("192.0.2.100", NODE1, 30080, false)),
            dnat(&[("10.244.1.2:8080", true), ("10.244.2.2:8080", true)])
        );
        assert_eq!(
            run(&fake, &packet("127.0.0.1", "127.0.0.1", 30080, false)),
            Outcome::Untouched
        );
        // 6: eTP Local on a node without a local endpoint drops; the ClusterIP works.
        assert_eq!(
            run(&fake, &packet("192.0.2.100", NODE1, 30081, false)),
            Outcome::Drop
        );
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.12", 80, true)),
            dnat(&[("10.244.2.2:8080", false)])
        );
        // 7: loadBalancerSourceRanges.
        assert_eq!(
            run(&fake, &packet("198.51.100.4", "203.0.113.7", 80, false)),
            dnat(&[("10.244.2.2:8080", true)])
        );
        assert_eq!(
            run(&fake, &packet("192.0.2.100", "203.0.113.7", 80, false)),
            Outcome::Drop
        );
        // 8: session affinity goes through its own chains to the same endpoints.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.13", 80, true)),
            dnat(&both)
        );
        // 10: no endpoints at all: rejected at once.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.11", 80, true)),
            Outcome::Reject
        );
        // Not a Service.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.244.2.2", 80, true)),
            Outcome::Untouched
        );
    }

    #[test]
    fn etp_local_keeps_the_source_on_a_node_with_a_local_endpoint() {
        let (fake, _) = synced(&cluster(), "n2", IpFamily::V4);
        assert_eq!(
            run(&fake, &packet("192.0.2.100", NODE1, 30081, false)),
            dnat(&[("10.244.2.2:8080", false)])
        );
    }

    #[test]
    fn ipv6_and_udp_ports_have_their_own_table_and_entries() {
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V6);
        assert_eq!(
            run(&fake, &packet("fd00:10:244:1::9", "fd00:96::15", 80, true)),
            dnat(&[("[fd00:10:244:1::2]:8080", false)])
        );
        let (fake, _) = synced(&cluster(), "n1", IpFamily::V4);
        let mut udp = packet("10.244.1.9", "10.96.0.15", 53, true);
        udp.protocol = Protocol::Udp;
        assert_eq!(run(&fake, &udp), dnat(&[("10.244.1.2:5353", false)]));
    }

    #[test]
    fn a_partial_sync_emits_only_what_changed() {
        let mut st = cluster();
        let (fake, mut sync) = synced(&st, "n1", IpFamily::V4);
        fake.take_scripts();
        // One endpoint of "web" replaced.
        slice_mut(&mut st, "web").endpoints[1] = endpoint("10.244.2.3", "n2");
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        assert_eq!(
            fake.take_scripts(),
            ["delete element ip calyx-proxy nodeport-endpoints-2 { tcp . 30080 . 1 }\n\
              delete element ip calyx-proxy service-endpoints-2 { 10.96.0.10 . tcp . 80 . 1 }\n\
              add element ip calyx-proxy hairpin { 10.244.2.3 . 10.244.2.3 }\n\
              add element ip calyx-proxy nodeport-endpoints-2 { tcp . 30080 . 1 : 10.244.2.3 . 8080 }\n\
              add element ip calyx-proxy service-endpoints-2 { 10.96.0.10 . tcp . 80 . 1 : 10.244.2.3 . 8080 }\n"]
        );
        // The old endpoint stays in the hairpin set: "sticky" and "lb" still use it.
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            dnat(&[("10.244.1.2:8080", false), ("10.244.2.3:8080", false)])
        );
        // A Service gone: its entries go, nothing else is written.
        st.services.remove(&key("none"));
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        assert_eq!(
            fake.take_scripts(),
            [
                "delete element ip calyx-proxy cluster-masquerade { 10.96.0.11 . tcp . 80 }\n\
              delete element ip calyx-proxy no-endpoint-services { 10.96.0.11 . tcp . 80 }\n"
            ]
        );
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.11", 80, true)),
            Outcome::Untouched
        );
        // Nothing changed: nothing written.
        sync.sync(&fake, &table, false).unwrap();
        assert!(fake.take_scripts().is_empty());
    }

    #[test]
    fn an_endpoint_count_change_moves_the_service_to_another_map() {
        let mut st = cluster();
        let (fake, mut sync) = synced(&st, "n1", IpFamily::V4);
        slice_mut(&mut st, "web")
            .endpoints
            .push(endpoint("10.244.3.2", "n3"));
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            dnat(&[
                ("10.244.1.2:8080", false),
                ("10.244.2.2:8080", false),
                ("10.244.3.2:8080", false)
            ])
        );
        // Back to none: the 3-endpoint chain and map go away, and the Service rejects.
        slice_mut(&mut st, "web").endpoints.clear();
        let table = desired_table(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &ctx());
        sync.sync(&fake, &table, false).unwrap();
        let now = fake.table(IpFamily::V4, TABLE).unwrap();
        assert!(!now.chains.contains_key("service-lb-3"));
        assert_eq!(
            run(&fake, &packet("10.244.1.9", "10.96.0.10", 80, true)),
            Outcome::Reject
        );
    }
}
