//! NetworkPolicy's inputs as the policy controller sees them: pods, namespaces and
//! policies with typed rules, no Kubernetes types. A policy here is already valid
//! (`parse` refuses the rest) and its policy types are resolved as the API defaults
//! them, so the rest of the controller never re-derives them.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use imbl::OrdMap;

use ipnetwork::IpNetwork;

pub type Labels = BTreeMap<String, String>;

/// The label every namespace carries (the API server sets it to the name).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub use crate::protocol::Protocol;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // As the API's selectors: a pod without the key is "not in".
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector; the empty one selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Selector {
    pub match_labels: Labels,
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A container port with a name, which a policy may refer to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub key: PodKey,
    pub labels: Labels,
    pub node: String,
    /// Its addresses (from the IPAM store at ADD, or status.podIPs).
    pub addresses: Vec<IpAddr>,
    pub named_ports: Vec<NamedPort>,
    /// A host-network pod is never selected: its traffic is the node's.
    pub host_network: bool,
}

impl Pod {
    /// The number `name` means on this pod for `protocol`, if it has such a port.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// Which pods a peer names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces `namespaces` names; `namespaces: None`
    /// is the policy's own namespace (a podSelector alone).
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    /// Addresses inside `cidr` but outside every `except`.
    Block {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortSpec {
    /// Every port of the protocol.
    Any,
    /// `port` through `end` inclusive (a single port: both the same).
    Range { port: u16, end: u16 },
    /// A container port name, resolved on each destination pod.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRule {
    pub protocol: Protocol,
    pub port: PortSpec,
}

/// One ingress or egress rule: traffic from (to) any of `peers` on any of `ports`.
/// Empty `peers`: every source (destination); empty `ports`: every port.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A NetworkPolicy. `ingress`/`egress` is None when the policy does not isolate that
/// direction, Some(rules) when it does (Some(empty): nothing is allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub key: PolicyKey,
    pub pod_selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Whether this policy selects `pod` (host-network pods never are).
    pub fn selects(&self, pod: &Pod) -> bool {
        !pod.host_network
            && pod.key.namespace == self.key.namespace
            && self.pod_selector.matches(&pod.labels)
    }
}

/// Everything the policy controller knows. Persistent maps: a copy shares what it
/// does not change, so each change published is a small patch, not 10,000 pods cloned.
/// Keys sort by namespace first, so one namespace's pods or policies are one range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cluster {
    pub pods: OrdMap<PodKey, Pod>,
    pub namespaces: OrdMap<String, Namespace>,
    pub policies: OrdMap<PolicyKey, Policy>,
}

impl Cluster {
    /// Takes in one object (a later one of the same name replaces the earlier).
    pub fn add(&mut self, object: super::parse::Object) {
        use super::parse::Object;
        match object {
            Object::Pod(pod) => {
                self.pods.insert(pod.key.clone(), pod);
            }
            Object::Namespace(ns) => {
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Object::Policy(policy) => {
                self.policies.insert(policy.key.clone(), policy);
            }
        }
    }

    /// Takes out one object, if it is there.
    pub fn remove(&mut self, key: &super::parse::ObjectKey) {
        use super::parse::ObjectKey;
        match key {
            ObjectKey::Pod(k) => {
                self.pods.remove(k);
            }
            ObjectKey::Namespace(name) => {
                self.namespaces.remove(name);
            }
            ObjectKey::Policy(k) => {
                self.policies.remove(k);
            }
        }
    }

    /// The cluster with each pod's addresses from the IPAM store (by namespace and
    /// name) beside those the API reported: a new pod's are known at ADD, seconds
    /// before status.podIPs.
    pub fn with_allocations(&self, allocated: &BTreeMap<(String, String), Vec<IpAddr>>) -> Cluster {
        let mut out = self.clone();
        for ((namespace, name), ips) in allocated {
            let key = PodKey {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let missing: Vec<IpAddr> = match out.pods.get(&key) {
                Some(pod) if !pod.host_network => ips
                    .iter()
                    .filter(|ip| !pod.addresses.contains(ip))
                    .copied()
                    .collect(),
                _ => continue,
            };
            // Only a pod that gains an address is copied.
            if !missing.is_empty() {
                if let Some(pod) = out.pods.get_mut(&key) {
                    pod.addresses.extend(missing);
                }
            }
        }
        out
    }

    /// The pods of one namespace.
    pub fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        let first = PodKey {
            namespace: namespace.to_string(),
            name: String::new(),
        };
        namespace_range(&self.pods, first, |k| &k.namespace, namespace)
    }

    /// The policies of one namespace.
    pub fn policies_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Policy> + 'a {
        let first = PolicyKey {
            namespace: namespace.to_string(),
            name: String::new(),
        };
        namespace_range(&self.policies, first, |k| &k.namespace, namespace)
    }

    /// The namespaces with a policy: where a new pod could be isolated.
    pub fn namespaces_with_policies(&self) -> BTreeSet<String> {
        self.policies.keys().map(|k| k.namespace.clone()).collect()
    }

    /// A namespace's labels; one not seen yet has only its name label (as the API
    /// server would set it), so a pod seen before its namespace is judged alike.
    pub fn namespace_labels(&self, name: &str) -> Cow<'_, Labels> {
        match self.namespaces.get(name) {
            Some(ns) => Cow::Borrowed(&ns.labels),
            None => Cow::Owned([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())].into()),
        }
    }

    /// Whether `pod` is one of `peer`'s pods, for a policy in `policy_namespace`.
    pub fn peer_has_pod(&self, peer: &Peer, policy_namespace: &str, pod: &Pod) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let in_namespace = match namespaces {
                    None => pod.key.namespace == policy_namespace,
                    Some(selector) => selector.matches(&self.namespace_labels(&pod.key.namespace)),
                };
                !pod.host_network && in_namespace && pods.matches(&pod.labels)
            }
            Peer::Block { .. } => false,
        }
    }

    /// The policies that select `pod` and isolate it in `direction`.
    pub fn isolating<'a>(
        &'a self,
        pod: &'a Pod,
        direction: Direction,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        // A policy selects pods of its own namespace only.
        self.policies_in(&pod.key.namespace)
            .filter(move |p| p.rules(direction).is_some() && p.selects(pod))
    }
}

/// The values of `map` whose keys are in `namespace`, from `first` (the smallest key
/// of it): keys sort by namespace first, so they are one range.
fn namespace_range<'a, K: Ord + Clone, V>(
    map: &'a OrdMap<K, V>,
    first: K,
    namespace_of: impl Fn(&K) -> &str + 'a,
    namespace: &'a str,
) -> impl Iterator<Item = &'a V> + 'a {
    map.range(first..)
        .take_while(move |(k, _)| namespace_of(k) == namespace)
        .map(|(_, v)| v)
}

/// Whether `ip` is inside `block` and outside its exceptions.
pub fn block_contains(cidr: &IpNetwork, except: &[IpNetwork], ip: IpAddr) -> bool {
    cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
}
