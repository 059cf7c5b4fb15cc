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

use anyhow::{bail, Result};
use calyx_e2e::cluster::{Cluster, ClusterSpec, POOL_V4};
use calyx_e2e::lab::privileged;
use clap::{Parser, Subcommand};

const PREFIX: &str = "calyx-lab";

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
            println!("lab down: removed {removed} namespaces");
            Ok(())
        }
    }
}

fn up(nodes: usize, pods_per_node: usize, plugin: PathBuf, agent: PathBuf) -> Result<()> {
    if !privileged() {
        bail!("calyx-lab needs root and network namespaces");
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
