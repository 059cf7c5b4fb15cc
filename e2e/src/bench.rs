//! What the agent benchmarks share: object files written the way an editor would
//! (whole, by rename), the agent's log read back as timed events, its memory, and the
//! floor (the final rules loaded into an empty namespace in one call).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::cluster::{Cluster, ClusterSpec, POOL_V4};
use crate::lab::{must, sh};

/// Writes `items` as one `kind: List` file, atomically.
pub fn write_list(dir: &Path, file: &str, items: Vec<Value>) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items}))?,
    )?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

/// A log line's time, in seconds since the epoch.
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let t: jiff::Timestamp = stamp.parse().ok()?;
    Some(t.as_microsecond() as f64 / 1e6)
}

/// A `name=value` field of a log line.
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
}

/// The first node's agent log.
pub fn agent_log(c: &Cluster) -> String {
    std::fs::read_to_string(c.node_state_dir(&c.nodes[0]).join("agent.log")).unwrap_or_default()
}

/// Waits for the first line after byte `from` of the first node's agent log that
/// `parse` takes; `what` names it in the error.
pub fn wait_for_line<T>(
    c: &Cluster,
    from: usize,
    timeout: std::time::Duration,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent_log(c);
        if let Some(found) = log[from.min(log.len())..].lines().find_map(&parse) {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!(
                "no {what} after {timeout:?}; log:\n{}",
                c.agent_log_tail(0, 20)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The first node's agent process.
pub fn agent_pid(c: &Cluster) -> Result<u32> {
    let path = c.node_state_dir(&c.nodes[0]).join("agent.pid");
    Ok(std::fs::read_to_string(path)?.trim().parse()?)
}

/// A `/proc/<pid>/status` figure in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Seconds since the epoch, as the log's times.
pub fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The value at `p` (0..=1) of sorted `values`.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    values[((values.len() - 1) as f64 * p).round() as usize]
}

/// A one-node cluster `prefix` whose agent takes `agent_args`, started.
pub fn one_node(prefix: &str, plugin: &Path, agent: &Path, agent_args: &[&str]) -> Result<Cluster> {
    Cluster::create(&ClusterSpec {
        prefix: prefix.to_string(),
        plugin: plugin.to_path_buf(),
        agent: Some(agent.to_path_buf()),
        pools: vec![POOL_V4.to_string()],
        block_size: None,
        agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        nodes: 1,
        etcd: false,
    })
}

/// The first node's agent: (RSS, peak RSS) in MiB.
pub fn agent_memory(c: &Cluster) -> Result<(f64, f64)> {
    let pid = agent_pid(c)?;
    Ok((
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0,
    ))
}

/// Removes a benchmark's cluster when it goes out of scope, failed or not.
pub struct Destroy(pub String);

impl Drop for Destroy {
    fn drop(&mut self) {
        let _ = Cluster::destroy(&self.0);
    }
}

/// Seconds to load `rules` into a fresh namespace in one call of `loader`
/// (`nftables`: nft -f; `ipvs`: ipvsadm -R; else iptables-restore).
pub fn floor(loader: &str, rules: &str) -> Result<f64> {
    let netns = format!("bench-floor-{}", std::process::id());
    must("ip", &["netns", "add", &netns]);
    let file = std::env::temp_dir().join(format!("{netns}.rules"));
    std::fs::write(&file, rules)?;
    // IPVS takes real servers only once the namespace has a local routing table.
    must("ip", &["-n", &netns, "link", "set", "lo", "up"]);
    let file_arg = file.display().to_string();
    let started = Instant::now();
    let out = match loader {
        // nft reads the file itself: no shell in the measured time.
        "nftables" => sh("ip", &["netns", "exec", &netns, "nft", "-f", &file_arg]),
        other => {
            let tool = if other == "ipvs" {
                "ipvsadm -R"
            } else {
                "iptables-restore"
            };
            let script = format!("{tool} < {file_arg}");
            sh("ip", &["netns", "exec", &netns, "sh", "-c", &script])
        }
    };
    let took = started.elapsed().as_secs_f64();
    sh("ip", &["netns", "del", &netns]);
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!(
            "floor load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}
