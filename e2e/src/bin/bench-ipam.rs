//! bench-ipam: allocation rate and latency, for the embedded store and for etcd, with
//! one node and with three nodes contending. Each node is a separate `ipam-load`
//! process with its own store client, allocating --concurrency at a time (a node
//! starting several pods at once).
//!
//!   bench-ipam [--count 300] [--concurrency 4]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use calyx_e2e::etcd::Etcd;

fn main() -> Result<()> {
    let mut count = 300usize;
    let mut concurrency = 4usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--count" => count = value()?.parse()?,
            "--concurrency" => concurrency = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    let load = std::env::current_exe()?.with_file_name("ipam-load");
    if !load.exists() {
        bail!(
            "{} is missing: cargo build --release --workspace",
            load.display()
        );
    }
    println!("IPAM allocation: {count} per node, {concurrency} at a time per node");
    println!(
        "{:<10} {:>6} {:>8} {:>10} {:>10} {:>10}",
        "store", "nodes", "allocs", "allocs/s", "p50", "p99"
    );
    for store in ["embedded", "etcd"] {
        for nodes in [1, 3] {
            let dir = tempfile::tempdir()?;
            let etcd = if store == "etcd" {
                Some(Etcd::start().context("etcd is not installed (apt-get install etcd-server)")?)
            } else {
                None
            };
            let url = match &etcd {
                Some(e) => e.url(),
                None => format!("file://{}/store", dir.path().display()),
            };
            let (rate, p50, p99, total) = run(&load, &url, nodes, count, concurrency)?;
            println!(
                "{:<10} {:>6} {:>8} {:>10.0} {:>7.2} ms {:>7.2} ms",
                store, nodes, total, rate, p50, p99
            );
        }
    }
    println!("goals: >= 1000/s embedded, >= 300/s on etcd with 3 nodes, p99 < 30 ms");
    Ok(())
}

fn run(
    load: &PathBuf,
    url: &str,
    nodes: usize,
    count: usize,
    concurrency: usize,
) -> Result<(f64, f64, f64, usize)> {
    let started = Instant::now();
    let children: Vec<_> = (0..nodes)
        .map(|n| {
            Command::new(load)
                .args(["--datastore", url, "--node", &format!("node{n}")])
                .args([
                    "--count",
                    &count.to_string(),
                    "--concurrency",
                    &concurrency.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
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
