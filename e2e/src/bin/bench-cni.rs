//! bench-cni: ADD and DEL latency of the calyx CNI plugin against Debian's reference
//! `ptp` + `host-local` plugins, side by side in one run, on namespaces it creates.
//!
//! calyx runs twice: as without NetworkPolicy, and with its pods held (their namespace
//! named by the agent as one with policies), for what holding costs ADD.
//!
//! The benchmark enters the lab's node namespace once and execs each plugin directly,
//! as a runtime does, so every figure includes the plugin's process start. The cost of
//! starting a trivial process is printed as the floor.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use calyx_e2e::lab::{privileged, Lab};
use serde_json::{json, Value};

struct Plugin {
    label: &'static str,
    binary: PathBuf,
    conf: Value,
    /// CNI_PATH for plugins that delegate (ptp calls host-local).
    cni_path: String,
    /// The pods' Kubernetes namespace.
    namespace: &'static str,
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut calyx = PathBuf::from("target/release/calyx");
    let mut reference_dir = PathBuf::from("/usr/lib/cni");
    let mut pods = 200usize;
    let mut concurrent = 50usize;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--calyx" => calyx = value()?.into(),
            "--reference-dir" => reference_dir = value()?.into(),
            "--pods" => pods = value()?.parse().context("--pods")?,
            "--concurrent" => concurrent = value()?.parse().context("--concurrent")?,
            other => bail!("unknown argument {other}; see the header of e2e/src/bin/bench-cni.rs"),
        }
    }
    if !privileged() {
        bail!("bench-cni needs root and network namespaces");
    }
    let calyx = std::fs::canonicalize(&calyx)
        .with_context(|| format!("calyx binary {}", calyx.display()))?;
    let ptp = reference_dir.join("ptp");
    if !ptp.exists() || !reference_dir.join("host-local").exists() {
        bail!(
            "{} lacks ptp/host-local: apt-get install containernetworking-plugins",
            reference_dir.display()
        );
    }

    let mut lab = Lab::new(&calyx);
    let data = lab.dir.path().to_path_buf();
    // calyx twice, one state directory: pods of a namespace without policies, and
    // pods held (the agent named their namespace as one with policies).
    let state = data.join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::write(
        state.join(calyx_dataplane::POLICY_NAMESPACES_FILE),
        "bench-policy\n",
    )?;
    let calyx_conf = lab.conf(json!({"name": "bench", "stateDir": state}));
    let plugins = [
        Plugin {
            label: "calyx",
            binary: calyx.clone(),
            conf: calyx_conf.clone(),
            cni_path: String::new(),
            namespace: "bench",
        },
        Plugin {
            label: "calyx, pods held",
            binary: calyx.clone(),
            conf: calyx_conf,
            cni_path: String::new(),
            namespace: "bench-policy",
        },
        Plugin {
            label: "ptp + host-local",
            binary: ptp,
            conf: json!({
                "cniVersion": "1.0.0", "name": "bench", "type": "ptp", "mtu": 1450, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.245.0.0/16"}]],
                         "dataDir": data.join("host-local"), "routes": [{"dst": "0.0.0.0/0"}]}
            }),
            cni_path: reference_dir.display().to_string(),
            namespace: "bench",
        },
    ];
    let pod_sets: Vec<Vec<String>> = plugins
        .iter()
        .map(|_| (0..pods.max(concurrent)).map(|_| lab.pod()).collect())
        .collect();

    // From here on, every child process starts in the node namespace.
    netns_rs::get_from_path(format!("/run/netns/{}", lab.node))?
        .enter()
        .context("enter the node namespace")?;

    let mut floor = Vec::new();
    for _ in 0..pods {
        let started = Instant::now();
        Command::new("/bin/true").status()?;
        floor.push(started.elapsed());
    }

    // Sequential: the plugins take turns pod by pod, so drift in the machine's load
    // affects both alike.
    let mut add = vec![Vec::new(); plugins.len()];
    let mut del = vec![Vec::new(); plugins.len()];
    for (command, samples) in [("ADD", &mut add), ("DEL", &mut del)] {
        for i in 0..pods {
            // Each plugin's own container IDs: one ID twice is a retried ADD.
            for (p, ((plugin, set), taken)) in plugins
                .iter()
                .zip(&pod_sets)
                .zip(samples.iter_mut())
                .enumerate()
            {
                taken.push(timed(plugin, command, &format!("p{p}-seq{i}"), &set[i])?);
            }
        }
    }
    let mut burst = Vec::new();
    for (p, (plugin, set)) in plugins.iter().zip(&pod_sets).enumerate() {
        let started = Instant::now();
        let children: Vec<Child> = set[..concurrent]
            .iter()
            .enumerate()
            .map(|(i, pod)| spawn(plugin, "ADD", &format!("p{p}-burst{i}"), pod))
            .collect::<Result<_>>()?;
        for child in children {
            check(plugin, "ADD", child)?;
        }
        burst.push(started.elapsed());
        for (i, pod) in set[..concurrent].iter().enumerate() {
            timed(plugin, "DEL", &format!("p{p}-burst{i}"), pod)?;
        }
    }

    println!("CNI latency: {pods} pods in sequence, then {concurrent} ADDs at once (wall time)");
    println!(
        "{:<20} {:>9} {:>9} {:>9} {:>9} {:>16}",
        "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "concurrent ADDs"
    );
    for (p, plugin) in plugins.iter().enumerate() {
        println!(
            "{:<20} {:>9} {:>9} {:>9} {:>9} {:>16}",
            plugin.label,
            ms(percentile(&mut add[p], 50)),
            ms(percentile(&mut add[p], 99)),
            ms(percentile(&mut del[p], 50)),
            ms(percentile(&mut del[p], 99)),
            ms(burst[p]),
        );
    }
    println!(
        "{:<20} {:>9} {:>9}",
        "exec floor (true)",
        ms(percentile(&mut floor, 50)),
        ms(percentile(&mut floor, 99))
    );
    let ratio =
        percentile(&mut add[0], 50).as_secs_f64() / percentile(&mut add[2], 50).as_secs_f64();
    let held_delta =
        percentile(&mut add[1], 50).as_secs_f64() - percentile(&mut add[0], 50).as_secs_f64();
    println!(
        "calyx ADD p50 with its pods held (NetworkPolicy in the namespace) - without = {:+.2} ms (goal <= +1 ms)",
        held_delta * 1e3
    );
    println!(
        "calyx ADD p50 / ptp+host-local ADD p50 = {ratio:.2} (goal <= 0.50); calyx ADD p99 = {} (goal < 20 ms)",
        ms(percentile(&mut add[0], 99))
    );
    drop(lab);
    Ok(())
}

fn spawn(plugin: &Plugin, command: &str, container: &str, pod: &str) -> Result<Child> {
    let mut child = Command::new(&plugin.binary)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &plugin.cni_path)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={container}",
                plugin.namespace
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", plugin.binary.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(plugin.conf.to_string().as_bytes())?;
    Ok(child)
}

fn check(plugin: &Plugin, command: &str, child: Child) -> Result<()> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} {command} failed: {}{}",
            plugin.label,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn timed(plugin: &Plugin, command: &str, container: &str, pod: &str) -> Result<Duration> {
    let started = Instant::now();
    let child = spawn(plugin, command, container, pod)?;
    check(plugin, command, child)?;
    Ok(started.elapsed())
}

fn percentile(samples: &mut [Duration], pct: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * pct).div_ceil(100).max(1) - 1;
    samples[rank.min(samples.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
