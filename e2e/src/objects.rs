//! The Pod and Namespace objects the agents' policy controller reads from their
//! --services-dir, written as `kubectl get -o json` prints them.

use serde_json::{json, Value};

/// A namespace with its name label (as the API server sets it) and `labels`.
pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut all = serde_json::Map::new();
    all.insert("kubernetes.io/metadata.name".into(), json!(name));
    for (k, v) in labels {
        all.insert(k.to_string(), json!(v));
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": all}})
}

/// A running pod on `node` with `ips` (status.podIPs), `labels`, and named container
/// ports (name, number, protocol).
pub fn pod_object(
    namespace: &str,
    name: &str,
    node: &str,
    ips: &[String],
    labels: &[(&str, &str)],
    ports: &[(&str, u16, &str)],
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, port, proto)| json!({"name": n, "containerPort": port, "protocol": proto}))
        .collect();
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "main", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips},
    })
}
