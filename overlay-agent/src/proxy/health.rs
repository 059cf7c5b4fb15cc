//! kube-proxy's health-check server for externalTrafficPolicy Local: each such Service's
//! healthCheckNodePort answers 200 with the local endpoint count when this node has
//! one, else 503, so a load balancer sends traffic only to nodes that can serve it.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Router;

use super::model::ServiceKey;

type Shared = Arc<Mutex<(ServiceKey, usize)>>;

struct Server {
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, Server>,
}

impl HealthServers {
    /// Starts, updates and stops servers to match `wanted` (port -> Service, local count).
    pub fn update(&mut self, wanted: &BTreeMap<u16, (ServiceKey, usize)>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                tracing::info!(port, "health check server stopped");
            }
            keep
        });
        for (port, value) in wanted {
            if let Some(server) = self.servers.get(port) {
                *server.state.lock().unwrap_or_else(|e| e.into_inner()) = value.clone();
                continue;
            }
            let state: Shared = Arc::new(Mutex::new(value.clone()));
            let app = Router::new().fallback(answer).with_state(state.clone());
            let port = *port;
            let task = tokio::spawn(async move {
                // One socket for both families (IPV6_V6ONLY off by default on Linux).
                let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => {
                        tracing::info!(port, "health check server started");
                        if let Err(e) = axum::serve(listener, app).await {
                            tracing::warn!(port, error = %e, "health check server stopped");
                        }
                    }
                    Err(e) => {
                        tracing::error!(port, error = %e, "cannot serve the health check port")
                    }
                }
            });
            self.servers.insert(port, Server { state, task });
        }
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

async fn answer(State(state): State<Shared>) -> impl IntoResponse {
    let (service, local) = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local,
        "serviceProxyHealthy": true,
    });
    let status = if local > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
