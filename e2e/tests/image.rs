//! The image, run as the DaemonSet runs it (`make test-image`): podman on the lab's node
//! namespaces, with each container's command, env, security context and mounts read
//! from manifests/ (so this test breaks when the manifest does). Each node's hostPaths
//! are directories of its own. Pods are wired through the INSTALLED plugin with the
//! INSTALLED conflist, in a mount namespace where the node's /var/lib/calyx is the
//! one the agent container writes. Then an upgrade to a new image tag, and uninstall.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calyx_e2e::cluster::{Cluster, ClusterSpec, Node};
use calyx_e2e::lab::{must, ping, privileged, sh, wait_until};
use serde_json::{json, Value};

const PREFIX: &str = "cyimg";

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every document of a manifest file.
fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifests().join(file)).unwrap();
    serde_saphyr::from_multiple(&text).unwrap()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifest"))
}

/// One node's view of the pod: where each hostPath lives for it.
struct NodeHost<'a> {
    node: &'a Node,
    /// The node's root for hostPaths (kubelet's `/`).
    root: PathBuf,
}

impl NodeHost<'_> {
    fn path(&self, host_path: &str) -> PathBuf {
        // Kernel modules are the machine's (where it has them); everything else is
        // the node's own.
        if host_path == "/lib/modules" && Path::new(host_path).is_dir() {
            return PathBuf::from(host_path);
        }
        self.root.join(host_path.trim_start_matches('/'))
    }
}

/// `podman run` arguments for `container` of `pod_spec` on `host`, as the kubelet would
/// set it up: host network (the node's namespace), env from values, the node name and
/// the ConfigMap, mounts from the pod's volumes.
fn podman_args(
    pod_spec: &Value,
    container: &Value,
    host: &NodeHost,
    config: &BTreeMap<String, String>,
    image: &str,
    empty: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--network".into(),
        format!("ns:/run/netns/{}", host.node.netns),
        // This sandbox's hard limits are below podman's defaults (test-hosts notes).
        "--ulimit".into(),
        format!("nofile={0}:{0}", hard_nofile()),
        "--ulimit".into(),
        "nproc=32768:32768".into(),
    ];
    assert_eq!(
        pod_spec["hostNetwork"], true,
        "the agent runs on the host network"
    );
    if container["securityContext"]["privileged"] == true {
        args.push("--privileged".into());
    }
    for env in container["env"].as_array().into_iter().flatten() {
        let name = env["name"].as_str().unwrap();
        let value = if let Some(v) = env["value"].as_str() {
            v.to_string()
        } else if env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            host.node.name.clone()
        } else if let Some(key) = env["valueFrom"]["configMapKeyRef"]["key"].as_str() {
            match config.get(key) {
                Some(value) => value.clone(),
                // An optional key the ConfigMap does not have: no variable at all.
                None if env["valueFrom"]["configMapKeyRef"]["optional"] == true => continue,
                None => panic!("env {name}: the ConfigMap has no {key}"),
            }
        } else {
            panic!("env {name}: a source this test does not know: {env}");
        };
        args.extend(["-e".into(), format!("{name}={value}")]);
    }
    let volumes: BTreeMap<&str, &Value> = pod_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume = volumes[mount["name"].as_str().unwrap()];
        let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
            let source = host.path(path);
            assert!(source.exists(), "hostPath {path} missing on the node");
            source
        } else if volume["secret"]["optional"] == true {
            // An optional Secret that does not exist: an empty volume.
            empty.to_path_buf()
        } else {
            panic!("volume {volume}: a kind this test does not know");
        };
        let read_only = if mount["readOnly"] == true { ":ro" } else { "" };
        args.extend([
            "-v".into(),
            format!(
                "{}:{}{read_only}",
                source.display(),
                mount["mountPath"].as_str().unwrap()
            ),
        ]);
    }
    let command: Vec<String> = container["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    args.extend(["--entrypoint".into(), command[0].clone(), image.into()]);
    args.extend(command[1..].iter().cloned());
    args
}

/// What the kubelet does before a pod's first container: create the hostPaths of
/// type DirectoryOrCreate and FileOrCreate.
fn create_host_paths(pod_spec: &Value, host: &NodeHost) {
    for volume in pod_spec["volumes"].as_array().unwrap() {
        let Some(path) = volume["hostPath"]["path"].as_str() else {
            continue;
        };
        let source = host.path(path);
        match volume["hostPath"]["type"].as_str() {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&source).unwrap(),
            Some("FileOrCreate") => {
                std::fs::create_dir_all(source.parent().unwrap()).unwrap();
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&source)
                    .unwrap();
            }
            // What every node has (/lib/modules on a machine without modules).
            _ => std::fs::create_dir_all(&source).unwrap(),
        }
    }
}

fn hard_nofile() -> String {
    let out = must("sh", &["-c", "ulimit -Hn"]);
    out.trim().to_string()
}

fn podman(args: &[String]) -> std::process::Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("run podman")
}

fn podman_ok(args: &[String]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs an init container to completion.
fn run_to_completion(args: Vec<String>) {
    let mut all = strings(&["run", "--rm"]);
    all.extend(args);
    podman_ok(&all);
}

/// Starts a long-running container named `name`.
fn start(name: &str, args: Vec<String>) {
    let _ = podman(&strings(&["rm", "-f", name]));
    let mut all = strings(&["run", "-d", "--name", name]);
    all.extend(args);
    podman_ok(&all);
}

/// The installed plugin, run as a runtime on the node runs it: in the node's network
/// namespace, with the node's /var/lib/calyx and /var/log/calyx where the plugin looks.
fn installed_plugin(host: &NodeHost, env: &[(&str, String)], stdin: &Value) -> (bool, String) {
    use std::io::Write;
    let script = format!(
        "mount --bind {state} /var/lib/calyx && mount --bind {log} /var/log/calyx && exec {bin}",
        state = host.path("/var/lib/calyx").display(),
        log = host.path("/var/log/calyx").display(),
        bin = host.path("/opt/cni/bin/calyx").display(),
    );
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host.node.netns))
        .args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The network config a runtime hands the first plugin of the installed conflist.
fn installed_conf(host: &NodeHost) -> Value {
    let path = host.path("/etc/cni/net.d/05-calyx.conflist");
    let list: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut conf = list["plugins"][0].clone();
    conf["name"] = list["name"].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf
}

/// CNI ADD of a new pod namespace `pod` on `host`; the pod's address, or the error.
fn add_pod(host: &NodeHost, pod: &str) -> Result<String, String> {
    let netns = format!("{PREFIX}-{pod}");
    if !Path::new("/run/netns").join(&netns).exists() {
        must("ip", &["netns", "add", &netns]);
    }
    let env = [
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", format!("{PREFIX}-{pod}")),
        ("CNI_NETNS", format!("/run/netns/{netns}")),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", host.path("/opt/cni/bin").display().to_string()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=img;K8S_POD_NAME={pod}"),
        ),
    ];
    let (ok, out) = installed_plugin(host, &env, &installed_conf(host));
    if !ok {
        return Err(out);
    }
    let result: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    let address = result["ips"][0]["address"].as_str().unwrap_or_default();
    Ok(address.split('/').next().unwrap().to_string())
}

/// GET `path` on the agent's probe port inside the node (bash's /dev/tcp).
fn probe(node: &Node, port: u64, path: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = sh("ip", &["netns", "exec", &node.netns, "bash", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha(path: &Path) -> String {
    must("sha256sum", &[&path.display().to_string()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Removes the test's containers, upgrade image and lab, even when it fails.
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.containers {
                let log = podman(&strings(&["logs", "--tail", "40", c]));
                eprintln!(
                    "--- {c} log ---\n{}{}",
                    String::from_utf8_lossy(&log.stdout),
                    String::from_utf8_lossy(&log.stderr)
                );
            }
        }
        for c in &self.containers {
            let _ = podman(&strings(&["rm", "-f", "-t", "2", c]));
        }
        for i in &self.images {
            let _ = podman(&strings(&["rmi", "-f", i]));
        }
        let _ = Cluster::destroy(PREFIX);
    }
}

#[test]
#[ignore = "needs the image: make test-image"]
fn the_image_installs_networks_pods_upgrades_and_uninstalls_as_the_daemonset_does() {
    if !privileged() {
        return;
    }
    let image = std::env::var("CALYX_IMAGE").expect("CALYX_IMAGE: run through make test-image");
    let docs = documents("calyx.yaml");
    let daemonset = find(&docs, "DaemonSet", "calyx");
    let pod_spec = &daemonset["spec"]["template"]["spec"];
    let install = &pod_spec["initContainers"][0];
    let agent = &pod_spec["containers"][0];
    assert_eq!(
        install["image"],
        image.as_str(),
        "the manifest names the image built"
    );
    assert_eq!(agent["image"], image.as_str());
    let readiness = &agent["readinessProbe"]["httpGet"];
    let port = readiness["port"].as_u64().unwrap();

    let _ = Cluster::destroy(PREFIX);
    let mut cleanup = Cleanup {
        containers: Vec::new(),
        images: Vec::new(),
    };
    let spec = ClusterSpec {
        prefix: PREFIX.into(),
        plugin: "/bin/true".into(), // unused: pods go through the installed plugin
        agent: None,
        pools: Vec::new(),
        block_size: None,
        agent_args: Vec::new(),
        nodes: 2,
        etcd: true,
    };
    let cluster = Cluster::create(&spec).expect("the lab");
    let mut config: BTreeMap<String, String> =
        serde_json::from_value(find(&docs, "ConfigMap", "calyx-config")["data"].clone()).unwrap();
    // The one thing an operator must set.
    config.insert("datastore".into(), cluster.store_url());
    let empty = tempfile::tempdir().unwrap();
    let hosts: Vec<NodeHost> = cluster
        .nodes
        .iter()
        .map(|node| NodeHost {
            node,
            root: cluster.node_state_dir(node).join("host"),
        })
        .collect();
    for host in &hosts {
        // What the node has before Calyx: the CNI directories.
        for dir in ["/opt/cni/bin", "/etc/cni/net.d"] {
            std::fs::create_dir_all(host.path(dir)).unwrap();
        }
    }
    // The plugin runs with the node's state mounted over these (they must exist).
    for dir in ["/var/lib/calyx", "/var/log/calyx"] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let agent_name = |host: &NodeHost| format!("{PREFIX}-agent-{}", host.node.name);

    // 1. The init container installs the plugin and the conflist; until the agent has
    //    registered the node, ADD says "try again later" (code 11) and claims nothing.
    for host in &hosts {
        create_host_paths(pod_spec, host);
        run_to_completion(podman_args(
            pod_spec,
            install,
            host,
            &config,
            &image,
            empty.path(),
        ));
        let conf = installed_conf(host);
        assert_eq!(conf["nodeName"], host.node.name.as_str());
        assert_eq!(conf["datastore"], cluster.store_url().as_str());
        let ldd = sh(
            "ldd",
            &[&host.path("/opt/cni/bin/calyx").display().to_string()],
        );
        let ldd = String::from_utf8_lossy(&ldd.stdout).to_string()
            + &String::from_utf8_lossy(&ldd.stderr);
        assert!(
            ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
            "the installed plugin is static: {ldd}"
        );
    }
    let early = add_pod(&hosts[0], "early").expect_err("ADD before the agent registered");
    assert!(
        early.contains("\"code\": 11") || early.contains("\"code\":11"),
        "{early}"
    );

    // 2. The agent container, as the DaemonSet runs it; ready on its probe.
    for host in &hosts {
        let name = agent_name(host);
        cleanup.containers.push(name.clone());
        start(
            &name,
            podman_args(pod_spec, agent, host, &config, &image, empty.path()),
        );
    }
    for host in &hosts {
        wait_until(
            "the agent's readiness probe",
            Duration::from_secs(60),
            || {
                probe(host.node, port, readiness["path"].as_str().unwrap())
                    .starts_with("HTTP/1.0 200")
            },
        );
        assert!(probe(host.node, port, "/livez").starts_with("HTTP/1.0 200"));
    }

    // 3. Pods through the installed plugin reach each other across nodes.
    let a = add_pod(&hosts[0], "a").expect("ADD on node1");
    let b = add_pod(&hosts[1], "b").expect("ADD on node2");
    wait_until("pod a reaches pod b", Duration::from_secs(20), || {
        ping(&format!("{PREFIX}-a"), &b)
    });
    assert!(ping(&format!("{PREFIX}-b"), &a));

    // 4. Upgrade to a new image tag: the plugin is replaced whole while runtimes keep
    //    calling it, pods keep working, and new pods use the new plugin.
    let upgraded = format!("{image}-test-upgrade");
    cleanup.images.push(upgraded.clone());
    let stage = tempfile::tempdir().unwrap();
    let extract = format!("{PREFIX}-extract");
    let _ = podman(&strings(&["rm", "-f", &extract]));
    podman_ok(&strings(&["create", "--name", &extract, &image]));
    let new_plugin = stage.path().join("calyx");
    podman_ok(&strings(&[
        "cp",
        &format!("{extract}:/usr/local/bin/calyx"),
        &new_plugin.display().to_string(),
    ]));
    podman_ok(&strings(&["rm", &extract]));
    // Trailing bytes: a different file that still runs (ELF ignores them).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&new_plugin)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"upgrade"))
        .unwrap();
    std::fs::write(
        stage.path().join("Containerfile"),
        format!("FROM {image}\nCOPY calyx /usr/local/bin/calyx\n"),
    )
    .unwrap();
    podman_ok(&strings(&[
        "build",
        "--quiet",
        "-t",
        &upgraded,
        &stage.path().display().to_string(),
    ]));

    let calls = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let caller = {
        let (calls, failures, stop) = (calls.clone(), failures.clone(), stop.clone());
        let root = hosts[0].root.clone();
        let node = hosts[0].node.clone();
        std::thread::spawn(move || {
            let host = NodeHost { node: &node, root };
            while !stop.load(Ordering::Relaxed) {
                let env = [("CNI_COMMAND", "VERSION".to_string())];
                let (ok, out) = installed_plugin(&host, &env, &json!({"cniVersion": "1.0.0"}));
                calls.fetch_add(1, Ordering::Relaxed);
                if !ok || !out.contains("supportedVersions") {
                    failures.lock().unwrap().push(out);
                }
            }
        })
    };
    for host in &hosts {
        // Three times, as a restarted init container would: more chances for a call
        // to meet the binary being replaced (a write fd still open at the rename made
        // one call in 143 fail with "Text file busy" before it was fixed).
        for _ in 0..3 {
            run_to_completion(podman_args(
                pod_spec,
                install,
                host,
                &config,
                &upgraded,
                empty.path(),
            ));
        }
        podman_ok(&strings(&["stop", "-t", "10", &agent_name(host)]));
        start(
            &agent_name(host),
            podman_args(pod_spec, agent, host, &config, &upgraded, empty.path()),
        );
        // Pods keep working while the node's agent is replaced.
        assert!(
            ping(&format!("{PREFIX}-a"), &b),
            "a lost b during the upgrade"
        );
    }
    stop.store(true, Ordering::Relaxed);
    caller.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} plugin calls failed during the upgrade: {:?}",
        failures.len(),
        calls.load(Ordering::Relaxed),
        failures.first()
    );
    eprintln!(
        "upgrade: {} plugin calls while the binary was replaced on both nodes, none failed",
        calls.load(Ordering::Relaxed)
    );
    for host in &hosts {
        assert_eq!(sha(&host.path("/opt/cni/bin/calyx")), sha(&new_plugin));
        wait_until(
            "the upgraded agent is ready",
            Duration::from_secs(60),
            || probe(host.node, port, "/readyz").starts_with("HTTP/1.0 200"),
        );
    }
    let c = add_pod(&hosts[1], "c").expect("ADD through the upgraded plugin");
    wait_until(
        "the new pod reaches the old",
        Duration::from_secs(20),
        || ping(&format!("{PREFIX}-c"), &a),
    );

    // 5. Uninstall (manifests/uninstall.yaml), after the DaemonSet is gone: twice.
    for host in &hosts {
        podman_ok(&strings(&["rm", "-f", "-t", "10", &agent_name(host)]));
    }
    let uninstall_docs = documents("uninstall.yaml");
    let uninstall_spec =
        &find(&uninstall_docs, "DaemonSet", "calyx-uninstall")["spec"]["template"]["spec"];
    let uninstall = &uninstall_spec["initContainers"][0];
    for host in &hosts {
        create_host_paths(uninstall_spec, host);
        for _ in 0..2 {
            run_to_completion(podman_args(
                uninstall_spec,
                uninstall,
                host,
                &config,
                &upgraded,
                empty.path(),
            ));
        }
        for gone in ["/opt/cni/bin/calyx", "/etc/cni/net.d/05-calyx.conflist"] {
            assert!(
                !host.path(gone).exists(),
                "{gone} left on {}",
                host.node.name
            );
        }
        let state: Vec<_> = std::fs::read_dir(host.path("/var/lib/calyx"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(state.is_empty(), "state left: {state:?}");
        let links = must("ip", &["-n", &host.node.netns, "-o", "link"]);
        assert!(!links.contains("vxlan.calyx"), "{links}");
        let rules = must("ip", &["netns", "exec", &host.node.netns, "iptables-save"]);
        assert!(!rules.contains("CALYX-"), "{rules}");
        let routes = must(
            "ip",
            &["-n", &host.node.netns, "route", "show", "type", "blackhole"],
        );
        assert!(routes.trim().is_empty(), "block routes left: {routes}");
    }
    // Running pods keep their veths and host routes (b and c on node2).
    let links = must("ip", &["-n", &hosts[1].node.netns, "-o", "link"]);
    assert_eq!(links.matches(": cyx").count(), 2, "pod veths: {links}");
    let routes = must("ip", &["-n", &hosts[1].node.netns, "route"]);
    for pod in [&b, &c] {
        assert!(
            routes.contains(&format!("{pod} dev cyx")),
            "{pod}: {routes}"
        );
    }
    drop(cleanup);
}

/// The release's version (the workspace's) is the image tag and every label, in both
/// manifests and the kustomization: nodes cannot drift to mixed versions.
#[test]
fn the_manifests_carry_the_release_version_everywhere() {
    let version = env!("CARGO_PKG_VERSION");
    let image = format!("localhost/calyx:{version}");
    for file in ["calyx.yaml", "uninstall.yaml"] {
        for doc in documents(file) {
            let what = format!("{file}: {} {}", doc["kind"], doc["metadata"]["name"]);
            assert_eq!(
                doc["metadata"]["labels"]["app.kubernetes.io/version"], version,
                "{what}"
            );
            let spec = &doc["spec"]["template"]["spec"];
            if doc["kind"] != "DaemonSet" {
                continue;
            }
            assert_eq!(
                doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"], version,
                "{what}"
            );
            for list in ["initContainers", "containers"] {
                for c in spec[list].as_array().into_iter().flatten() {
                    assert_eq!(c["image"], image.as_str(), "{what}: {}", c["name"]);
                    assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{what}");
                }
            }
        }
    }
    let kustomization = &documents("kustomization.yaml")[0];
    assert_eq!(kustomization["images"][0]["name"], "localhost/calyx");
    assert_eq!(kustomization["images"][0]["newTag"], version);
}
