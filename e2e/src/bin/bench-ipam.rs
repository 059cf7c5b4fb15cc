//! bench-ipam: allocation rate and latency, for the embedded store and for etcd.
//!
//! 1. One node and three nodes contending. Each node is a separate `ipam-load` process
//!    with its own store client, allocating --concurrency at a time.
//! 2. A burst on one node as the CNI plugin sees it: --burst separate processes (one
//!    per pod sandbox being set up) allocating 10 each at once, with and without the
//!    host lock the plugin takes (without it they conflict on the node's block).
//!
//!   bench-ipam [--count 300] [--concurrency 4] [--burst 20]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use calyx_e2e::etcd::Etcd;

fn main() -> Result<()> {
    let mut count = 300usize;
    let mut concurrency = 4usize;
    let mut burst = 20usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--count" => count = value()?.parse()?,
            "--concurrency" => concurrency = value()?.parse()?,
            "--burst" => burst = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let load_bin = std::env::current_exe()?.with_file_name("ipam-load");
    if !load_bin.exists() {
        bail!(
            "{} is missing: cargo build --release --workspace",
            load_bin.display()
        );
    }
    println!("IPAM allocation: {count} per node, {concurrency} at a time per node");
    println!(
        "{:<10} {:>6} {:>8} {:>10} {:>10} {:>10}",
        "store", "nodes", "allocs", "allocs/s", "p50", "p99"
    );
    for store in ["embedded", "etcd"] {
        for nodes in [1, 3] {
            let (_dir, _etcd, url) = fresh_store(store)?;
            let load = Load {
                nodes,
                processes_per_node: 1,
                count,
                concurrency,
                host_lock: false,
            };
            let (rate, p50, p99, total) = run(&load_bin, &url, &load)?;
            println!(
                "{:<10} {:>6} {:>8} {:>10.0} {:>7.2} ms {:>7.2} ms",
                store, nodes, total, rate, p50, p99
            );
        }
    }
    println!("goals: >= 1000/s embedded, >= 300/s on etcd with 3 nodes, p99 < 30 ms");
    println!();
    println!("burst on one node: {burst} processes at once, 10 allocations each");
    println!(
        "{:<10} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "store", "host lock", "allocs", "allocs/s", "p50", "p99"
    );
    for store in ["embedded", "etcd"] {
        for host_lock in [false, true] {
            let (_dir, _etcd, url) = fresh_store(store)?;
            let load = Load {
                nodes: 1,
                processes_per_node: burst,
                count: 10,
                concurrency: 1,
                host_lock,
            };
            let (rate, p50, p99, total) = run(&load_bin, &url, &load)?;
            println!(
                "{:<10} {:>10} {:>8} {:>10.0} {:>7.2} ms {:>7.2} ms",
                store,
                if host_lock { "yes" } else { "no" },
                total,
                rate,
                p50,
                p99
            );
        }
    }
    Ok(())
}

/// An empty store of the kind named: a temporary file store or a fresh etcd (kept
/// running while the returned guard lives).
fn fresh_store(kind: &str) -> Result<(tempfile::TempDir, Option<Etcd>, String)> {
    let dir = tempfile::tempdir()?;
    if kind == "etcd" {
        let etcd = Etcd::start().context("etcd is not installed (apt-get install etcd-server)")?;
        let url = etcd.url();
        return Ok((dir, Some(etcd), url));
    }
    let url = format!("file://{}/store", dir.path().display());
    Ok((dir, None, url))
}

struct Load {
    nodes: usize,
    processes_per_node: usize,
    /// Allocations per process.
    count: usize,
    concurrency: usize,
    /// Processes of one node take turns on a per-node lock file, as the plugin does.
    host_lock: bool,
}

fn run(load_bin: &PathBuf, url: &str, load: &Load) -> Result<(f64, f64, f64, usize)> {
    let locks = tempfile::tempdir()?;
    let started = Instant::now();
    let children: Vec<_> = (0..load.nodes)
        .flat_map(|n| (0..load.processes_per_node).map(move |_| n))
        .map(|n| {
            let mut command = Command::new(load_bin);
            command
                .args(["--datastore", url, "--node", &format!("node{n}")])
                .args([
                    "--count",
                    &load.count.to_string(),
                    "--concurrency",
                    &load.concurrency.to_string(),
                ]);
            if load.host_lock {
                command
                    .arg("--host-lock")
                    .arg(locks.path().join(format!("node{n}.lock")));
            }
            command.stdout(Stdio::piped()).spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut latencies = Vec::new();
    for child in children {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("ipam-load failed");
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        latencies.extend(
            doc["latenciesUs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_u64()),
        );
    }
    let wall = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: usize| {
        latencies[((latencies.len() * p).div_ceil(100).max(1) - 1).min(latencies.len() - 1)] as f64
            / 1000.0
    };
    Ok((
        latencies.len() as f64 / wall,
        pct(50),
        pct(99),
        latencies.len(),
    ))
}
