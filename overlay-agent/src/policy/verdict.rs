//! The semantics, as the API states them, over the model: whether one flow is allowed
//! and why. The kernel's rules are checked against this (the tracer's verdict must
//! equal it), and `policy explain` prints it.

use std::net::IpAddr;

use super::model::{
    block_contains, Cluster, Direction, Peer, Pod, PodKey, PolicyKey, PortRule, PortSpec, Protocol,
    Rule,
};

/// One side of a flow: an address, the pod that holds it if any, and whether it is a
/// node's own address (then `node` names it).
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    pub address: IpAddr,
    pub pod: Option<&'a Pod>,
    pub node: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    pub fn pod(pod: &'a Pod, address: IpAddr) -> Endpoint<'a> {
        Endpoint {
            address,
            pod: Some(pod),
            node: None,
        }
    }

    pub fn address(address: IpAddr) -> Endpoint<'a> {
        Endpoint {
            address,
            pod: None,
            node: None,
        }
    }

    /// A node's own address (no command names one yet: the tests and the kernel side).
    #[cfg(test)]
    pub fn node(name: &'a str, address: IpAddr) -> Endpoint<'a> {
        Endpoint {
            address,
            pod: None,
            node: Some(name),
        }
    }

    /// The pod policies may select: not a host-network one.
    fn policy_pod(&self) -> Option<&'a Pod> {
        self.pod.filter(|p| !p.host_network)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    pub from: Endpoint<'a>,
    pub to: Endpoint<'a>,
    pub protocol: Protocol,
    pub port: u16,
}

/// Why one direction let a flow through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// No policy isolates that side in that direction (or it is not a pod).
    NotIsolated,
    /// Rule `rule` (counting from 0) of `policy` allows it.
    ByRule { policy: PolicyKey, rule: usize },
    /// A node always reaches its own pods (kubelet's probes).
    ResidentNode,
    /// A pod reaching itself never leaves its namespace.
    Itself,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        egress: Allowed,
        ingress: Allowed,
    },
    /// `pod` is isolated for `direction` by `isolated_by` and none of their rules
    /// allow the flow.
    Denied {
        direction: Direction,
        pod: PodKey,
        isolated_by: Vec<PolicyKey>,
    },
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allowed { .. })
    }
}

fn port_matches(rule: &PortRule, protocol: Protocol, port: u16, destination: Option<&Pod>) -> bool {
    rule.protocol == protocol
        && match &rule.port {
            PortSpec::Any => true,
            PortSpec::Range { port: first, end } => (*first..=*end).contains(&port),
            PortSpec::Named(name) => {
                destination.and_then(|pod| pod.named_port(name, protocol)) == Some(port)
            }
        }
}

fn peer_matches(cluster: &Cluster, peer: &Peer, policy_namespace: &str, other: &Endpoint) -> bool {
    match peer {
        Peer::Pods { .. } => other
            .policy_pod()
            .is_some_and(|pod| cluster.peer_has_pod(peer, policy_namespace, pod)),
        Peer::Block { cidr, except } => block_contains(cidr, except, other.address),
    }
}

fn rule_allows(
    cluster: &Cluster,
    rule: &Rule,
    policy_namespace: &str,
    other: &Endpoint,
    flow: &Flow,
) -> bool {
    let peer_ok = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|peer| peer_matches(cluster, peer, policy_namespace, other));
    let port_ok = rule.ports.is_empty()
        || rule
            .ports
            .iter()
            .any(|p| port_matches(p, flow.protocol, flow.port, flow.to.policy_pod()));
    peer_ok && port_ok
}

/// One direction's judgement of `flow` at `pod` (the source for egress, the
/// destination for ingress), `other` being the far side.
fn judge(
    cluster: &Cluster,
    flow: &Flow,
    direction: Direction,
    pod: &Pod,
    other: &Endpoint,
) -> Result<Allowed, Vec<PolicyKey>> {
    let mut isolated_by = Vec::new();
    for policy in cluster.isolating(pod, direction) {
        let rules = policy.rules(direction).unwrap_or_default();
        if let Some(rule) = rules
            .iter()
            .position(|rule| rule_allows(cluster, rule, &policy.key.namespace, other, flow))
        {
            return Ok(Allowed::ByRule {
                policy: policy.key.clone(),
                rule,
            });
        }
        isolated_by.push(policy.key.clone());
    }
    if isolated_by.is_empty() {
        Ok(Allowed::NotIsolated)
    } else {
        Err(isolated_by)
    }
}

/// Whether `flow` is allowed: egress at its source, then ingress at its destination.
pub fn verdict(cluster: &Cluster, flow: &Flow) -> Verdict {
    if let (Some(a), Some(b)) = (flow.from.pod, flow.to.pod) {
        if a.key == b.key {
            return Verdict::Allowed {
                egress: Allowed::Itself,
                ingress: Allowed::Itself,
            };
        }
    }
    let egress = match flow.from.policy_pod() {
        None => Allowed::NotIsolated,
        Some(pod) => match judge(cluster, flow, Direction::Egress, pod, &flow.to) {
            Ok(allowed) => allowed,
            Err(isolated_by) => {
                return Verdict::Denied {
                    direction: Direction::Egress,
                    pod: pod.key.clone(),
                    isolated_by,
                }
            }
        },
    };
    let ingress = match flow.to.policy_pod() {
        None => Allowed::NotIsolated,
        Some(pod) if flow.from.node == Some(pod.node.as_str()) => Allowed::ResidentNode,
        Some(pod) => match judge(cluster, flow, Direction::Ingress, pod, &flow.from) {
            Ok(allowed) => allowed,
            Err(isolated_by) => {
                return Verdict::Denied {
                    direction: Direction::Ingress,
                    pod: pod.key.clone(),
                    isolated_by,
                }
            }
        },
    };
    Verdict::Allowed { egress, ingress }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::*;

    /// The upstream e2e layout: namespaces x, y, z; pods a, b, c in each, with
    /// `pod=<name>` labels, on two nodes; every pod names port 80 "serve-80-tcp"
    /// except z/c, which names 81 the same (one name, two numbers).
    fn cluster() -> Cluster {
        let mut c = Cluster::default();
        for (n, ns) in ["x", "y", "z"].into_iter().enumerate() {
            c.namespaces.insert(
                ns.into(),
                Namespace {
                    name: ns.into(),
                    labels: [
                        (NAMESPACE_NAME_LABEL.to_string(), ns.to_string()),
                        ("ns".to_string(), ns.to_string()),
                    ]
                    .into(),
                },
            );
            for (p, pod) in ["a", "b", "c"].into_iter().enumerate() {
                let port = if (ns, pod) == ("z", "c") { 81 } else { 80 };
                let key = PodKey {
                    namespace: ns.into(),
                    name: pod.into(),
                };
                c.pods.insert(
                    key.clone(),
                    Pod {
                        key,
                        labels: [("pod".to_string(), pod.to_string())].into(),
                        node: if p == 0 { "n1".into() } else { "n2".into() },
                        addresses: vec![format!("10.244.{}.{}", n + 1, p + 1).parse().unwrap()],
                        named_ports: vec![NamedPort {
                            name: "serve-80-tcp".into(),
                            protocol: Protocol::Tcp,
                            port,
                        }],
                        host_network: false,
                    },
                );
            }
        }
        c
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pods(pairs: &[(&str, &str)]) -> Selector {
        Selector {
            match_labels: labels(pairs),
            match_expressions: vec![],
        }
    }

    fn policy(
        ns: &str,
        selector: Selector,
        ingress: Option<Vec<Rule>>,
        egress: Option<Vec<Rule>>,
    ) -> Policy {
        Policy {
            key: PolicyKey {
                namespace: ns.into(),
                name: "p".into(),
            },
            pod_selector: selector,
            ingress,
            egress,
        }
    }

    fn with(mut c: Cluster, policies: Vec<Policy>) -> Cluster {
        for (i, mut p) in policies.into_iter().enumerate() {
            p.key.name = format!("p{i}");
            c.policies.insert(p.key.clone(), p);
        }
        c
    }

    fn allowed(c: &Cluster, from: &str, to: &str, protocol: Protocol, port: u16) -> bool {
        let pod = |s: &str| {
            let (ns, name) = s.split_once('/').unwrap();
            &c.pods[&PodKey {
                namespace: ns.into(),
                name: name.into(),
            }]
        };
        let endpoint = |s: &str| match s.parse::<IpAddr>() {
            Ok(ip) => Endpoint::address(ip),
            Err(_) => Endpoint::pod(pod(s), pod(s).addresses[0]),
        };
        let flow = Flow {
            from: endpoint(from),
            to: endpoint(to),
            protocol,
            port,
        };
        verdict(c, &flow).is_allowed()
    }

    /// Every pod pair's verdict on tcp/80, as the e2e's reachability tables print it.
    fn table(c: &Cluster) -> Vec<(String, String)> {
        let names: Vec<String> = c.pods.keys().map(|k| k.to_string()).collect();
        let mut denied = Vec::new();
        for from in &names {
            for to in &names {
                if !allowed(c, from, to, Protocol::Tcp, 80) {
                    denied.push((from.clone(), to.clone()));
                }
            }
        }
        denied
    }

    #[test]
    fn without_policies_everything_is_allowed() {
        assert!(table(&cluster()).is_empty());
    }

    #[test]
    fn default_deny_ingress_isolates_only_its_namespace_and_only_ingress() {
        let c = with(
            cluster(),
            vec![policy("x", Selector::everything(), Some(vec![]), None)],
        );
        let denied = table(&c);
        // Every pod but itself into x's pods; nothing else.
        assert_eq!(denied.len(), 3 * 8);
        assert!(denied
            .iter()
            .all(|(from, to)| to.starts_with("x/") && from != to));
        assert!(
            allowed(&c, "x/a", "y/b", Protocol::Tcp, 80),
            "egress is not isolated"
        );
    }

    #[test]
    fn an_empty_rule_allows_everything_and_policies_add_up() {
        let c = with(
            cluster(),
            vec![
                policy("x", Selector::everything(), Some(vec![]), None),
                policy(
                    "x",
                    pods(&[("pod", "a")]),
                    Some(vec![Rule::default()]),
                    None,
                ),
            ],
        );
        assert!(allowed(&c, "z/c", "x/a", Protocol::Udp, 53));
        assert!(!allowed(&c, "z/c", "x/b", Protocol::Tcp, 80));
    }

    #[test]
    fn peers_pod_selector_alone_is_the_policys_namespace_and_both_is_and() {
        let from_b = Rule {
            peers: vec![Peer::Pods {
                namespaces: None,
                pods: pods(&[("pod", "b")]),
            }],
            ports: vec![],
        };
        let c = with(
            cluster(),
            vec![policy("x", pods(&[("pod", "a")]), Some(vec![from_b]), None)],
        );
        assert!(allowed(&c, "x/b", "x/a", Protocol::Tcp, 80));
        assert!(
            !allowed(&c, "y/b", "x/a", Protocol::Tcp, 80),
            "y/b is not in x"
        );
        let both = Rule {
            peers: vec![Peer::Pods {
                namespaces: Some(pods(&[("ns", "y")])),
                pods: pods(&[("pod", "b")]),
            }],
            ports: vec![],
        };
        let c = with(
            cluster(),
            vec![policy("x", pods(&[("pod", "a")]), Some(vec![both]), None)],
        );
        assert!(allowed(&c, "y/b", "x/a", Protocol::Tcp, 80));
        assert!(!allowed(&c, "y/c", "x/a", Protocol::Tcp, 80));
        assert!(!allowed(&c, "z/b", "x/a", Protocol::Tcp, 80));
        assert!(!allowed(&c, "x/b", "x/a", Protocol::Tcp, 80), "x is not y");
        // A namespaceSelector alone: every pod there; `{}`: every namespace.
        let all = Rule {
            peers: vec![Peer::Pods {
                namespaces: Some(Selector::everything()),
                pods: Selector::everything(),
            }],
            ports: vec![],
        };
        let c = with(
            cluster(),
            vec![policy("x", pods(&[("pod", "a")]), Some(vec![all]), None)],
        );
        assert!(table(&c).is_empty());
    }

    #[test]
    fn match_expressions_follow_the_api() {
        let req = |operator, values: &[&str]| Selector {
            match_labels: Labels::new(),
            match_expressions: vec![Requirement {
                key: "pod".into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
        };
        let none = Labels::new();
        let a = labels(&[("pod", "a")]);
        assert!(req(Operator::In, &["a", "b"]).matches(&a));
        assert!(!req(Operator::In, &["b"]).matches(&a));
        assert!(!req(Operator::In, &["a"]).matches(&none));
        assert!(req(Operator::NotIn, &["b"]).matches(&a));
        assert!(
            req(Operator::NotIn, &["b"]).matches(&none),
            "no key is not in"
        );
        assert!(req(Operator::Exists, &[]).matches(&a));
        assert!(!req(Operator::Exists, &[]).matches(&none));
        assert!(req(Operator::DoesNotExist, &[]).matches(&none));
    }

    #[test]
    fn policy_types_isolate_egress_only_when_asked() {
        let to_y = Rule {
            peers: vec![Peer::Pods {
                namespaces: Some(pods(&[("ns", "y")])),
                pods: Selector::everything(),
            }],
            ports: vec![],
        };
        // Egress rules without policyTypes: the API makes it [Ingress, Egress].
        let c = with(
            cluster(),
            vec![policy(
                "x",
                pods(&[("pod", "a")]),
                Some(vec![]),
                Some(vec![to_y]),
            )],
        );
        assert!(allowed(&c, "x/a", "y/c", Protocol::Tcp, 80));
        assert!(!allowed(&c, "x/a", "z/c", Protocol::Tcp, 80));
        assert!(
            !allowed(&c, "x/b", "x/a", Protocol::Tcp, 80),
            "ingress isolated too"
        );
        match verdict(
            &c,
            &Flow {
                from: Endpoint::pod(&c.pods[&key("x", "a")], "10.244.1.1".parse().unwrap()),
                to: Endpoint::address("192.0.2.1".parse().unwrap()),
                protocol: Protocol::Tcp,
                port: 443,
            },
        ) {
            Verdict::Denied {
                direction,
                pod,
                isolated_by,
            } => {
                assert_eq!(direction, Direction::Egress);
                assert_eq!(pod, key("x", "a"));
                assert_eq!(isolated_by.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    fn key(ns: &str, name: &str) -> PodKey {
        PodKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn ip_blocks_match_pod_addresses_and_except_stays_inside_its_peer() {
        let block = |cidr: &str, except: &[&str]| Peer::Block {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        };
        let rule = Rule {
            // z's pods (10.244.3.0/24) but not z/b; and, in another peer, z/b again.
            peers: vec![
                block("10.244.3.0/24", &["10.244.3.2/32"]),
                Peer::Pods {
                    namespaces: Some(pods(&[("ns", "z")])),
                    pods: pods(&[("pod", "b")]),
                },
            ],
            ports: vec![],
        };
        let c = with(
            cluster(),
            vec![policy(
                "x",
                pods(&[("pod", "a")]),
                Some(vec![rule.clone()]),
                None,
            )],
        );
        assert!(allowed(&c, "z/a", "x/a", Protocol::Tcp, 80));
        assert!(
            allowed(&c, "z/b", "x/a", Protocol::Tcp, 80),
            "the other peer allows z/b"
        );
        assert!(!allowed(&c, "y/a", "x/a", Protocol::Tcp, 80));
        let mut only_block = rule;
        only_block.peers.truncate(1);
        let c = with(
            cluster(),
            vec![policy(
                "x",
                pods(&[("pod", "a")]),
                Some(vec![only_block]),
                None,
            )],
        );
        assert!(!allowed(&c, "z/b", "x/a", Protocol::Tcp, 80));
        assert!(
            allowed(&c, "10.244.3.9", "x/a", Protocol::Tcp, 80),
            "an outside address"
        );
    }

    #[test]
    fn ports_numbers_ranges_names_per_pod_and_protocols() {
        let ports = |ports: Vec<PortRule>| Rule {
            peers: vec![],
            ports,
        };
        let tcp = |port| PortRule {
            protocol: Protocol::Tcp,
            port,
        };
        let c = with(
            cluster(),
            vec![policy(
                "x",
                Selector::everything(),
                Some(vec![ports(vec![
                    tcp(PortSpec::Range { port: 80, end: 80 }),
                    tcp(PortSpec::Range {
                        port: 8000,
                        end: 8010,
                    }),
                    PortRule {
                        protocol: Protocol::Udp,
                        port: PortSpec::Any,
                    },
                ])]),
                None,
            )],
        );
        assert!(allowed(&c, "y/a", "x/a", Protocol::Tcp, 80));
        assert!(!allowed(&c, "y/a", "x/a", Protocol::Tcp, 81));
        assert!(
            allowed(&c, "y/a", "x/a", Protocol::Tcp, 8010),
            "endPort is inclusive"
        );
        assert!(!allowed(&c, "y/a", "x/a", Protocol::Tcp, 8011));
        assert!(
            allowed(&c, "y/a", "x/a", Protocol::Udp, 12345),
            "a protocol without a port"
        );
        assert!(!allowed(&c, "y/a", "x/a", Protocol::Sctp, 80));
        // A name means 80 on z/a and 81 on z/c.
        let c = with(
            cluster(),
            vec![policy(
                "z",
                Selector::everything(),
                Some(vec![ports(vec![tcp(PortSpec::Named(
                    "serve-80-tcp".into(),
                ))])]),
                None,
            )],
        );
        assert!(allowed(&c, "x/a", "z/a", Protocol::Tcp, 80));
        assert!(!allowed(&c, "x/a", "z/a", Protocol::Tcp, 81));
        assert!(allowed(&c, "x/a", "z/c", Protocol::Tcp, 81));
        assert!(!allowed(&c, "x/a", "z/c", Protocol::Tcp, 80));
    }

    #[test]
    fn the_resident_node_and_the_pod_itself_always_pass_and_host_network_is_never_selected() {
        let mut c = with(
            cluster(),
            vec![policy(
                "x",
                Selector::everything(),
                Some(vec![]),
                Some(vec![]),
            )],
        );
        let a = &c.pods[&key("x", "a")];
        let flow = |from, to| Flow {
            from,
            to,
            protocol: Protocol::Tcp,
            port: 80,
        };
        let node = "192.0.2.11".parse().unwrap();
        assert!(verdict(
            &c,
            &flow(Endpoint::node("n1", node), Endpoint::pod(a, a.addresses[0]))
        )
        .is_allowed());
        assert!(!verdict(
            &c,
            &flow(Endpoint::node("n2", node), Endpoint::pod(a, a.addresses[0]))
        )
        .is_allowed());
        assert!(verdict(
            &c,
            &flow(
                Endpoint::pod(a, a.addresses[0]),
                Endpoint::pod(a, a.addresses[0])
            )
        )
        .is_allowed());
        c.pods.get_mut(&key("x", "b")).unwrap().host_network = true;
        assert!(allowed(&c, "x/b", "y/a", Protocol::Tcp, 80));
        assert!(allowed(&c, "y/a", "x/b", Protocol::Tcp, 80));
    }
}
