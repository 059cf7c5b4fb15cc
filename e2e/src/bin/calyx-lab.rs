//! calyx-lab: a Calyx cluster made of network namespaces on this machine.
//!
//!   calyx-lab up [--nodes 3] [--pods-per-node 2] [--plugin target/release/calyx]
//!                [--agent target/release/calyx-agent]
//!   calyx-lab status
//!   calyx-lab down
//!
//! Nodes sit on an underlay bridge (192.0.2.0/24) in a namespace of their own, each
//! running the real `calyx-agent`; pods are wired by the real `calyx` CNI binary; all
//! nodes share one embedded store under /run/calyx-lab. Only addresses inside these
//! namespaces are ever used.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4};
use calyx_e2e::lab::privileged;

const PREFIX: &str = "calyx-lab";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "help".into());
    let mut nodes = 3usize;
    let mut pods_per_node = 2usize;
    let mut plugin = PathBuf::from("target/release/calyx");
    let mut agent = PathBuf::from("target/release/calyx-agent");
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => nodes = value()?.parse().context("--nodes")?,
            "--pods-per-node" => pods_per_node = value()?.parse().context("--pods-per-node")?,
            "--plugin" => plugin = value()?.into(),
            "--agent" => agent = value()?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    match command.as_str() {
        "up" => up(nodes, pods_per_node, plugin, agent),
        "status" => status(&Cluster::load(PREFIX)?),
        "down" => {
            let removed = Cluster::destroy(PREFIX)?;
            println!("lab down: removed {removed} namespaces");
            Ok(())
        }
        _ => {
            println!("usage: calyx-lab up [--nodes N] [--pods-per-node N] [--plugin PATH] | status | down");
            Ok(())
        }
    }
}

fn up(nodes: usize, pods_per_node: usize, plugin: PathBuf, agent: PathBuf) -> Result<()> {
    if !privileged() {
        bail!("calyx-lab needs root and network namespaces");
    }
    if !(1..=200).contains(&nodes) {
        bail!("--nodes must be 1 to 200");
    }
    let spec = ClusterSpec {
        prefix: PREFIX.into(),
        plugin,
        agent: Some(agent),
        pools: vec![POOL_V4.into()],
        block_size: None,
        agent_args: vec![],
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
    status(&cluster)
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
    println!(
        "store: {}   take it down with: make lab-down",
        cluster.store_url()
    );
    if same_ok != same_total || cross_ok != cross_total {
        bail!("some pods cannot reach each other");
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
