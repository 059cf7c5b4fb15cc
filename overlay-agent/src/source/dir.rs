//! `--services-dir`: Services and EndpointSlices from files, as `kubectl get -o yaml`
//! or `-o json` prints them (several YAML documents and `kind: List` allowed), this
//! node's Node object if one is there (its zone label, for topology hints), and the
//! Pods, Namespaces and NetworkPolicies the policy controller enforces. One scan
//! serves both controllers; each is woken only when its part changed. The
//! directory is watched (inotify) and polled as a fallback; a changed file is read
//! again and takes effect at once, within a second at worst.
//! A file that does not parse keeps its last good objects; an invalid object is
//! skipped; both are logged with the file and the field at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use super::Publisher;
use crate::object_files;
use crate::policy::model::Cluster;
use crate::policy::parse::{self as policy_parse, Object as PolicyObject, ObjectKey};
use crate::proxy::model::{ProxyState, Service, ServiceKey, Slice};
use crate::proxy::source::objects::{self, Converted};

/// The fallback poll, for file systems that send no events.
pub const POLL: Duration = Duration::from_millis(500);

/// What one file holds.
#[derive(Debug, Clone, Default)]
pub struct FileObjects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<(ServiceKey, Arc<Slice>)>,
    /// Nodes: name and zone.
    pub nodes: Vec<(String, Option<String>)>,
    /// Pods, Namespaces and NetworkPolicies.
    pub policy: Vec<PolicyObject>,
}

/// A problem with part of a file; the rest of it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub document: usize,
    pub what: String,
}

/// Reads one file's objects; Err when the file as a whole cannot be used.
pub fn read_file(path: &Path) -> Result<(FileObjects, Vec<Problem>), String> {
    let mut objects = FileObjects::default();
    let mut problems = Vec::new();
    for item in object_files::read(path)? {
        let prefix = item.prefix();
        if let Err(what) = convert(item.value, &mut objects) {
            problems.push(Problem {
                document: item.document,
                what: format!("{prefix}{what}"),
            });
        }
    }
    Ok((objects, problems))
}

/// One object into `into`; Err names what is wrong (an ignored kind is not an error
/// but is said too, so the log shows why an object did nothing).
fn convert(item: Value, into: &mut FileObjects) -> Result<(), String> {
    let api = item["apiVersion"].as_str().unwrap_or_default().to_string();
    let kind = item["kind"].as_str().unwrap_or_default().to_string();
    let name = item["metadata"]["name"].as_str().unwrap_or("?").to_string();
    match (api.as_str(), kind.as_str()) {
        ("v1", "Service") => {
            let parsed: KubeService = serde_path_to_error::deserialize(item)
                .map_err(|e| format!("Service {name}: field {}: {}", e.path(), e.inner()))?;
            match objects::service(&parsed).map_err(|e| format!("Service {name}: {e}"))? {
                Converted::Object(s) => into.services.push(Arc::new(s)),
                Converted::Skip(why) => tracing::debug!(service = %name, why, "not proxied"),
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let parsed: EndpointSlice = serde_path_to_error::deserialize(item)
                .map_err(|e| format!("EndpointSlice {name}: field {}: {}", e.path(), e.inner()))?;
            match objects::endpoint_slice(&parsed)
                .map_err(|e| format!("EndpointSlice {name}: {e}"))?
            {
                Converted::Object((key, s)) => into.slices.push((key, Arc::new(s))),
                Converted::Skip(why) => tracing::debug!(slice = %name, why, "not used"),
            }
        }
        ("v1", "Node") => {
            let parsed: Node = serde_path_to_error::deserialize(item)
                .map_err(|e| format!("Node {name}: field {}: {}", e.path(), e.inner()))?;
            into.nodes
                .push((name, objects::node_zone(&parsed.metadata)));
        }
        ("v1", "Pod" | "Namespace") | ("networking.k8s.io/v1", "NetworkPolicy") => {
            into.policy.extend(policy_parse::object(item)?);
        }
        _ => return Err(format!("{api} {kind} {name}: ignored (only v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node, v1 Pod, v1 Namespace and networking.k8s.io/v1 NetworkPolicy are read)")),
    }
    Ok(())
}

/// The keys of the policy objects in `files`.
fn policy_keys<'a>(files: impl IntoIterator<Item = &'a FileObjects>) -> BTreeSet<ObjectKey> {
    files
        .into_iter()
        .flat_map(|o| o.policy.iter().map(PolicyObject::key))
        .collect()
}

/// A file's identity for change detection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// The directory's files and what each held when last read well.
pub struct DirSource {
    dir: PathBuf,
    /// This node's name: its Node object gives the zone.
    node: String,
    files: BTreeMap<PathBuf, (Stamp, FileObjects)>,
    listed: bool,
    /// Every file's objects together, patched file by file.
    merged: ProxyState,
    /// Whether the proxy's objects, and the policy controller's, changed since
    /// `take_changes` was last called (both true before the first call).
    proxy_changed: bool,
    policy_changed: bool,
    /// Every file's Pods, Namespaces and NetworkPolicies together, patched file by
    /// file: for each object, the last file's (in file order) that has it.
    cluster: Cluster,
}

impl DirSource {
    /// The policy controller's objects of every file, in file order (a later file's
    /// object of the same name wins).
    /// Which parts changed since the last call: (the proxy's, the policy controller's).
    pub fn take_changes(&mut self) -> (bool, bool) {
        (
            std::mem::take(&mut self.proxy_changed),
            std::mem::take(&mut self.policy_changed),
        )
    }

    /// What changed between a file's old and new objects.
    fn note_change(&mut self, old: Option<&FileObjects>, new: Option<&FileObjects>) {
        let empty = FileObjects::default();
        let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
        self.proxy_changed |=
            old.services != new.services || old.slices != new.slices || old.nodes != new.nodes;
        self.policy_changed |= old.policy != new.policy;
    }

    /// The policy controller's objects of every file (a copy that shares them).
    pub fn cluster(&self) -> Cluster {
        self.cluster.clone()
    }

    /// Settles the objects a file change touched: each takes its value from the
    /// last file that has it, or goes. Many at once (a big file rewritten) rebuild
    /// the whole cluster instead.
    fn settle(&mut self, touched: BTreeSet<ObjectKey>) {
        if touched.len() > 64 {
            let mut cluster = Cluster::default();
            for (_, objects) in self.files.values() {
                for object in &objects.policy {
                    cluster.add(object.clone());
                }
            }
            self.cluster = cluster;
            return;
        }
        for key in touched {
            let last = self
                .files
                .values()
                .rev()
                .find_map(|(_, o)| o.policy.iter().rev().find(|x| x.key() == key));
            match last {
                Some(object) => self.cluster.add(object.clone()),
                None => self.cluster.remove(&key),
            }
        }
    }
}

impl DirSource {
    pub fn new(dir: PathBuf, node: String) -> DirSource {
        DirSource {
            dir,
            node,
            files: BTreeMap::new(),
            listed: false,
            merged: ProxyState::default(),
            proxy_changed: true,
            policy_changed: true,
            cluster: Cluster::default(),
        }
    }

    /// Reads what changed since the last scan; Some(state) when anything did (and on
    /// the first scan, even of an empty directory).
    pub fn scan(&mut self) -> Option<ProxyState> {
        let present = match object_files::list(&self.dir) {
            Ok(present) => present,
            Err(e) => {
                // Keep serving what was read: a directory that vanishes for a moment
                // (a ConfigMap's atomic swap) must not remove every Service.
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the services directory");
                return None;
            }
        };
        let mut changed = !self.listed;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in gone {
            if let Some((_, old)) = self.files.remove(&path) {
                self.note_change(Some(&old), None);
                self.unmerge(&old);
                self.settle(policy_keys([&old]));
                changed = true;
            }
        }
        for path in present {
            let Some(now) = stamp(&path) else { continue };
            if self.files.get(&path).is_some_and(|(s, _)| *s == now) {
                continue;
            }
            changed = true;
            match read_file(&path) {
                Ok((objects, problems)) => {
                    for p in problems {
                        tracing::warn!(file = %path.display(), document = p.document, problem = %p.what, "object skipped");
                    }
                    tracing::info!(
                        file = %path.display(),
                        services = objects.services.len(),
                        endpoint_slices = objects.slices.len(),
                        policy_objects = objects.policy.len(),
                        "read"
                    );
                    let old = self.files.remove(&path).map(|(_, old)| old);
                    self.note_change(old.as_ref(), Some(&objects));
                    let touched = policy_keys(old.iter().chain([&objects]));
                    if let Some(old) = old {
                        self.unmerge(&old);
                    }
                    self.merge(&path, &objects);
                    self.files.insert(path, (now, objects));
                    self.settle(touched);
                }
                Err(why) => {
                    let kept = self.files.get(&path).map(|(_, o)| o.clone());
                    tracing::error!(
                        file = %path.display(),
                        error = %why,
                        kept_last_good = kept.is_some(),
                        "file not used; its last good objects stay"
                    );
                    // Remember the stamp so the same broken file is not logged every poll.
                    self.files.insert(path, (now, kept.unwrap_or_default()));
                }
            }
        }
        self.listed = true;
        changed.then(|| self.state())
    }

    fn state(&self) -> ProxyState {
        self.merged.clone()
    }

    fn merge(&mut self, path: &Path, objects: &FileObjects) {
        for s in &objects.services {
            if self
                .merged
                .services
                .insert(s.key.clone(), s.clone())
                .is_some()
            {
                tracing::warn!(file = %path.display(), service = %s.key, "Service defined again; this file's wins");
            }
        }
        for (key, slice) in &objects.slices {
            self.merged.slices.insert(key.clone(), slice.clone());
        }
        for (name, zone) in &objects.nodes {
            if *name == self.node {
                self.merged.node_zone = zone.clone();
            }
        }
    }

    /// Takes a file's objects out (those another file has since redefined stay).
    fn unmerge(&mut self, objects: &FileObjects) {
        if objects.nodes.iter().any(|(name, _)| *name == self.node) {
            self.merged.node_zone = None;
        }
        for s in &objects.services {
            if self
                .merged
                .services
                .get(&s.key)
                .is_some_and(|m| Arc::ptr_eq(m, s))
            {
                self.merged.services.remove(&s.key);
            }
        }
        for (key, slice) in &objects.slices {
            if self
                .merged
                .slices
                .get(key)
                .is_some_and(|m| Arc::ptr_eq(m, slice))
            {
                self.merged.slices.remove(key);
            }
        }
    }
}

/// Follows the directory for as long as any publisher has readers: the proxy's
/// (Services, slices, the zone) and the policy controller's (Pods, Namespaces,
/// NetworkPolicies), each published when its part changed.
pub fn spawn(
    dir: PathBuf,
    node: String,
    proxy: Option<Publisher<ProxyState>>,
    policy: Option<Publisher<Cluster>>,
) {
    std::thread::Builder::new()
        .name("services-dir".into())
        .spawn(move || {
            use notify::Watcher;
            let (tx, rx) = std::sync::mpsc::channel();
            // Kept alive for as long as the loop runs; without it, polling alone.
            let _watcher = notify::recommended_watcher(move |_| {
                let _ = tx.send(());
            })
            .and_then(|mut w| {
                w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
                Ok(w)
            })
            .map_err(|e| {
                tracing::warn!(dir = %dir.display(), error = %e, "no change events; polling every {POLL:?}")
            })
            .ok();
            let mut source = DirSource::new(dir, node);
            loop {
                let started = std::time::Instant::now();
                if let Some(state) = source.scan() {
                    tracing::debug!(elapsed = ?started.elapsed(), "services directory read");
                    let (proxy_changed, policy_changed) = source.take_changes();
                    let mut alive = false;
                    if let Some(proxy) = &proxy {
                        alive |= !proxy_changed || proxy.publish(Arc::new(state));
                    }
                    if let Some(policy) = &policy {
                        alive |= !policy_changed || {
                            let cluster = source.cluster();
                            tracing::debug!(elapsed = ?started.elapsed(), "policy objects merged");
                            policy.publish(Arc::new(cluster))
                        };
                    }
                    if !alive {
                        return;
                    }
                }
                // An event (or the poll) wakes the next scan; a burst is one scan.
                let _ = rx.recv_timeout(POLL);
                while rx.try_recv().is_ok() {}
            }
        })
        .expect("spawn the services-dir thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::source::objects::tests::{NODEPORT_SERVICE, SLICE};

    #[test]
    fn multi_document_yaml_lists_and_json_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            format!("{NODEPORT_SERVICE}\n---\n{SLICE}"),
        )
        .unwrap();
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 5432}]}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
        ]});
        std::fs::write(dir.path().join("b.json"), list.to_string()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not read").unwrap();
        let mut source = DirSource::new(dir.path().into(), "n1".into());
        let state = source.scan().expect("first scan");
        assert_eq!(state.services.len(), 2);
        assert_eq!(state.slices.len(), 1);
        assert!(source.scan().is_none(), "nothing changed");
    }

    #[test]
    fn this_nodes_zone_label_comes_from_its_node_object() {
        let dir = tempfile::tempdir().unwrap();
        let node = |name: &str, zone: &str| {
            format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    topology.kubernetes.io/zone: {zone}\n")
        };
        let path = dir.path().join("nodes.yaml");
        std::fs::write(
            &path,
            format!("{}---\n{}", node("n2", "b"), node("n1", "a")),
        )
        .unwrap();
        let mut source = DirSource::new(dir.path().into(), "n1".into());
        assert_eq!(source.scan().unwrap().node_zone.as_deref(), Some("a"));
        // A label change is a change; the file going takes the zone with it.
        std::fs::write(&path, node("n1", "c")).unwrap();
        assert_eq!(source.scan().unwrap().node_zone.as_deref(), Some("c"));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(source.scan().unwrap().node_zone, None);
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_objects_and_an_invalid_object_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.yaml");
        std::fs::write(&path, NODEPORT_SERVICE).unwrap();
        let mut source = DirSource::new(dir.path().into(), "n1".into());
        assert_eq!(source.scan().unwrap().services.len(), 1);
        std::fs::write(&path, "apiVersion: v1\nkind: Service\n  bad: [indent\n").unwrap();
        // Changed, but the file is unusable: the Service stays.
        let state = source.scan().unwrap();
        assert_eq!(state.services.len(), 1);
        let two = format!(
            "{}\n---\n{}",
            NODEPORT_SERVICE.replace("10.96.0.10", "10.96.0.999"),
            NODEPORT_SERVICE.replace("name: web", "name: api")
        );
        std::fs::write(&path, two).unwrap();
        let (objects, problems) = read_file(&path).unwrap();
        assert_eq!(objects.services.len(), 1);
        assert_eq!(problems[0].document, 0);
        assert!(
            problems[0].what.contains("spec.clusterIP"),
            "{}",
            problems[0].what
        );
        let state = source.scan().unwrap();
        assert_eq!(
            state
                .services
                .keys()
                .map(|k| k.name.as_str())
                .collect::<Vec<_>>(),
            ["api"]
        );
        std::fs::remove_file(&path).unwrap();
        assert!(source.scan().unwrap().services.is_empty());
    }

    #[test]
    fn policy_objects_take_the_last_files_value_and_fall_back_when_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let pod = |name: &str, v: &str| {
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "x", "labels": {"v": v}},
                "spec": {"nodeName": "n1"},
                "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]}})
        };
        let write = |file: &str, items: Vec<serde_json::Value>| {
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
            std::fs::write(dir.path().join(file), list.to_string()).unwrap();
        };
        let label = |source: &DirSource, name: &str| {
            let key = crate::policy::model::PodKey {
                namespace: "x".into(),
                name: name.into(),
            };
            source
                .cluster()
                .pods
                .get(&key)
                .map(|p| p.labels["v"].clone())
        };
        write("a.json", vec![pod("a", "1"), pod("b", "1")]);
        write("b.json", vec![pod("a", "2")]);
        let mut source = DirSource::new(dir.path().into(), "n1".into());
        source.scan();
        assert_eq!(
            label(&source, "a").as_deref(),
            Some("2"),
            "the later file wins"
        );
        assert_eq!(label(&source, "b").as_deref(), Some("1"));
        std::fs::remove_file(dir.path().join("b.json")).unwrap();
        source.scan();
        assert_eq!(
            label(&source, "a").as_deref(),
            Some("1"),
            "back to a.json's"
        );
        write("a.json", vec![pod("a", "33")]);
        source.scan();
        assert_eq!(label(&source, "a").as_deref(), Some("33"));
        assert_eq!(label(&source, "b"), None, "gone with its file's entry");
    }

    #[test]
    fn a_type_error_names_the_field_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.yaml");
        std::fs::write(
            &path,
            NODEPORT_SERVICE.replace("port: 80\n", "port: eighty\n"),
        )
        .unwrap();
        let (objects, problems) = read_file(&path).unwrap();
        assert!(objects.services.is_empty());
        assert!(
            problems[0].what.contains("spec.ports[0].port"),
            "{}",
            problems[0].what
        );
    }
}
