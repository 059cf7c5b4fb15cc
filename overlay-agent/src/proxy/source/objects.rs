//! Kubernetes objects (v1 Service, discovery.k8s.io/v1 EndpointSlice) into the proxy's
//! model, as kube-proxy reads them. An invalid object is an error naming the field at
//! fault; an object kube-proxy would not program (headless, ExternalName, another
//! proxy's) is `Skip` with the reason.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::proxy::model::{Endpoint, Protocol, Service, ServiceKey, ServicePort, Slice, SlicePort};

/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The Node label topology hints are matched against.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// kube's default sessionAffinityConfig.clientIP.timeoutSeconds.
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field {field}: {why}")]
pub struct FieldError {
    pub field: String,
    pub why: String,
}

fn field_error(field: impl Into<String>, why: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        why: why.into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Converted<T> {
    Object(T),
    Skip(String),
}

fn key_of(meta: &ObjectMeta) -> Result<ServiceKey, FieldError> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| field_error("metadata.name", "missing"))?;
    Ok(ServiceKey {
        namespace: meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        name,
    })
}

fn protocol(field: String, value: Option<&str>) -> Result<Protocol, FieldError> {
    Protocol::from_api(value).map_err(|why| field_error(field, why))
}

fn port_number(field: String, value: i32) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| field_error(field, format!("{value} is not a port (1-65535)")))
}

fn ip(field: String, value: &str) -> Result<IpAddr, FieldError> {
    value
        .trim()
        .parse()
        .map_err(|_| field_error(field, format!("{value:?} is not an IP address")))
}

pub fn service(object: &KubeService) -> Result<Converted<Service>, FieldError> {
    let key = key_of(&object.metadata)?;
    if let Some(owner) = object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME))
    {
        return Ok(Converted::Skip(format!("{SERVICE_PROXY_NAME}={owner}")));
    }
    let spec = object
        .spec
        .as_ref()
        .ok_or_else(|| field_error("spec", "missing"))?;
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        return Ok(Converted::Skip("type ExternalName".into()));
    }
    let mut cluster_ips = Vec::new();
    let (field, listed) = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ("spec.clusterIPs", ips.clone()),
        _ => ("spec.clusterIP", spec.cluster_ip.iter().cloned().collect()),
    };
    for (i, text) in listed.iter().enumerate() {
        if text == "None" {
            return Ok(Converted::Skip("headless (clusterIP None)".into()));
        }
        if text.is_empty() {
            continue;
        }
        cluster_ips.push(ip(format!("{field}[{i}]"), text)?);
    }
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| ip(format!("spec.externalIPs[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut load_balancer_ips = Vec::new();
    if kind == "LoadBalancer" {
        let ingress = object
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, entry) in ingress.into_iter().flatten().enumerate() {
            // A hostname-only ingress (some cloud LBs) has nothing to program here.
            if let Some(text) = &entry.ip {
                load_balancer_ips.push(ip(format!("status.loadBalancer.ingress[{i}].ip"), text)?);
            }
        }
    }
    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| {
            t.trim().parse().map_err(|_| {
                field_error(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{t:?} is not a CIDR"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let exposes_node_ports = kind == "NodePort" || kind == "LoadBalancer";
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let node_port = match p.node_port {
            Some(n) if exposes_node_ports && n != 0 => {
                Some(port_number(format!("spec.ports[{i}].nodePort"), n)?)
            }
            _ => None,
        };
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(format!("spec.ports[{i}].protocol"), p.protocol.as_deref())?,
            port: port_number(format!("spec.ports[{i}].port"), p.port)?,
            node_port,
        });
    }
    let affinity_seconds = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            Some(match timeout {
                None => DEFAULT_AFFINITY_SECONDS,
                Some(t) if (1..=86_400).contains(&t) => t as u32,
                Some(t) => {
                    return Err(field_error(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is not within 1-86400"),
                    ))
                }
            })
        }
        None | Some("None") => None,
        Some(other) => {
            return Err(field_error(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            ))
        }
    };
    // eTP applies only to traffic that comes from outside: NodePorts, externalIPs, LBs.
    let external_facing = exposes_node_ports || !external_ips.is_empty();
    let external_local =
        external_facing && spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = match spec.health_check_node_port {
        Some(n) if external_local && n != 0 => {
            Some(port_number("spec.healthCheckNodePort".into(), n)?)
        }
        _ => None,
    };
    Ok(Converted::Object(Service {
        key,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        affinity_seconds,
        external_local,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port,
        ipvs_scheduler: ipvs_scheduler(&object.metadata)?,
    }))
}

/// The per-Service IPVS scheduler annotation.
pub const IPVS_SCHEDULER: &str = "calyx.io/ipvs-scheduler";
/// The schedulers it may name: round robin, weighted round robin, least connection,
/// source hashing, Maglev hashing.
pub const IPVS_SCHEDULERS: [&str; 5] = ["rr", "wrr", "lc", "sh", "mh"];

fn ipvs_scheduler(meta: &ObjectMeta) -> Result<Option<String>, FieldError> {
    let Some(value) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(IPVS_SCHEDULER))
    else {
        return Ok(None);
    };
    let value = value.trim();
    if IPVS_SCHEDULERS.contains(&value) {
        Ok(Some(value.to_string()))
    } else {
        Err(field_error(
            format!("metadata.annotations[{IPVS_SCHEDULER:?}]"),
            format!("{value:?} is not one of {}", IPVS_SCHEDULERS.join(", ")),
        ))
    }
}

/// A Node's zone (its `topology.kubernetes.io/zone` label), for topology hints.
pub fn node_zone(meta: &ObjectMeta) -> Option<String> {
    meta.labels.as_ref()?.get(ZONE_LABEL).cloned()
}

/// The slice's own key (namespace, slice name) and its model.
pub fn endpoint_slice(
    object: &EndpointSlice,
) -> Result<Converted<(ServiceKey, Slice)>, FieldError> {
    let key = key_of(&object.metadata)?;
    let labels = object.metadata.labels.as_ref();
    let Some(service_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return Ok(Converted::Skip(format!("no {SERVICE_NAME_LABEL} label")));
    };
    match object.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        "FQDN" => return Ok(Converted::Skip("addressType FQDN".into())),
        other => {
            return Err(field_error(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            ))
        }
    }
    let mut ports = Vec::new();
    for (i, p) in object.ports.iter().flatten().enumerate() {
        // A port without a number is one kube-proxy leaves out too.
        let Some(number) = p.port else { continue };
        ports.push(SlicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(format!("ports[{i}].protocol"), p.protocol.as_deref())?,
            port: port_number(format!("ports[{i}].port"), number)?,
        });
    }
    let mut endpoints = Vec::new();
    for (i, e) in object.endpoints.iter().enumerate() {
        // kube-proxy uses the first address of each endpoint.
        let Some(first) = e.addresses.first() else {
            continue;
        };
        let address = ip(format!("endpoints[{i}].addresses[0]"), first)?;
        let conditions = e.conditions.as_ref();
        let hints = e.hints.as_ref();
        let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(Endpoint {
            address,
            ready,
            serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            node: e.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }
    let trigger_time = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME))
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
        .map(|t| t.as_millisecond() as f64 / 1e3);
    let service = ServiceKey {
        namespace: key.namespace.clone(),
        name: service_name.clone(),
    };
    Ok(Converted::Object((
        key,
        Slice {
            service,
            ports,
            endpoints,
            trigger_time,
        },
    )))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// As `kubectl get svc -o yaml` prints a NodePort Service with two named ports.
    pub const NODEPORT_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  creationTimestamp: "2026-11-30T10:00:00Z"
  name: web
  namespace: shop
  resourceVersion: "4711"
  uid: 6f1c9e0e-8c39-4a8e-9f1a-0d4b9b0c1a11
spec:
  clusterIP: 10.96.0.10
  clusterIPs:
  - 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    nodePort: 30080
    port: 80
    protocol: TCP
    targetPort: web
  - name: metrics
    nodePort: 30090
    port: 9090
    protocol: TCP
    targetPort: 9090
  selector:
    app: web
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 60
  type: NodePort
status:
  loadBalancer: {}
"#;

    pub const SLICE: &str = r#"
addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node1
  targetRef:
    kind: Pod
    name: web-1
    namespace: shop
- addresses:
  - 10.244.2.7
  conditions:
    ready: false
    serving: true
    terminating: true
  hints:
    forNodes:
    - name: node2
    forZones:
    - name: zone-b
  nodeName: node2
  zone: zone-b
kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: "2026-11-30T10:00:01Z"
  generateName: web-
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: web
  name: web-x7k2p
  namespace: shop
ports:
- name: http
  port: 8080
  protocol: TCP
- name: metrics
  port: 9090
  protocol: TCP
"#;

    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn a_kubectl_printed_nodeport_service_converts_whole() {
        let Converted::Object(s) = service(&parse(NODEPORT_SERVICE)).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(s.key.to_string(), "shop/web");
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.affinity_seconds, Some(60));
        assert!(s.external_local && !s.internal_local);
        assert_eq!(s.health_check_node_port, Some(32000));
    }

    #[test]
    fn a_kubectl_printed_slice_keeps_conditions_nodes_and_trigger_time() {
        let Converted::Object((key, s)) = endpoint_slice(&parse(SLICE)).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(key.name, "web-x7k2p");
        assert_eq!(s.service.to_string(), "shop/web");
        assert_eq!(s.ports[0].port, 8080);
        assert!(s.endpoints[0].ready && !s.endpoints[1].ready);
        assert!(s.endpoints[1].serving && s.endpoints[1].terminating);
        assert_eq!(s.endpoints[1].node.as_deref(), Some("node2"));
        assert_eq!(s.endpoints[1].zone_hints, ["zone-b"]);
        assert_eq!(s.endpoints[1].node_hints, ["node2"]);
        assert!(s.endpoints[0].zone_hints.is_empty());
        assert_eq!(s.trigger_time, Some(1_796_032_801.0));
    }

    #[test]
    fn the_ipvs_scheduler_annotation_is_read_and_a_bad_one_names_its_field() {
        let with = |value: &str| {
            NODEPORT_SERVICE.replace(
                "  name: web\n",
                &format!("  name: web\n  annotations:\n    calyx.io/ipvs-scheduler: {value}\n"),
            )
        };
        let Converted::Object(s) = service(&parse(&with("mh"))).unwrap() else {
            panic!("skipped")
        };
        assert_eq!(s.ipvs_scheduler.as_deref(), Some("mh"));
        let Err(e) = service(&parse(&with("fastest"))) else {
            panic!("a bad scheduler was accepted")
        };
        assert_eq!(e.field, "metadata.annotations[\"calyx.io/ipvs-scheduler\"]");
        assert!(
            e.why
                .contains("\"fastest\" is not one of rr, wrr, lc, sh, mh"),
            "{}",
            e.why
        );
    }

    #[test]
    fn headless_external_name_and_foreign_services_are_skipped_with_a_reason() {
        let headless = NODEPORT_SERVICE
            .replace("clusterIP: 10.96.0.10", "clusterIP: None")
            .replace("  - 10.96.0.10", "  - None");
        assert!(
            matches!(service(&parse(&headless)).unwrap(), Converted::Skip(r) if r.contains("headless"))
        );
        let foreign = NODEPORT_SERVICE.replace(
            "  name: web\n",
            "  name: web\n  labels:\n    service.kubernetes.io/service-proxy-name: other\n",
        );
        assert!(
            matches!(service(&parse(&foreign)).unwrap(), Converted::Skip(r) if r.contains("other"))
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        let bad_ip = NODEPORT_SERVICE.replace("  - 10.96.0.10", "  - 10.96.0.300");
        let e = service(&parse(&bad_ip)).unwrap_err();
        assert_eq!(e.field, "spec.clusterIPs[0]");
        let bad_proto = NODEPORT_SERVICE.replacen("protocol: TCP", "protocol: ICMP", 1);
        assert_eq!(
            service(&parse(&bad_proto)).unwrap_err().field,
            "spec.ports[0].protocol"
        );
        let bad_timeout = NODEPORT_SERVICE.replace("timeoutSeconds: 60", "timeoutSeconds: 0");
        assert_eq!(
            service(&parse(&bad_timeout)).unwrap_err().field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );
        let bad_ep = SLICE.replace("10.244.2.7", "not-an-ip");
        assert_eq!(
            endpoint_slice(&parse(&bad_ep)).unwrap_err().field,
            "endpoints[1].addresses[0]"
        );
    }
}
