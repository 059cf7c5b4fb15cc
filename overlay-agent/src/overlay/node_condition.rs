//! Clears the Node's NetworkUnavailable condition once the overlay is up, as Calico
//! and flannel do: on clouds whose route controller sets it, a node keeps its
//! `node.kubernetes.io/network-unavailable` taint (no pods scheduled) until the
//! network plugin says otherwise. Without a Kubernetes API (the lab, a node cut off
//! from it) this is said once in the log and nothing else changes: pods are networked
//! regardless.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

/// The strategic-merge patch of `status.conditions` (merged by `type`) that marks
/// the network available; `now` is an RFC 3339 time.
pub fn network_available_patch(now: &str) -> Value {
    json!({
        "status": {
            "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "CalyxIsUp",
                "message": "calyx-agent is running on this node",
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]
        }
    })
}

/// Patches the condition, retrying (with a backoff up to a minute) until it is done.
pub async fn mark_network_available(client: Client, node: String) {
    let nodes: Api<Node> = Api::all(client);
    let mut wait = Duration::from_millis(500);
    let mut failures = 0u32;
    loop {
        let now = jiff::Timestamp::now().to_string();
        let patch = Patch::Strategic(network_available_patch(&now));
        match nodes
            .patch_status(&node, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                tracing::info!(%node, "node condition NetworkUnavailable=False set");
                return;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(%node, error = %e, failures, "cannot clear the node's NetworkUnavailable condition yet; retrying");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Starts clearing the condition where a Kubernetes API is configured.
pub fn spawn(kubeconfig: Option<PathBuf>, node: String) {
    tokio::spawn(async move {
        match crate::kube_api::client(kubeconfig.as_deref()).await {
            Ok(client) => mark_network_available(client, node).await,
            Err(e) => tracing::info!(
                error = format!("{e:#}"),
                "no Kubernetes API configured: the node's NetworkUnavailable condition is \
                 left as it is; pods are networked regardless"
            ),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    #[tokio::test]
    async fn the_condition_is_patched_on_the_nodes_status_and_retried_after_a_failure() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let task = tokio::spawn(mark_network_available(client, "node-1".into()));

        for attempt in 0..2 {
            let (request, respond) = handle.next_request().await.expect("a request");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(request.uri().path(), "/api/v1/nodes/node-1/status");
            assert_eq!(
                request.headers()["content-type"],
                "application/strategic-merge-patch+json"
            );
            let body = request.into_body().collect_bytes().await.unwrap();
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let condition = &patch["status"]["conditions"][0];
            assert_eq!(condition["type"], "NetworkUnavailable");
            assert_eq!(condition["status"], "False");
            assert_eq!(condition["reason"], "CalyxIsUp");
            if attempt == 0 {
                // The API server is not there yet (or RBAC is missing): try again.
                respond.send_response(
                    Response::builder()
                        .status(503)
                        .body(Body::from(b"{}".to_vec()))
                        .unwrap(),
                );
            } else {
                let node = json!({"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": "node-1"}});
                respond.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&node).unwrap()))
                        .unwrap(),
                );
            }
        }
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("done once the patch is accepted")
            .unwrap();
    }
}
