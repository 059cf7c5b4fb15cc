//! The Kubernetes API, one watch per kind, for every controller that wants it: the
//! proxy's Services, EndpointSlices and this node's Node (its zone label, for topology
//! hints); the policy controller's Pods, Namespaces and NetworkPolicies. Each stream
//! lists, then watches; a watch that ends or fails (410 Gone included) is resumed or
//! re-listed by kube's watcher, with backoff, never fatally. A controller's snapshot is
//! published once all of its streams have listed, and again when one of them changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use imbl::OrdMap;
use k8s_openapi::api::core::v1::{
    Namespace as KubeNamespace, Node, Pod as KubePod, Service as KubeService,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource, ResourceExt};

use super::Publisher;
use crate::policy::model::{Cluster, Namespace, Pod, Policy};
use crate::policy::parse as policy_parse;
use crate::proxy::model::{ProxyState, Service, ServiceKey, Slice};
use crate::proxy::source::objects::{self, Converted};

/// Who takes the API's objects: the proxy, the policy controller, or both.
pub struct Publishers {
    pub proxy: Option<Publisher<ProxyState>>,
    pub policy: Option<Publisher<Cluster>>,
}

/// Connects (in-cluster config, or `kubeconfig`) and follows the API from a task of
/// its own; retries the connection until it works.
pub fn spawn(kubeconfig: Option<PathBuf>, node: String, publishers: Publishers) {
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(500);
        let mut said = false;
        let client = loop {
            match crate::kube_api::client(kubeconfig.as_deref()).await {
                Ok(client) => break client,
                Err(e) if !said => {
                    // Said once: until the API answers there are no Services to proxy
                    // and no policies to enforce, and pods are networked regardless.
                    said = true;
                    tracing::warn!(
                        error = format!("{e:#}"),
                        proxy = publishers.proxy.is_some(),
                        network_policy = publishers.policy.is_some(),
                        "no Kubernetes API: nothing to proxy or enforce until it answers; retrying"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(e) => {
                    tracing::debug!(
                        error = format!("{e:#}"),
                        retry_in_s = wait.as_secs_f64(),
                        "no Kubernetes API yet"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        };
        follow(client, &node, publishers).await;
    });
}

/// What one watcher has seen, converted, keyed by the object's namespace and name.
struct Followed<T> {
    objects: OrdMap<ServiceKey, Arc<T>>,
    /// Objects of a listing in progress (replacing `objects` when it is done).
    listing: Option<OrdMap<ServiceKey, Arc<T>>>,
    listed: bool,
}

impl<T> Default for Followed<T> {
    fn default() -> Self {
        Followed {
            objects: OrdMap::new(),
            listing: None,
            listed: false,
        }
    }
}

impl<T> Followed<T> {
    /// One watcher event; `convert` gives None for an object to leave out (skipped or
    /// invalid: an update that makes an object so removes it).
    fn event<K: Resource>(&mut self, event: Event<K>, convert: impl Fn(&K) -> Option<T>) {
        match event {
            Event::Init => self.listing = Some(OrdMap::new()),
            Event::InitApply(object) => {
                if let Some(value) = convert(&object) {
                    self.listing
                        .get_or_insert_with(OrdMap::new)
                        .insert(key_of(&object), Arc::new(value));
                }
            }
            Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.listed = true;
            }
            Event::Apply(object) => {
                let key = key_of(&object);
                match convert(&object) {
                    Some(value) => self.objects.insert(key, Arc::new(value)),
                    None => self.objects.remove(&key),
                };
            }
            Event::Delete(object) => {
                self.objects.remove(&key_of(&object));
            }
        }
    }
}

/// What the watchers have seen, converted.
#[derive(Default)]
struct Mirror {
    services: Followed<Service>,
    slices: Followed<Slice>,
    /// This node (one object at most): its zone.
    node: Followed<Option<String>>,
    pods: Followed<Pod>,
    namespaces: Followed<Namespace>,
    policies: Followed<Policy>,
}

fn key_of<K: Resource>(object: &K) -> ServiceKey {
    ServiceKey {
        namespace: object.namespace().unwrap_or_else(|| "default".into()),
        name: object.name_any(),
    }
}

impl Mirror {
    fn state(&self) -> Option<ProxyState> {
        let listed = self.services.listed && self.slices.listed && self.node.listed;
        listed.then(|| ProxyState {
            services: self.services.objects.clone(),
            slices: self.slices.objects.clone(),
            node_zone: self
                .node
                .objects
                .values()
                .next()
                .and_then(|z| (**z).clone()),
        })
    }

    fn cluster(&self) -> Option<Cluster> {
        let listed = self.pods.listed && self.namespaces.listed && self.policies.listed;
        listed.then(|| Cluster {
            pods: self
                .pods
                .objects
                .values()
                .map(|p| (p.key.clone(), (**p).clone()))
                .collect(),
            namespaces: self
                .namespaces
                .objects
                .values()
                .map(|n| (n.name.clone(), (**n).clone()))
                .collect(),
            policies: self
                .policies
                .objects
                .values()
                .map(|p| (p.key.clone(), (**p).clone()))
                .collect(),
        })
    }
}

/// A policy object the API holds but the model refuses is left out, and said so.
fn convert_policy_object<K: Resource, T>(
    kind: &str,
    object: &K,
    convert: impl Fn(&K) -> Result<Option<T>, policy_parse::Invalid>,
) -> Option<T> {
    match convert(object) {
        Ok(converted) => converted,
        Err(e) => {
            tracing::warn!(kind, object = %key_of(object), error = %e, "refused: not enforced");
            None
        }
    }
}

fn convert_service(object: &KubeService) -> Option<Service> {
    match objects::service(object) {
        Ok(Converted::Object(service)) => Some(service),
        Ok(Converted::Skip(why)) => {
            tracing::debug!(service = %key_of(object), why, "not proxied");
            None
        }
        Err(e) => {
            tracing::warn!(service = %key_of(object), error = %e, "Service skipped");
            None
        }
    }
}

/// The slice (its own key is the object's, as for every object here).
fn convert_slice(object: &EndpointSlice) -> Option<Slice> {
    match objects::endpoint_slice(object) {
        Ok(Converted::Object((_, slice))) => Some(slice),
        Ok(Converted::Skip(why)) => {
            tracing::debug!(slice = %key_of(object), why, "not used");
            None
        }
        Err(e) => {
            tracing::warn!(slice = %key_of(object), error = %e, "EndpointSlice skipped");
            None
        }
    }
}

enum Update {
    Service(Box<Result<Event<KubeService>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
    Node(Box<Result<Event<Node>, watcher::Error>>),
    Pod(Box<Result<Event<KubePod>, watcher::Error>>),
    Namespace(Box<Result<Event<KubeNamespace>, watcher::Error>>),
    Policy(Box<Result<Event<NetworkPolicy>, watcher::Error>>),
}

type Updates = std::pin::Pin<Box<dyn Stream<Item = Update> + Send>>;

/// The policy controller's streams: every Pod, Namespace and NetworkPolicy.
fn policy_streams(client: Client) -> Vec<Updates> {
    let pods = watcher::watcher(
        Api::<KubePod>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Pod(Box::new(e)));
    let namespaces = watcher::watcher(
        Api::<KubeNamespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Namespace(Box::new(e)));
    let policies = watcher::watcher(
        Api::<NetworkPolicy>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| Update::Policy(Box::new(e)));
    vec![Box::pin(pods), Box::pin(namespaces), Box::pin(policies)]
}

fn proxy_streams(client: Client, node: &str) -> impl Stream<Item = Update> + Send {
    // kube-proxy's selectors: another proxy's Services and headless ones are not read.
    let selector = format!(
        "!{},!service.kubernetes.io/headless",
        objects::SERVICE_PROXY_NAME
    );
    let services = watcher::watcher(
        Api::<KubeService>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff()
    .map(|e| Update::Service(Box::new(e)));
    let slices = watcher::watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff()
    .map(|e| Update::Slice(Box::new(e)));
    // Only this node, for its labels (kube-proxy watches its own Node too).
    let node = watcher::watcher(
        Api::<Node>::all(client),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
    )
    .default_backoff()
    .map(|e| Update::Node(Box::new(e)));
    futures::stream::select(futures::stream::select(services, slices), node)
}

/// Which controller an update concerns.
#[derive(Debug, Clone, Copy, Default)]
struct Changed {
    proxy: bool,
    policy: bool,
}

impl std::ops::BitOrAssign for Changed {
    fn bitor_assign(&mut self, other: Changed) {
        self.proxy |= other.proxy;
        self.policy |= other.policy;
    }
}

/// Follows every stream the publishers want until both controllers are gone.
pub async fn follow(client: Client, node: &str, publishers: Publishers) {
    let mut streams: Vec<Updates> = Vec::new();
    if publishers.proxy.is_some() {
        streams.push(Box::pin(proxy_streams(client.clone(), node)));
    }
    if publishers.policy.is_some() {
        streams.extend(policy_streams(client));
    }
    let mut updates = futures::stream::select_all(streams);
    let mut mirror = Mirror::default();
    while let Some(update) = updates.next().await {
        let mut changed = apply(&mut mirror, update);
        // Take what else is ready now, so a burst is published once.
        while let Some(Some(update)) = futures::FutureExt::now_or_never(updates.next()) {
            changed |= apply(&mut mirror, update);
        }
        let mut alive = false;
        if let Some(proxy) = &publishers.proxy {
            alive |= match mirror.state().filter(|_| changed.proxy) {
                Some(state) => proxy.publish(Arc::new(state)),
                None => true,
            };
        }
        if let Some(policy) = &publishers.policy {
            alive |= match mirror.cluster().filter(|_| changed.policy) {
                Some(cluster) => policy.publish(Arc::new(cluster)),
                None => true,
            };
        }
        if !alive {
            return;
        }
    }
}

/// One watcher event into `followed`; whether it changed what is published (events of
/// a listing in progress do not, its end does).
fn take<K: Resource, T>(
    followed: &mut Followed<T>,
    what: &str,
    result: Result<Event<K>, watcher::Error>,
    convert: impl Fn(&K) -> Option<T>,
) -> bool {
    match result {
        Ok(event) => {
            let listing = matches!(event, Event::Init | Event::InitApply(_));
            followed.event(event, convert);
            !listing
        }
        Err(e) => {
            tracing::warn!(error = %e, "Kubernetes watch of {what} failed; retrying with backoff");
            false
        }
    }
}

fn apply(mirror: &mut Mirror, update: Update) -> Changed {
    let proxy = |changed: bool| Changed {
        proxy: changed,
        policy: false,
    };
    let policy = |changed: bool| Changed {
        proxy: false,
        policy: changed,
    };
    match update {
        Update::Pod(boxed) => policy(take(&mut mirror.pods, "Pods", *boxed, |p| {
            convert_policy_object("Pod", p, policy_parse::pod)
        })),
        Update::Namespace(boxed) => {
            policy(take(&mut mirror.namespaces, "Namespaces", *boxed, |n| {
                convert_policy_object("Namespace", n, |n| policy_parse::namespace(n).map(Some))
            }))
        }
        Update::Policy(boxed) => {
            policy(take(&mut mirror.policies, "NetworkPolicies", *boxed, |p| {
                convert_policy_object("NetworkPolicy", p, |p| policy_parse::policy(p).map(Some))
            }))
        }
        Update::Service(boxed) => proxy(take(
            &mut mirror.services,
            "Services",
            *boxed,
            convert_service,
        )),
        Update::Slice(boxed) => proxy(take(
            &mut mirror.slices,
            "EndpointSlices",
            *boxed,
            convert_slice,
        )),
        Update::Node(boxed) => proxy(take(&mut mirror.node, "this Node", *boxed, |n: &Node| {
            Some(objects::node_zone(&n.metadata))
        })),
    }
}

#[cfg(test)]
mod tests {
    //! The watchers against kube's test service (tower-test's mock), playing an API
    //! server: lists, watches that end, a 410 Gone, and the initial-list gate.
    use super::*;
    use crate::runtime::Triggers;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};
    use tower_test::mock;

    fn service(name: &str, ip: &str, rv: u32) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv.to_string()},
               "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
    }

    fn slice(name: &str, ip: &str) -> Value {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
               "metadata": {"name": format!("{name}-x"), "namespace": "shop", "resourceVersion": "1",
                            "labels": {"kubernetes.io/service-name": name}},
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}]})
    }

    fn node(zone: &str, rv: u32) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n1", "resourceVersion": rv.to_string(),
                            "labels": {"topology.kubernetes.io/zone": zone}}})
    }

    fn list(kind: &str, rv: u32, items: Vec<Value>) -> Response<Body> {
        let body = json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": rv.to_string()}, "items": items});
        Response::builder()
            .body(Body::from(body.to_string().into_bytes()))
            .unwrap()
    }

    fn events(events: &[(&str, Value)]) -> Response<Body> {
        let mut body = String::new();
        for (kind, object) in events {
            body.push_str(&json!({"type": kind, "object": object}).to_string());
            body.push('\n');
        }
        Response::builder()
            .body(Body::from(body.into_bytes()))
            .unwrap()
    }

    fn gone() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version", "reason": "Expired", "code": 410})
    }

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    type Parked = Vec<(String, mock::SendResponse<Response<Body>>)>;

    /// The next request for `resource` ("services" or "endpointslices"); requests for
    /// the other wait unanswered in `parked` (a watch that stays open) until asked for.
    async fn next(
        handle: &mut Handle,
        resource: &str,
        parked: &mut Parked,
    ) -> (String, mock::SendResponse<Response<Body>>) {
        let wanted = format!("/{resource}?");
        if let Some(at) = parked.iter().position(|(uri, _)| uri.contains(&wanted)) {
            return parked.remove(at);
        }
        loop {
            let (request, respond) =
                tokio::time::timeout(std::time::Duration::from_secs(20), handle.next_request())
                    .await
                    .expect("the watcher asks again")
                    .expect("a request");
            let uri = request.uri().to_string();
            if uri.contains(&wanted) {
                return (uri, respond);
            }
            parked.push((uri, respond));
        }
    }

    async fn snapshot_where<T>(
        snapshot: &mut crate::source::Snapshot<T>,
        what: &str,
        ok: impl Fn(&T) -> bool,
    ) -> Arc<T> {
        tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                if let Some(state) = snapshot.borrow_and_update().clone() {
                    if ok(&state) {
                        return state;
                    }
                }
                snapshot.changed().await.expect("publisher alive");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no snapshot with {what}"))
    }

    fn names(state: &ProxyState) -> Vec<&str> {
        state.services.keys().map(|k| k.name.as_str()).collect()
    }

    #[tokio::test]
    async fn lists_gate_then_watches_resume_and_a_410_relists() {
        let (service_mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service_mock, "default");
        let (triggers, _rx) = Triggers::channel();
        let (publisher, mut snapshot) = Publisher::new(triggers);
        let publishers = Publishers {
            proxy: Some(publisher),
            policy: None,
        };
        tokio::spawn(async move { follow(client, "n1", publishers).await });
        let mut parked = Parked::new();

        // Services list; no snapshot until the slices are listed too.
        let (uri, respond) = next(&mut handle, "services", &mut parked).await;
        assert!(!uri.contains("watch=true"), "{uri}");
        assert!(
            uri.contains("labelSelector="),
            "kube-proxy's selectors: {uri}"
        );
        respond.send_response(list(
            "ServiceList",
            1,
            vec![service("web", "10.96.0.10", 1)],
        ));
        let (_, watch1) = next(&mut handle, "services", &mut parked).await;
        assert!(
            snapshot.borrow().is_none(),
            "published before both lists were in"
        );
        let (uri, respond) = next(&mut handle, "endpointslices", &mut parked).await;
        assert!(!uri.contains("watch=true"), "{uri}");
        respond.send_response(list(
            "EndpointSliceList",
            1,
            vec![slice("web", "10.244.1.2")],
        ));
        // This node only, by name; its listing opens the gate.
        let (uri, respond) = next(&mut handle, "nodes", &mut parked).await;
        assert!(uri.contains("fieldSelector=metadata.name%3Dn1"), "{uri}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            snapshot.borrow().is_none(),
            "published before the Node was listed"
        );
        respond.send_response(list("NodeList", 1, vec![node("a", 1)]));
        let state = snapshot_where(&mut snapshot, "the listed objects", |s| {
            !s.slices.is_empty()
        })
        .await;
        assert_eq!(names(&state), ["web"]);
        assert_eq!(state.node_zone.as_deref(), Some("a"));
        // The node's label changes: a new snapshot with the new zone.
        let (_, node_watch) = next(&mut handle, "nodes", &mut parked).await;
        node_watch.send_response(events(&[("MODIFIED", node("b", 2))]));
        snapshot_where(&mut snapshot, "zone b", |s| {
            s.node_zone.as_deref() == Some("b")
        })
        .await;

        // A watch that adds and modifies, then ends (a dropped connection).
        watch1.send_response(events(&[
            ("ADDED", service("db", "10.96.0.20", 2)),
            ("MODIFIED", service("web", "10.96.0.11", 3)),
        ]));
        let state = snapshot_where(&mut snapshot, "db and the new web", |s| {
            s.services.len() == 2
        })
        .await;
        assert_eq!(
            state.services[&ServiceKey {
                namespace: "shop".into(),
                name: "web".into()
            }]
                .cluster_ips[0]
                .to_string(),
            "10.96.0.11"
        );

        // Resumed from where it was, not listed again.
        let (uri, watch2) = next(&mut handle, "services", &mut parked).await;
        assert!(
            uri.contains("watch=true") && uri.contains("resourceVersion=3"),
            "{uri}"
        );
        watch2.send_response(events(&[("DELETED", service("db", "10.96.0.20", 4))]));
        snapshot_where(&mut snapshot, "db deleted", |s| names(s) == ["web"]).await;

        // 410 Gone: the watcher lists again, and the list replaces what was known.
        let (uri, watch3) = next(&mut handle, "services", &mut parked).await;
        assert!(uri.contains("resourceVersion=4"), "{uri}");
        watch3.send_response(events(&[("ERROR", gone())]));
        let (uri, relist) = next(&mut handle, "services", &mut parked).await;
        assert!(!uri.contains("watch=true"), "a 410 must re-list: {uri}");
        relist.send_response(list(
            "ServiceList",
            10,
            vec![service("api", "10.96.0.30", 10)],
        ));
        let state = snapshot_where(&mut snapshot, "the re-listed state", |s| {
            names(s) == ["api"]
        })
        .await;
        assert_eq!(state.slices.len(), 1, "the slices stream was not disturbed");
    }

    fn pod(name: &str, app: &str, rv: u32) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "x", "resourceVersion": rv.to_string(),
                            "labels": {"app": app}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]}})
    }

    fn network_policy(name: &str, port: Value, rv: u32) -> Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": name, "namespace": "x", "resourceVersion": rv.to_string()},
               "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]}})
    }

    #[tokio::test]
    async fn the_policy_kinds_gate_on_all_three_lists_and_a_refused_policy_is_left_out() {
        let (service_mock, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service_mock, "default");
        let (triggers, _rx) = Triggers::channel();
        let (publisher, mut snapshot) = Publisher::new(triggers);
        let publishers = Publishers {
            proxy: None,
            policy: Some(publisher),
        };
        tokio::spawn(async move { follow(client, "n1", publishers).await });
        let mut parked = Parked::new();

        let (_, respond) = next(&mut handle, "pods", &mut parked).await;
        respond.send_response(list("PodList", 1, vec![pod("a", "web", 1)]));
        let (_, respond) = next(&mut handle, "namespaces", &mut parked).await;
        respond.send_response(list(
            "NamespaceList",
            1,
            vec![json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": "x", "resourceVersion": "1",
                                     "labels": {"kubernetes.io/metadata.name": "x"}}})],
        ));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            snapshot.borrow().is_none(),
            "published before the policies were listed"
        );
        let (_, respond) = next(&mut handle, "networkpolicies", &mut parked).await;
        // One good policy, one the API would refuse (port 0): only the good one is in.
        respond.send_response(list(
            "NetworkPolicyList",
            1,
            vec![
                network_policy("web", json!(80), 1),
                network_policy("bad", json!(0), 1),
            ],
        ));
        let cluster = snapshot_where(&mut snapshot, "the listed objects", |c: &Cluster| {
            !c.policies.is_empty()
        })
        .await;
        assert_eq!(cluster.pods.len(), 1);
        assert_eq!(cluster.namespaces.len(), 1);
        assert_eq!(
            cluster
                .policies
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["web"]
        );

        // A pod relabelled, then deleted, on its watch.
        let (_, pod_watch) = next(&mut handle, "pods", &mut parked).await;
        pod_watch.send_response(events(&[
            ("MODIFIED", pod("a", "db", 2)),
            ("ADDED", pod("b", "web", 3)),
            ("DELETED", pod("a", "db", 4)),
        ]));
        let cluster = snapshot_where(&mut snapshot, "only b", |c: &Cluster| {
            c.pods.len() == 1 && c.pods.keys().all(|k| k.name == "b")
        })
        .await;
        assert_eq!(cluster.policies.len(), 1, "the policies were not disturbed");
    }
}
