//! The proxy's view of the cluster, free of Kubernetes types: Services with their
//! ports, and the endpoint slices that back them. The sources convert into it; every
//! mode computes its rules from `port_plans`, so the rules of which endpoints a packet
//! may reach are written once.

use std::collections::BTreeSet;
#[cfg(test)]
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use calyx_dataplane::firewall::IpFamily;
use imbl::OrdMap;
use ipnetwork::IpNetwork;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub use crate::protocol::Protocol;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Matches the EndpointSlice port of the same name ("" when the Service has one port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNetwork>,
    pub ports: Vec<ServicePort>,
    /// sessionAffinity ClientIP: the timeout in seconds.
    pub affinity_seconds: Option<u32>,
    pub external_local: bool,
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
    /// IPVS mode: the scheduler this Service asks for (its `calyx.io/ipvs-scheduler`
    /// annotation); None: the agent's default.
    pub ipvs_scheduler: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    /// Topology hints: the zones (`hints.forZones`) and nodes (`hints.forNodes`) this
    /// endpoint is meant for; empty when the slice gives none.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// One EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub service: ServiceKey,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, seconds since the epoch.
    pub trigger_time: Option<f64>,
}

/// Everything a source knows, keyed by (namespace, name) of each object: a Service
/// may have several slices, each naming it in `service`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyState {
    /// Shared, so that an object a change did not touch is the same allocation in the
    /// next snapshot: the controller recomputes only Services whose objects moved.
    /// Persistent maps: a source publishes a new snapshot in O(1) and a change in
    /// O(log n), not a copy of every key.
    pub services: OrdMap<ServiceKey, Arc<Service>>,
    pub slices: OrdMap<ServiceKey, Arc<Slice>>,
    /// This node's `topology.kubernetes.io/zone` label, for topology hints.
    pub node_zone: Option<String>,
}

impl ProxyState {
    /// The slices of each Service.
    #[cfg(test)]
    pub fn slices_by_service(&self) -> HashMap<&ServiceKey, Vec<&Arc<Slice>>> {
        let mut out: HashMap<&ServiceKey, Vec<&Arc<Slice>>> = HashMap::new();
        for slice in self.slices.values() {
            out.entry(&slice.service).or_default().push(slice);
        }
        out
    }

    /// Services whose Service or slices are not the same objects in `other` (added,
    /// removed or changed either way). One ordered walk of each map: unchanged objects
    /// cost a pointer comparison.
    pub fn changed_services(&self, other: &ProxyState) -> BTreeSet<ServiceKey> {
        let mut out = BTreeSet::new();
        walk(&self.services, &other.services, |key, _| {
            out.insert(key.clone());
        });
        walk(&self.slices, &other.slices, |_, slice| {
            out.insert(slice.service.clone());
        });
        out
    }
}

/// Calls `changed` for every key whose value is not the same allocation in `a` and
/// `b` (with the value of either side), walking both sorted maps once.
fn walk<T>(
    a: &OrdMap<ServiceKey, Arc<T>>,
    b: &OrdMap<ServiceKey, Arc<T>>,
    mut changed: impl FnMut(&ServiceKey, &T),
) {
    let (mut x, mut y) = (a.iter().peekable(), b.iter().peekable());
    loop {
        match (x.peek(), y.peek()) {
            (None, None) => return,
            (Some((k, v)), None) => {
                changed(k, v);
                x.next();
            }
            (None, Some((k, v))) => {
                changed(k, v);
                y.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    changed(ka, va);
                    x.next();
                }
                std::cmp::Ordering::Greater => {
                    changed(kb, vb);
                    y.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) {
                        changed(ka, va);
                        changed(kb, vb);
                    }
                    x.next();
                    y.next();
                }
            },
        }
    }
}

/// What to do with a packet for a Service port that has no endpoint it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoints {
    /// The Service has no endpoints at all: refuse at once (kube-proxy's REJECT).
    Reject,
    /// It has some, but the traffic policy allows none here: drop.
    Drop,
}

/// The endpoints one kind of traffic (cluster or external) may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    pub endpoints: Vec<SocketAddr>,
    /// Used when `endpoints` is empty.
    pub otherwise: NoEndpoints,
}

/// One Service port in one family, with everything the rules need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPlan {
    pub service: ServiceKey,
    pub port_name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub cluster_ips: Vec<IpAddr>,
    /// externalIPs and LoadBalancer ingress IPs.
    pub external_ips: Vec<IpAddr>,
    pub node_port: Option<u16>,
    pub cluster: Targets,
    pub external: Targets,
    /// externalTrafficPolicy Local: external traffic keeps its source (no masquerade).
    pub external_local: bool,
    pub affinity_seconds: Option<u32>,
    /// loadBalancerSourceRanges, for the LoadBalancer IPs (empty: everyone).
    pub source_ranges: Vec<IpNetwork>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub ipvs_scheduler: Option<String>,
}

impl PortPlan {
    /// kube-proxy's name for the port: `ns/name:port` (`ns/name` when unnamed).
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            self.service.to_string()
        } else {
            format!("{}:{}", self.service, self.port_name)
        }
    }

    /// Every endpoint either kind of traffic may reach.
    pub fn all_endpoints(&self) -> impl Iterator<Item = &SocketAddr> {
        self.cluster.endpoints.iter().chain(
            self.external
                .endpoints
                .iter()
                .filter(|e| !self.cluster.endpoints.contains(e)),
        )
    }
}

/// The port plans of every Service in one family, as node `node` sees them.
#[cfg(test)]
pub fn port_plans(state: &ProxyState, node: &str, family: IpFamily) -> Vec<PortPlan> {
    let slices = state.slices_by_service();
    let here = Here {
        node,
        zone: state.node_zone.as_deref(),
    };
    state
        .services
        .values()
        .flat_map(|service| {
            let own = slices.get(&service.key).map(Vec::as_slice).unwrap_or(&[]);
            service_port_plans(service, own, here, family)
        })
        .collect()
}

/// Where the proxy runs: what traffic policies and topology hints are judged by.
#[derive(Debug, Clone, Copy)]
pub struct Here<'a> {
    pub node: &'a str,
    /// The node's `topology.kubernetes.io/zone` label.
    pub zone: Option<&'a str>,
}

/// Which topology hints cluster traffic follows (kube-proxy's `topologyModeFromHints`):
/// those for this node when every ready endpoint has node hints and one names this
/// node; else those for this zone, likewise; else none (every endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    Any,
    SameNode,
    SameZone,
}

fn topology_mode(endpoints: &[(SocketAddr, &Endpoint)], here: Here) -> TopologyMode {
    let ready = || endpoints.iter().map(|(_, e)| *e).filter(|e| e.ready);
    for mode in [TopologyMode::SameNode, TopologyMode::SameZone] {
        let hinted = |e: &Endpoint| !hints(e, mode).is_empty();
        if ready().next().is_some()
            && ready().all(hinted)
            && ready().any(|e| meant_for(e, mode, here))
        {
            return mode;
        }
    }
    TopologyMode::Any
}

/// The hints `mode` reads (none for `Any`).
fn hints(endpoint: &Endpoint, mode: TopologyMode) -> &[String] {
    match mode {
        TopologyMode::Any => &[],
        TopologyMode::SameNode => &endpoint.node_hints,
        TopologyMode::SameZone => &endpoint.zone_hints,
    }
}

fn meant_for(endpoint: &Endpoint, mode: TopologyMode, here: Here) -> bool {
    let wanted = match mode {
        TopologyMode::Any => return true,
        TopologyMode::SameNode => Some(here.node),
        TopologyMode::SameZone => here.zone,
    };
    wanted.is_some_and(|w| hints(endpoint, mode).iter().any(|h| h == w))
}

/// The port plans of one Service in one family, from its slices.
pub fn service_port_plans(
    service: &Service,
    own_slices: &[&Arc<Slice>],
    here: Here,
    family: IpFamily,
) -> Vec<PortPlan> {
    let node = here.node;
    let in_family = |ip: &IpAddr| IpFamily::of(*ip) == family;
    let mut plans = Vec::new();
    let cluster_ips: Vec<IpAddr> = service
        .cluster_ips
        .iter()
        .copied()
        .filter(in_family)
        .collect();
    let external_ips: Vec<IpAddr> = service
        .external_ips
        .iter()
        .chain(&service.load_balancer_ips)
        .copied()
        .filter(in_family)
        .collect();
    let load_balancer_ips: Vec<IpAddr> = service
        .load_balancer_ips
        .iter()
        .copied()
        .filter(in_family)
        .collect();
    // A Service of the other family only: NodePorts belong to its own family.
    if cluster_ips.is_empty() && external_ips.is_empty() {
        return plans;
    }
    for port in &service.ports {
        let mut all: Vec<(SocketAddr, &Endpoint)> = Vec::new();
        for slice in own_slices {
            let Some(target) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| in_family(&e.address)) {
                let addr = SocketAddr::new(ep.address, target.port);
                if !all.iter().any(|(a, _)| *a == addr) {
                    all.push((addr, ep));
                }
            }
        }
        all.sort_by_key(|(a, _)| *a);
        // Topology hints steer cluster-wide traffic only; a Local policy already keeps
        // traffic on this node.
        let topology = topology_mode(&all, here);
        let usable = |local_only: bool| -> Vec<SocketAddr> {
            let candidates: Vec<&(SocketAddr, &Endpoint)> = all
                .iter()
                .filter(|(_, e)| !local_only || e.node.as_deref() == Some(node))
                .collect();
            // kube-proxy: ready endpoints; when none is, the serving ones that are
            // terminating, so a rolling update with no ready pod left still works
            // (hints are ignored then: no ready endpoint anywhere).
            let ready: Vec<SocketAddr> = candidates
                .iter()
                .filter(|(_, e)| e.ready && (local_only || meant_for(e, topology, here)))
                .map(|(a, _)| *a)
                .collect();
            if !ready.is_empty() {
                return ready;
            }
            candidates
                .iter()
                .filter(|(_, e)| e.serving && e.terminating)
                .map(|(a, _)| *a)
                .collect()
        };
        let any = !usable(false).is_empty();
        let otherwise = if any {
            NoEndpoints::Drop
        } else {
            NoEndpoints::Reject
        };
        plans.push(PortPlan {
            service: service.key.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol,
            port: port.port,
            cluster_ips: cluster_ips.clone(),
            external_ips: external_ips.clone(),
            node_port: port.node_port,
            cluster: Targets {
                endpoints: usable(service.internal_local),
                otherwise,
            },
            external: Targets {
                endpoints: usable(service.external_local),
                otherwise,
            },
            external_local: service.external_local,
            affinity_seconds: service.affinity_seconds,
            source_ranges: service.load_balancer_source_ranges.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            ipvs_scheduler: service.ipvs_scheduler.clone(),
        });
    }
    plans
}

/// For the health-check server: an eTP Local Service's healthCheckNodePort and how
/// many local endpoints it has (ready, or serving-terminating when none is ready).
pub fn health_check(
    service: &Service,
    own_slices: &[&Arc<Slice>],
    node: &str,
) -> Option<(u16, usize)> {
    let port = service
        .health_check_node_port
        .filter(|_| service.external_local)?;
    let local: Vec<&Endpoint> = own_slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.node.as_deref() == Some(node))
        .collect();
    let ready = local.iter().filter(|e| e.ready).count();
    let count = if ready > 0 {
        ready
    } else {
        local.iter().filter(|e| e.serving && e.terminating).count()
    };
    Some((port, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::proxy::testing::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn terminating_endpoints_are_used_only_when_no_endpoint_is_ready() {
        let mut old = endpoint("10.244.1.2", "n1");
        old.ready = false;
        old.terminating = true;
        let mut st = state(
            vec![service("web", "10.96.0.10", 80)],
            vec![slice(
                "web",
                8080,
                vec![old.clone(), endpoint("10.244.2.2", "n2")],
            )],
        );
        let plans = port_plans(&st, "n1", IpFamily::V4);
        assert_eq!(plans[0].cluster.endpoints, addrs(&["10.244.2.2:8080"]));
        slice_mut(&mut st, "web").endpoints = vec![old.clone()];
        let plans = port_plans(&st, "n1", IpFamily::V4);
        assert_eq!(plans[0].cluster.endpoints, addrs(&["10.244.1.2:8080"]));
        // Terminating and no longer serving: nothing, and the Service rejects.
        old.serving = false;
        slice_mut(&mut st, "web").endpoints = vec![old];
        let plans = port_plans(&st, "n1", IpFamily::V4);
        assert!(plans[0].cluster.endpoints.is_empty());
        assert_eq!(plans[0].cluster.otherwise, NoEndpoints::Reject);
    }

    #[test]
    fn topology_hints_steer_cluster_traffic_to_this_zone_or_node_when_every_endpoint_has_them() {
        let hinted = |ip: &str, node: &str, zone: &str| Endpoint {
            zone_hints: vec![zone.into()],
            node_hints: vec![node.into()],
            ..endpoint(ip, node)
        };
        let mut web = service("web", "10.96.0.10", 80);
        web.external_local = true;
        let mut st = state(
            vec![web],
            vec![slice(
                "web",
                8080,
                vec![
                    hinted("10.244.1.2", "n1", "a"),
                    hinted("10.244.2.2", "n2", "a"),
                    hinted("10.244.3.2", "n3", "b"),
                ],
            )],
        );
        let every = addrs(&["10.244.1.2:8080", "10.244.2.2:8080", "10.244.3.2:8080"]);
        // Node hints for this node win (PreferSameNode)...
        assert_eq!(
            port_plans(&st, "n1", IpFamily::V4)[0].cluster.endpoints,
            addrs(&["10.244.1.2:8080"])
        );
        // ...on a node no endpoint names, the zone's (PreferClose), if the node has one.
        st.node_zone = Some("a".into());
        let on_n4 = &port_plans(&st, "n4", IpFamily::V4)[0];
        assert_eq!(
            on_n4.cluster.endpoints,
            addrs(&["10.244.1.2:8080", "10.244.2.2:8080"])
        );
        // Local policies are not narrowed further: eTP Local keeps the node's own.
        assert!(on_n4.external.endpoints.is_empty());
        st.node_zone = Some("c".into());
        assert_eq!(
            port_plans(&st, "n4", IpFamily::V4)[0].cluster.endpoints,
            every
        );
        st.node_zone = None;
        assert_eq!(
            port_plans(&st, "n4", IpFamily::V4)[0].cluster.endpoints,
            every
        );
        // One ready endpoint without hints: hints are ignored altogether.
        st.node_zone = Some("a".into());
        slice_mut(&mut st, "web").endpoints[2].zone_hints.clear();
        slice_mut(&mut st, "web").endpoints[2].node_hints.clear();
        assert_eq!(
            port_plans(&st, "n1", IpFamily::V4)[0].cluster.endpoints,
            every
        );
        // An unready endpoint does not count, with or without hints.
        slice_mut(&mut st, "web").endpoints[2].ready = false;
        assert_eq!(
            port_plans(&st, "n4", IpFamily::V4)[0].cluster.endpoints,
            addrs(&["10.244.1.2:8080", "10.244.2.2:8080"])
        );
    }

    #[test]
    fn local_policies_keep_local_endpoints_and_drop_when_none_is_here() {
        let mut svc = service("web", "10.96.0.10", 80);
        svc.external_local = true;
        svc.internal_local = true;
        let st = state(
            vec![svc],
            vec![slice("web", 8080, vec![endpoint("10.244.2.2", "n2")])],
        );
        let on_n1 = &port_plans(&st, "n1", IpFamily::V4)[0];
        assert!(on_n1.cluster.endpoints.is_empty() && on_n1.external.endpoints.is_empty());
        assert_eq!(on_n1.external.otherwise, NoEndpoints::Drop);
        let on_n2 = &port_plans(&st, "n2", IpFamily::V4)[0];
        assert_eq!(on_n2.external.endpoints, addrs(&["10.244.2.2:8080"]));
    }

    #[test]
    fn ports_match_slice_ports_by_name_and_families_stay_apart() {
        let mut svc = service("web", "10.96.0.10", 80);
        svc.cluster_ips.push("fd00:96::10".parse().unwrap());
        svc.ports.push(ServicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 53,
            node_port: None,
        });
        let mut sl = slice(
            "web",
            8080,
            vec![
                endpoint("10.244.1.2", "n1"),
                endpoint("fd00:10:244::2", "n1"),
            ],
        );
        sl.ports.push(SlicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 5353,
        });
        let st = state(vec![svc], vec![sl]);
        let v4 = port_plans(&st, "n1", IpFamily::V4);
        assert_eq!(v4.len(), 2);
        assert_eq!(v4[1].cluster.endpoints, addrs(&["10.244.1.2:5353"]));
        let v6 = port_plans(&st, "n1", IpFamily::V6);
        assert_eq!(v6[0].cluster.endpoints, addrs(&["[fd00:10:244::2]:8080"]));
        assert_eq!(
            v6[0].cluster_ips,
            vec!["fd00:96::10".parse::<IpAddr>().unwrap()]
        );
    }
}
