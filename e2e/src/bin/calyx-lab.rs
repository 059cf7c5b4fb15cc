//! calyx-lab: a Calyx cluster made of network namespaces on this machine.
//!
//!   calyx-lab up [--nodes 3] [--pods-per-node 2] [--plugin target/release/calyx]
//!                [--agent target/release/calyx-agent]
//!   calyx-lab status
//!   calyx-lab down
//!
//! Nodes sit on an underlay bridge (192.0.2.0/24) in a namespace of their own, each
//! running the real `calyx-agent`; pods are wired by the real `calyx` CNI binary; all
//! nodes share one embedded store under /run/calyx-lab. The agents run the service
//! proxy (nftables mode) on the Services in /run/calyx-lab-services: `up` puts a demo
//! Service there (ClusterIP 10.96.0.10:80 and NodePort 30080, backed by an HTTP server
//! in the first pod of the first two nodes) and the pods as Pod objects (namespace
//! `lab`); drop more `kubectl get -o yaml` files there (Services, NetworkPolicies) and
//! they take effect at once. Only addresses inside these namespaces are ever used.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4};
use calyx_e2e::lab::privileged;
use clap::{Parser, Subcommand};

const PREFIX: &str = "calyx-lab";
const SERVICES_DIR: &str = "/run/calyx-lab-services";
const DEMO_CLUSTER_IP: &str = "10.96.0.10";
const DEMO_NODE_PORT: u16 = 30080;

#[derive(Parser)]
#[command(
    name = "calyx-lab",
    about = "A Calyx cluster made of network namespaces on this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Brings the lab up, checks pod-to-pod reachability and prints a table.
    Up {
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=200))]
        nodes: u16,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        #[arg(long, default_value = "target/release/calyx")]
        plugin: PathBuf,
        #[arg(long, default_value = "target/release/calyx-agent")]
        agent: PathBuf,
    },
    /// Shows the running lab's reachability.
    Status,
    /// Removes the lab's namespaces and processes.
    Down,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Up {
            nodes,
            pods_per_node,
            plugin,
            agent,
        } => up(usize::from(nodes), pods_per_node, plugin, agent),
        Command::Status => status(&Cluster::load(PREFIX)?),
        Command::Down => {
            let removed = Cluster::destroy(PREFIX)?;
            let _ = std::fs::remove_dir_all(SERVICES_DIR);
            println!("lab down: removed {removed} namespaces");
            Ok(())
        }
    }
}

fn up(nodes: usize, pods_per_node: usize, plugin: PathBuf, agent: PathBuf) -> Result<()> {
    if !privileged() {
        bail!("calyx-lab needs root and network namespaces");
    }
    std::fs::create_dir_all(SERVICES_DIR).context(SERVICES_DIR)?;
    let spec = ClusterSpec {
        prefix: PREFIX.into(),
        plugin,
        agent: Some(agent),
        pools: vec![POOL_V4.into()],
        block_size: None,
        agent_args: ["--proxy-mode", "nftables", "--services-dir", SERVICES_DIR]
            .map(String::from)
            .to_vec(),
        nodes,
        etcd: false,
    };
    let mut cluster = match Cluster::create(&spec) {
        Ok(c) => c,
        Err(e) => {
            let _ = Cluster::destroy(PREFIX);
            return Err(e);
        }
    };
    for n in 0..nodes {
        for p in 1..=pods_per_node {
            let name = format!("{}-pod{p}", cluster.nodes[n].name);
            cluster.add_pod(n, &name)?;
        }
    }
    if pods_per_node > 0 {
        demo_service(&cluster)?;
    }
    pod_objects(&cluster)?;
    status(&cluster)
}

/// An HTTP server (busybox httpd, detached; `down` stops it with its namespace) in the
/// first pod of the first two nodes, and the Service in front of them.
fn demo_service(cluster: &Cluster) -> Result<()> {
    let backends: Vec<_> = cluster
        .nodes
        .iter()
        .take(2)
        .filter_map(|n| cluster.pods.iter().find(|p| p.node == n.name))
        .collect();
    for pod in &backends {
        let www = cluster.state_dir().join("www").join(&pod.name);
        std::fs::create_dir_all(&www)?;
        std::fs::write(www.join("index.html"), format!("{}\n", pod.name))?;
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &pod.netns, "busybox", "httpd", "-p", "8080", "-h",
            ])
            .arg(&www)
            .output()
            .context("run busybox httpd (busybox-static)")?;
        if !out.status.success() {
            bail!(
                "httpd in {}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let endpoints: Vec<String> = backends
        .iter()
        .map(|p| {
            format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: {}\n",
                p.ips[0], p.node
            )
        })
        .collect();
    let yaml = format!(
        "# The lab's demo Service, as `kubectl get -o yaml` would print it.\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: demo\n  namespace: default\n\
         spec:\n  type: NodePort\n  clusterIP: {DEMO_CLUSTER_IP}\n  clusterIPs: [{DEMO_CLUSTER_IP}]\n\
         \x20 ports:\n  - name: http\n    port: 80\n    protocol: TCP\n    targetPort: http\n    nodePort: {DEMO_NODE_PORT}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata:\n  name: demo-x1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: demo\n\
         ports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n{}",
        endpoints.concat()
    );
    std::fs::write(Path::new(SERVICES_DIR).join("demo.yaml"), yaml)?;
    Ok(())
}

/// The lab's pods as the API would list them (namespace `lab`, label `app` = the pod's
/// name, `node` = its node), for the agents' policy controller: a NetworkPolicy
/// dropped into the services directory selects them.
fn pod_objects(cluster: &Cluster) -> Result<()> {
    use calyx_e2e::objects::{namespace_object, pod_object};
    let mut objects = vec![namespace_object("lab", &[])];
    for pod in &cluster.pods {
        objects.push(pod_object(
            "lab",
            &pod.name,
            &pod.node,
            &pod.ips,
            &[("app", &pod.name), ("node", &pod.node)],
            &[("http", 8080, "TCP")],
        ));
    }
    calyx_e2e::services::write_objects(Path::new(SERVICES_DIR), "pods.json", objects)
}

/// GET / from `netns` to `to`; the first line of the body (the backend's name).
fn http_get(netns: &str, to: SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = calyx_e2e::sockets::connect_from(netns, to).ok()?;
    write!(stream, "GET / HTTP/1.0\r\nHost: demo\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let body = response.split("\r\n\r\n").nth(1)?;
    Some(body.lines().next()?.to_string())
}

/// The demo Service from every pod (ClusterIP) and from every node (its NodePort on
/// every node); retried briefly while the agents pick the Service up.
fn service_status(cluster: &Cluster) -> Result<bool> {
    if !Path::new(SERVICES_DIR).join("demo.yaml").exists() {
        return Ok(true);
    }
    let vip: SocketAddr = format!("{DEMO_CLUSTER_IP}:80").parse()?;
    let mut ok = true;
    println!(
        "service demo (ClusterIP {vip}, NodePort {DEMO_NODE_PORT}; Services in {SERVICES_DIR}):"
    );
    let mut line = |from: &str, to: SocketAddr| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let answer = loop {
            match http_get(from, to) {
                Some(a) => break Some(a),
                None if std::time::Instant::now() > deadline => break None,
                None => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        };
        ok &= answer.is_some();
        println!(
            "  {from:<24} -> {to:<18} {}",
            answer.map_or("UNREACHABLE".to_string(), |a| format!("answered by {a}"))
        );
    };
    for p in &cluster.pods {
        line(&p.netns, vip);
    }
    for from in &cluster.nodes {
        for to in &cluster.nodes {
            line(
                &from.netns,
                format!("{}:{DEMO_NODE_PORT}", to.underlay_ip).parse()?,
            );
        }
    }
    Ok(ok)
}

fn status(cluster: &Cluster) -> Result<()> {
    let blocks = blocks_by_node(cluster);
    println!(
        "{:<8} {:<14} {:<22} BLOCKS",
        "NODE", "UNDERLAY", "NAMESPACE"
    );
    for n in &cluster.nodes {
        let owned = blocks.get(&n.name).map(|b| b.join(",")).unwrap_or_default();
        println!(
            "{:<8} {:<14} {:<22} {}",
            n.name, n.underlay_ip, n.netns, owned
        );
    }
    println!();
    println!(
        "{:<14} {:<8} {:<18} {:<24}",
        "POD", "NODE", "ADDRESSES", "NAMESPACE"
    );
    for p in &cluster.pods {
        println!(
            "{:<14} {:<8} {:<18} {:<24}",
            p.name,
            p.node,
            p.ips.join(","),
            p.netns
        );
    }
    println!();
    let results = cluster.reachability();
    let same_node = |a: usize, b: usize| cluster.pods[a].node == cluster.pods[b].node;
    let count = |pred: &dyn Fn(usize, usize) -> bool| {
        let total = results.iter().filter(|(a, b, _)| pred(*a, *b)).count();
        let ok = results
            .iter()
            .filter(|(a, b, ok)| *ok && pred(*a, *b))
            .count();
        (ok, total)
    };
    let (same_ok, same_total) = count(&|a, b| same_node(a, b));
    let (cross_ok, cross_total) = count(&|a, b| !same_node(a, b));
    println!("reachability (pod -> pod, ping):");
    println!("  same node:   {same_ok}/{same_total}");
    println!("  cross node:  {cross_ok}/{cross_total}");
    for (a, b, ok) in &results {
        if !ok {
            println!(
                "  unreachable: {} -> {} ({})",
                cluster.pods[*a].name,
                cluster.pods[*b].name,
                cluster.pods[*b].ips.join(",")
            );
        }
    }
    let services_ok = service_status(cluster)?;
    println!(
        "store: {}   take it down with: make lab-down",
        cluster.store_url()
    );
    if same_ok != same_total || cross_ok != cross_total {
        bail!("some pods cannot reach each other");
    }
    if !services_ok {
        bail!("the demo Service is not reachable from everywhere");
    }
    Ok(())
}

/// Node name -> the blocks affine to it, read from the lab's store.
fn blocks_by_node(cluster: &Cluster) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let store = calyx_ipam::store::file::FileStore::new(cluster.state_dir().join("store"));
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else {
        return out;
    };
    let Ok(blocks) = runtime.block_on(calyx_ipam::store::Store::list(&store, "blocks/")) else {
        return out;
    };
    for (_, doc) in blocks {
        let Ok(block) = serde_json::from_str::<calyx_ipam::model::Block>(&doc.value) else {
            continue;
        };
        if let Some(node) = block.affinity {
            out.entry(node).or_default().push(block.cidr.to_string());
        }
    }
    out
}
