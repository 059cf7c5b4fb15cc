//! ipam-load: allocates addresses as one node would, for tests and bench-ipam.
//!
//!   ipam-load --datastore URL --node NAME --count N [--concurrency C] [--pool CIDR]
//!             [--host-lock PATH]   (take turns with other processes and remember the
//!                                   node's blocks in PATH.known-blocks.json, as the plugin does)
//!
//! Handles are `load.<node>.<pid>.<i>` for pod `load/<node>-<pid>-<i>`. Prints one JSON
//! line at the end: {"allocated": n, "seconds": s, "latenciesUs": [...]}.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use calyx_ipam::allocator::AllocationRequest;
use calyx_ipam::model::{AllocationAttrs, Pool};
use calyx_ipam::{store, Ipam};
use futures::StreamExt;

fn main() -> Result<()> {
    let mut datastore = String::new();
    let mut node = String::new();
    let mut count = 100usize;
    let mut concurrency = 1usize;
    let mut host_lock: Option<String> = None;
    let mut pool = "10.244.0.0/16".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--datastore" => datastore = value()?,
            "--node" => node = value()?,
            "--count" => count = value()?.parse().context("--count")?,
            "--concurrency" => concurrency = value()?.parse().context("--concurrency")?,
            "--pool" => pool = value()?,
            "--host-lock" => host_lock = Some(value()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if datastore.is_empty() || node.is_empty() {
        bail!("--datastore and --node are required");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store = store::open(&datastore)?;
        let mut ipam = Ipam::new(store.as_ref());
        if let Some(path) = &host_lock {
            // As the plugin: take turns, and remember the node's blocks for the next
            // process.
            ipam = ipam
                .with_host_lock(path)
                .with_known_blocks_file(format!("{path}.known-blocks.json"));
        }
        let cidr = pool.parse().with_context(|| format!("--pool {pool}"))?;
        ipam.ensure_pools(&[Pool::with_defaults(cidr, None).map_err(anyhow::Error::msg)?]).await?;
        let pid = std::process::id();
        let started = Instant::now();
        let results: Vec<Result<u64>> = futures::stream::iter(0..count)
            .map(|i| {
                let ipam = &ipam;
                let node = &node;
                async move {
                    let request = AllocationRequest {
                        handle_id: format!("load.{node}.{pid}.{i}"),
                        network: "load".into(),
                        attrs: AllocationAttrs {
                            pod: Some(format!("{node}-{pid}-{i}")),
                            namespace: Some("load".into()),
                            node: node.clone(),
                            time: calyx_ipam::unix_now(),
                            ..Default::default()
                        },
                        host_interface: None,
                        pool_filter: vec![],
                    };
                    let t = Instant::now();
                    ipam.allocate(&request).await?;
                    Ok(t.elapsed().as_micros() as u64)
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        for r in results {
            latencies.push(r?);
        }
        println!(
            "{}",
            serde_json::json!({"allocated": latencies.len(), "seconds": seconds, "latenciesUs": latencies})
        );
        Ok(())
    })
}
