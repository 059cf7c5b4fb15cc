//! NetworkPolicy objects into the model, validated as the API server validates them:
//! a policy the API would refuse (an unknown operator, a bad CIDR, a port out of range,
//! a name that cannot be a port name) is refused here too, with the field at fault, so
//! the directory source and a misbehaving API alike cannot program half a policy.

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use k8s_openapi::api::core::v1::{Namespace as KubeNamespace, Pod as KubePod};

use super::model::{
    NamedPort, Namespace, Operator, Peer, Pod, PodKey, Policy, PolicyKey, PortRule, PortSpec,
    Protocol, Requirement, Rule, Selector, NAMESPACE_NAME_LABEL,
};

/// What is wrong with a policy: the field (as `kubectl explain` spells it) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct Invalid {
    pub field: String,
    pub why: String,
}

fn invalid(field: &str, why: impl Into<String>) -> Invalid {
    Invalid {
        field: field.to_string(),
        why: why.into(),
    }
}

pub fn protocol(field: &str, text: Option<&str>) -> Result<Protocol, Invalid> {
    Protocol::from_api(text).map_err(|why| invalid(field, why))
}

/// A port name as the API accepts it (IANA_SVC_NAME): 1-15 characters of lower-case
/// letters, digits and '-', at least one letter, no '-' at either end or twice in a row.
pub fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

pub fn selector(field: &str, selector: &LabelSelector) -> Result<Selector, Invalid> {
    let mut out = Selector {
        match_labels: selector.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for (i, r) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        let operator = match r.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(invalid(
                    &format!("{at}.operator"),
                    format!("{other:?} is not In, NotIn, Exists or DoesNotExist"),
                ))
            }
        };
        let values: BTreeSet<String> = r.values.iter().flatten().cloned().collect();
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(invalid(
                    &format!("{at}.values"),
                    "must not be empty for In and NotIn",
                ))
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(invalid(
                    &format!("{at}.values"),
                    "must be empty for Exists and DoesNotExist",
                ))
            }
            _ => {}
        }
        out.match_expressions.push(Requirement {
            key: r.key.clone(),
            operator,
            values,
        });
    }
    Ok(out)
}

fn cidr(field: &str, text: &str) -> Result<IpNetwork, Invalid> {
    let network: IpNetwork = text
        .parse()
        .map_err(|e| invalid(field, format!("{text:?} is not a CIDR: {e}")))?;
    // As the API: the address is the network's (10.0.0.1/8 is refused).
    if network.network() != network.ip() {
        return Err(invalid(
            field,
            format!(
                "{text:?} has host bits set (the network is {}/{})",
                network.network(),
                network.prefix()
            ),
        ));
    }
    Ok(network)
}

fn block(field: &str, b: &IPBlock) -> Result<Peer, Invalid> {
    let outer = cidr(&format!("{field}.cidr"), &b.cidr)?;
    let mut except = Vec::new();
    for (i, text) in b.except.iter().flatten().enumerate() {
        let at = format!("{field}.except[{i}]");
        let inner = cidr(&at, text)?;
        let inside = inner.is_ipv4() == outer.is_ipv4()
            && outer.contains(inner.network())
            && inner.prefix() >= outer.prefix();
        if !inside {
            return Err(invalid(&at, format!("{text} is not inside {}", b.cidr)));
        }
        except.push(inner);
    }
    Ok(Peer::Block {
        cidr: outer,
        except,
    })
}

fn peer(field: &str, p: &NetworkPolicyPeer) -> Result<Peer, Invalid> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => block(&format!("{field}.ipBlock"), b),
        (None, None, None) => Err(invalid(field, "names no pods and no ipBlock")),
        (None, namespaces, pods) => Ok(Peer::Pods {
            namespaces: namespaces
                .as_ref()
                .map(|s| selector(&format!("{field}.namespaceSelector"), s))
                .transpose()?,
            pods: match pods {
                Some(s) => selector(&format!("{field}.podSelector"), s)?,
                None => Selector::everything(),
            },
        }),
        (Some(_), _, _) => Err(invalid(field, "ipBlock cannot be combined with a selector")),
    }
}

fn port(field: &str, p: &NetworkPolicyPort) -> Result<PortRule, Invalid> {
    let protocol = protocol(&format!("{field}.protocol"), p.protocol.as_deref())?;
    let number = |n: i32, at: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| invalid(at, format!("{n} is not a port (1-65535)")))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSpec::Any,
        (None, Some(_)) => return Err(invalid(&format!("{field}.endPort"), "needs a port")),
        (Some(IntOrString::Int(n)), end) => {
            let first = number(*n, &format!("{field}.port"))?;
            let end = match end {
                None => first,
                Some(e) => {
                    let end = number(e, &format!("{field}.endPort"))?;
                    if end < first {
                        return Err(invalid(
                            &format!("{field}.endPort"),
                            format!("{end} is below port {first}"),
                        ));
                    }
                    end
                }
            };
            PortSpec::Range { port: first, end }
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(invalid(
                    &format!("{field}.endPort"),
                    "cannot go with a named port",
                ));
            }
            if let Ok(n) = name.parse::<i32>() {
                PortSpec::Range {
                    port: number(n, &format!("{field}.port"))?,
                    end: number(n, &format!("{field}.port"))?,
                }
            } else if is_port_name(name) {
                PortSpec::Named(name.clone())
            } else {
                return Err(invalid(
                    &format!("{field}.port"),
                    format!("{name:?} is not a valid port name"),
                ));
            }
        }
    };
    Ok(PortRule { protocol, port })
}

fn rule(
    field: &str,
    peers_field: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<Rule, Invalid> {
    let mut out = Rule::default();
    for (i, p) in peers.into_iter().flatten().enumerate() {
        out.peers
            .push(peer(&format!("{field}.{peers_field}[{i}]"), p)?);
    }
    for (i, p) in ports.into_iter().flatten().enumerate() {
        out.ports.push(port(&format!("{field}.ports[{i}]"), p)?);
    }
    Ok(out)
}

/// NetworkPolicies refused so far (each time one is read), for /metrics.
pub static POLICIES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A NetworkPolicy in the model, its policy types defaulted as the API does: Ingress
/// always, Egress when there are egress rules. A refusal is counted.
pub fn policy(np: &NetworkPolicy) -> Result<Policy, Invalid> {
    let converted = convert_policy(np);
    if converted.is_err() {
        POLICIES_REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    converted
}

fn convert_policy(np: &NetworkPolicy) -> Result<Policy, Invalid> {
    let name = np
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "missing"))?;
    let namespace = np
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let spec = np.spec.clone().unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        Some(s) => selector("spec.podSelector", s)?,
        None => Selector::everything(),
    };
    let mut ingress_rules = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress_rules.push(rule(
            &format!("spec.ingress[{i}]"),
            "from",
            r.from.as_ref(),
            r.ports.as_ref(),
        )?);
    }
    let mut egress_rules = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress_rules.push(rule(
            &format!("spec.egress[{i}]"),
            "to",
            r.to.as_ref(),
            r.ports.as_ref(),
        )?);
    }
    let (ingress, egress) = match &spec.policy_types {
        None => (true, !egress_rules.is_empty()),
        Some(types) => {
            let mut seen = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => seen.0 = true,
                    "Egress" => seen.1 = true,
                    other => {
                        return Err(invalid(
                            &format!("spec.policyTypes[{i}]"),
                            format!("{other:?} is not Ingress or Egress"),
                        ))
                    }
                }
            }
            seen
        }
    };
    Ok(Policy {
        key: PolicyKey { namespace, name },
        pod_selector,
        ingress: ingress.then_some(ingress_rules),
        egress: egress.then_some(egress_rules),
    })
}

/// A Pod in the model; None for one policies need not know (not scheduled yet, or
/// finished: its address may already be another pod's).
pub fn pod(p: &KubePod) -> Result<Option<Pod>, Invalid> {
    let name = p
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "missing"))?;
    let namespace = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let Some(node) = spec.node_name.clone() else {
        return Ok(None);
    };
    let mut addresses = Vec::new();
    for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
        let address = ip.ip.parse().map_err(|_| {
            invalid(
                &format!("status.podIPs[{i}].ip"),
                format!("{:?} is not an address", ip.ip),
            )
        })?;
        addresses.push(address);
    }
    let mut named_ports = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, port) in container.ports.iter().flatten().enumerate() {
            let Some(port_name) = &port.name else {
                continue;
            };
            let at = format!("spec.containers[{c}].ports[{i}]");
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    invalid(
                        &format!("{at}.containerPort"),
                        format!("{} is not a port", port.container_port),
                    )
                })?;
            named_ports.push(NamedPort {
                name: port_name.clone(),
                protocol: protocol(&format!("{at}.protocol"), port.protocol.as_deref())?,
                port: number,
            });
        }
    }
    Ok(Some(Pod {
        key: PodKey { namespace, name },
        labels: p.metadata.labels.clone().unwrap_or_default(),
        node,
        addresses,
        named_ports,
        host_network: spec.host_network.unwrap_or(false),
    }))
}

/// A Namespace in the model, with the name label the API server sets on every one.
pub fn namespace(ns: &KubeNamespace) -> Result<Namespace, Invalid> {
    let name = ns
        .metadata
        .name
        .clone()
        .ok_or_else(|| invalid("metadata.name", "missing"))?;
    let mut labels = ns.metadata.labels.clone().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    Ok(Namespace { name, labels })
}

/// One object of a policy kind, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Pod(Pod),
    Namespace(Namespace),
    Policy(Policy),
}

/// Which object an `Object` is: a later one of the same key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKey {
    Pod(PodKey),
    Namespace(String),
    Policy(PolicyKey),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Pod(p) => ObjectKey::Pod(p.key.clone()),
            Object::Namespace(n) => ObjectKey::Namespace(n.name.clone()),
            Object::Policy(p) => ObjectKey::Policy(p.key.clone()),
        }
    }
}

/// A Pod, Namespace or NetworkPolicy as `kubectl get -o json` prints it; Ok(None) for
/// any other kind, and for pods policies never see (finished ones). Err names the kind,
/// the object and the field at fault.
pub fn object(value: serde_json::Value) -> Result<Option<Object>, String> {
    let api = value["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let typed = |e: serde_path_to_error::Error<serde_json::Error>| {
        format!("{kind} {name}: field {}: {}", e.path(), e.inner())
    };
    let invalid = |e: Invalid| format!("{kind} {name}: {e}");
    Ok(match (api.as_str(), kind.as_str()) {
        ("v1", "Pod") => {
            let p: KubePod = serde_path_to_error::deserialize(value).map_err(typed)?;
            pod(&p).map_err(invalid)?.map(Object::Pod)
        }
        ("v1", "Namespace") => {
            let ns: KubeNamespace = serde_path_to_error::deserialize(value).map_err(typed)?;
            Some(Object::Namespace(namespace(&ns).map_err(invalid)?))
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let np: NetworkPolicy = serde_path_to_error::deserialize(value).map_err(typed)?;
            Some(Object::Policy(policy(&np).map_err(invalid)?))
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Policy, Invalid> {
        let np: NetworkPolicy = serde_saphyr::from_str(yaml).expect("a NetworkPolicy");
        policy(&np)
    }

    const HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web\n  namespace: x\nspec:\n";

    #[test]
    fn policy_types_default_as_the_api_does() {
        let p = parse(&format!("{HEAD}  podSelector: {{}}\n")).unwrap();
        assert_eq!((p.ingress, p.egress), (Some(vec![]), None));
        let p = parse(&format!("{HEAD}  podSelector: {{}}\n  egress:\n  - {{}}\n")).unwrap();
        assert_eq!(
            p.ingress,
            Some(vec![]),
            "egress rules alone isolate ingress too"
        );
        assert_eq!(p.egress, Some(vec![Rule::default()]));
        let p = parse(&format!(
            "{HEAD}  podSelector: {{}}\n  policyTypes: [Egress]\n"
        ))
        .unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
    }

    #[test]
    fn ports_default_to_tcp_and_names_and_ranges_are_kept() {
        let p = parse(&format!(
            "{HEAD}  podSelector: {{}}\n  ingress:\n  - ports:\n    - port: 80\n    - protocol: UDP\n    - port: serve-80\n    - port: 8000\n      endPort: 8010\n    - {{}}\n"
        ))
        .unwrap();
        let ports = &p.ingress.unwrap()[0].ports;
        let tcp = |port| PortRule {
            protocol: Protocol::Tcp,
            port,
        };
        assert_eq!(
            ports,
            &vec![
                tcp(PortSpec::Range { port: 80, end: 80 }),
                PortRule {
                    protocol: Protocol::Udp,
                    port: PortSpec::Any
                },
                tcp(PortSpec::Named("serve-80".into())),
                tcp(PortSpec::Range {
                    port: 8000,
                    end: 8010
                }),
                tcp(PortSpec::Any),
            ]
        );
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases = [
            ("  podSelector:\n    matchExpressions:\n    - {key: a, operator: Maybe}\n", "spec.podSelector.matchExpressions[0].operator"),
            ("  podSelector:\n    matchExpressions:\n    - {key: a, operator: In}\n", "spec.podSelector.matchExpressions[0].values"),
            ("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0/8}\n", "spec.ingress[0].from[0].ipBlock.cidr"),
            ("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.1/8}\n", "spec.ingress[0].from[0].ipBlock.cidr"),
            ("  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}\n", "spec.ingress[0].from[0].ipBlock.except[0]"),
            ("  egress:\n  - ports:\n    - port: 70000\n", "spec.egress[0].ports[0].port"),
            ("  egress:\n  - ports:\n    - port: 0\n", "spec.egress[0].ports[0].port"),
            ("  egress:\n  - ports:\n    - port: Not_A_Name\n", "spec.egress[0].ports[0].port"),
            ("  egress:\n  - ports:\n    - port: 90\n      endPort: 80\n", "spec.egress[0].ports[0].endPort"),
            ("  egress:\n  - ports:\n    - protocol: ICMP\n", "spec.egress[0].ports[0].protocol"),
            ("  policyTypes: [Sideways]\n", "spec.policyTypes[0]"),
            ("  ingress:\n  - from:\n    - {}\n", "spec.ingress[0].from[0]"),
        ];
        for (spec, field) in cases {
            let error = parse(&format!("{HEAD}{spec}")).expect_err(spec);
            assert_eq!(error.field, field, "{spec}: {error}");
        }
    }

    #[test]
    fn pods_bring_their_named_ports_and_finished_ones_are_left_out() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {pod: a}}\nspec:\n  nodeName: n1\n  containers:\n  - name: c\n    ports:\n    - {name: serve-80-udp, containerPort: 80, protocol: UDP}\n    - {containerPort: 81}\nstatus:\n  podIPs: [{ip: 10.244.1.1}, {ip: 'fd00:10:244:1::1'}]\n";
        let kube: KubePod = serde_saphyr::from_str(yaml).unwrap();
        let p = pod(&kube).unwrap().unwrap();
        assert_eq!(p.addresses.len(), 2);
        assert_eq!(p.named_port("serve-80-udp", Protocol::Udp), Some(80));
        assert_eq!(p.named_port("serve-80-udp", Protocol::Tcp), None);
        let mut done = kube.clone();
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(pod(&done).unwrap(), None);
        let mut bad = kube;
        bad.status.as_mut().unwrap().pod_ips.as_mut().unwrap()[1].ip = "nope".into();
        assert_eq!(pod(&bad).unwrap_err().field, "status.podIPs[1].ip");
    }

    #[test]
    fn port_names_follow_iana_svc_name() {
        for ok in ["http", "serve-80-tcp", "a", "h2c"] {
            assert!(is_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "80",
            "-http",
            "http-",
            "ht--tp",
            "HTTP",
            "a-very-long-port-name",
            "dns_tcp",
        ] {
            assert!(!is_port_name(bad), "{bad}");
        }
    }
}
