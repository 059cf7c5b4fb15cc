//! Services and EndpointSlices from the Kubernetes API, through kube's watchers: each
//! stream lists, then watches; a watch that ends or fails (410 Gone included) is
//! resumed or re-listed by the watcher, with backoff, never fatally. Nothing is
//! published until both streams have listed once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service as KubeService;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config, Resource, ResourceExt};

use super::objects::{self, Converted};
use super::Publisher;
use crate::proxy::model::{ProxyState, Service, ServiceKey, Slice};

/// Connects (in-cluster config, or `kubeconfig`) and follows the API from a task of
/// its own; retries the connection until it works.
pub fn spawn(kubeconfig: Option<PathBuf>, publisher: Publisher) -> anyhow::Result<()> {
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(500);
        let client = loop {
            match client(kubeconfig.as_deref()).await {
                Ok(client) => break client,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_s = wait.as_secs_f64(),
                        "no Kubernetes API yet"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        };
        follow(client, publisher).await;
    });
    Ok(())
}

async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// What the watchers have seen, converted.
#[derive(Default)]
struct Mirror {
    services: BTreeMap<ServiceKey, Arc<Service>>,
    slices: BTreeMap<ServiceKey, Arc<Slice>>,
    /// Objects of a listing in progress (replacing the map when it is done).
    listing_services: Option<BTreeMap<ServiceKey, Arc<Service>>>,
    listing_slices: Option<BTreeMap<ServiceKey, Arc<Slice>>>,
    services_listed: bool,
    slices_listed: bool,
}

fn key_of<K: Resource>(object: &K) -> ServiceKey {
    ServiceKey {
        namespace: object.namespace().unwrap_or_else(|| "default".into()),
        name: object.name_any(),
    }
}

impl Mirror {
    fn service_event(&mut self, event: Event<KubeService>) {
        match event {
            Event::Init => self.listing_services = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                let key = key_of(&object);
                if let Some(service) = convert_service(&object) {
                    self.listing_services
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, Arc::new(service));
                }
            }
            Event::InitDone => {
                self.services = self.listing_services.take().unwrap_or_default();
                self.services_listed = true;
            }
            Event::Apply(object) => {
                let key = key_of(&object);
                match convert_service(&object) {
                    Some(service) => self.services.insert(key, Arc::new(service)),
                    None => self.services.remove(&key),
                };
            }
            Event::Delete(object) => {
                self.services.remove(&key_of(&object));
            }
        }
    }

    fn slice_event(&mut self, event: Event<EndpointSlice>) {
        match event {
            Event::Init => self.listing_slices = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let Some((key, slice)) = convert_slice(&object) {
                    self.listing_slices
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, Arc::new(slice));
                }
            }
            Event::InitDone => {
                self.slices = self.listing_slices.take().unwrap_or_default();
                self.slices_listed = true;
            }
            Event::Apply(object) => {
                let key = key_of(&object);
                match convert_slice(&object) {
                    Some((_, slice)) => self.slices.insert(key, Arc::new(slice)),
                    None => self.slices.remove(&key),
                };
            }
            Event::Delete(object) => {
                self.slices.remove(&key_of(&object));
            }
        }
    }

    fn state(&self) -> Option<ProxyState> {
        (self.services_listed && self.slices_listed).then(|| ProxyState {
            services: self.services.clone(),
            slices: self.slices.clone(),
        })
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

fn convert_slice(object: &EndpointSlice) -> Option<(ServiceKey, Slice)> {
    match objects::endpoint_slice(object) {
        Ok(Converted::Object(pair)) => Some(pair),
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
}

fn streams(client: Client) -> impl Stream<Item = Update> + Send {
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
        Api::<EndpointSlice>::all(client),
        watcher::Config::default().labels(&selector),
    )
    .default_backoff()
    .map(|e| Update::Slice(Box::new(e)));
    futures::stream::select(services, slices)
}

/// Follows both streams until the controller is gone.
pub async fn follow(client: Client, publisher: Publisher) {
    let mut updates = Box::pin(streams(client));
    let mut mirror = Mirror::default();
    while let Some(update) = updates.next().await {
        let mut changed = apply(&mut mirror, update);
        // Take what else is ready now, so a burst is published once.
        while let Some(Some(update)) = futures::FutureExt::now_or_never(updates.next()) {
            changed |= apply(&mut mirror, update);
        }
        if changed {
            if let Some(state) = mirror.state() {
                if !publisher.publish(Arc::new(state)) {
                    return;
                }
            }
        }
    }
}

fn apply(mirror: &mut Mirror, update: Update) -> bool {
    match update {
        Update::Service(boxed) => match *boxed {
            Ok(event) => {
                let listing = matches!(event, Event::Init | Event::InitApply(_));
                mirror.service_event(event);
                !listing
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kubernetes watch of Services failed; retrying with backoff");
                false
            }
        },
        Update::Slice(boxed) => match *boxed {
            Ok(event) => {
                let listing = matches!(event, Event::Init | Event::InitApply(_));
                mirror.slice_event(event);
                !listing
            }
            Err(e) => {
                tracing::warn!(error = %e, "Kubernetes watch of EndpointSlices failed; retrying with backoff");
                false
            }
        },
    }
}
