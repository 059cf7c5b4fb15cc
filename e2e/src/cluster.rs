//! A cluster of network namespaces that outlives the process that built it: an
//! underlay switch (a bridge in a namespace of its own), node namespaces on it, and pod
//! namespaces wired through the real `calyx` plugin, sharing one embedded store.
//! `calyx-lab` uses it; every name starts with the cluster's prefix, so `destroy`
//! finds everything again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::etcd::Etcd;
use crate::lab::{must, ping, sh};

/// Where a cluster keeps its store and its description.
pub fn state_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/{prefix}"))
}

/// The plugin and agent binaries of a build, given the agent's path (a test has it as
/// `env!("CARGO_BIN_EXE_calyx-agent")`; the plugin is built beside it).
/// CALYX_BIN_DIR, when set, names another directory holding both (the VM suite runs
/// the optimised static build: the debug one is slow under software emulation).
pub fn binaries_beside(agent: &str) -> (PathBuf, PathBuf) {
    let mut agent = PathBuf::from(agent);
    if let Some(dir) = std::env::var_os("CALYX_BIN_DIR") {
        agent = PathBuf::from(dir).join("calyx-agent");
    }
    let plugin = agent.with_file_name("calyx");
    assert!(
        plugin.exists(),
        "{} is missing: run `cargo build --workspace` first (make test does)",
        plugin.display()
    );
    (plugin, agent)
}

pub const POOL_V4: &str = "10.244.0.0/16";
pub const POOL_V6: &str = "fd00:10:244::/56";
pub const UNDERLAY_PREFIX: &str = "192.0.2";

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub underlay_ip: String,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub node: String,
    pub ips: Vec<String>,
}

pub struct Cluster {
    pub prefix: String,
    pub plugin: PathBuf,
    /// The agent binary; None for a cluster without agents (no cross-node traffic).
    pub agent: Option<PathBuf>,
    /// Pool CIDRs the agents create.
    pub pools: Vec<String>,
    /// Block prefix length of the IPv4 pools (default /26).
    pub block_size: Option<u8>,
    /// Extra agent flags (e.g. shorter resync or node timeout for tests).
    pub agent_args: Vec<String>,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// A real etcd on the underlay host 192.0.2.2, when the cluster uses one; it is
    /// stopped when the cluster value is dropped.
    pub etcd: Option<Etcd>,
}

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub prefix: String,
    pub plugin: PathBuf,
    pub agent: Option<PathBuf>,
    pub pools: Vec<String>,
    /// Block prefix length of the IPv4 pools (default /26).
    pub block_size: Option<u8>,
    pub agent_args: Vec<String>,
    pub nodes: usize,
    /// Use a real etcd (on an underlay host) instead of the embedded file store.
    pub etcd: bool,
}

impl Cluster {
    /// Builds the switch and `nodes` node namespaces. Fails if a cluster with this
    /// prefix exists already.
    pub fn create(spec: &ClusterSpec) -> Result<Cluster> {
        let (prefix, nodes) = (spec.prefix.as_str(), spec.nodes);
        let state = state_dir(prefix);
        if state.exists() {
            bail!(
                "{} exists: the lab is up already (take it down first)",
                state.display()
            );
        }
        std::fs::create_dir_all(&state)?;
        let canonical =
            |p: &Path| std::fs::canonicalize(p).with_context(|| format!("binary {}", p.display()));
        let mut cluster = Cluster {
            prefix: prefix.to_string(),
            plugin: canonical(&spec.plugin)?,
            agent: spec.agent.as_deref().map(canonical).transpose()?,
            pools: spec.pools.clone(),
            block_size: spec.block_size,
            agent_args: spec.agent_args.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            etcd: None,
        };
        let sw = cluster.switch_netns();
        must("ip", &["netns", "add", &sw]);
        must("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        must("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        if spec.etcd {
            let host = cluster.add_host("etcd", 2)?;
            cluster.etcd = Some(
                Etcd::start_in(Some(&host), &format!("{UNDERLAY_PREFIX}.2"))
                    .context("etcd is not installed")?,
            );
        }
        for i in 1..=nodes {
            cluster.add_node(i)?;
        }
        cluster.save()?;
        for i in 0..nodes {
            cluster.start_agent(i)?;
        }
        for i in 0..nodes {
            cluster.wait_agent_ready(i)?;
        }
        Ok(cluster)
    }

    pub fn node_state_dir(&self, node: &Node) -> PathBuf {
        self.state_dir().join(&node.name)
    }

    fn agent_pid_file(&self, node: &Node) -> PathBuf {
        self.node_state_dir(node).join("agent.pid")
    }

    /// Starts the node's agent in its namespace, detached (it outlives this process),
    /// logging to `<state>/<node>/agent.log`. No-op for a cluster without agents.
    pub fn start_agent(&self, index: usize) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let Some(agent) = &self.agent else {
            return Ok(());
        };
        let node = &self.nodes[index];
        let dir = self.node_state_dir(node);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(agent)
            .args(["--node-name", &node.name])
            .args(["--datastore", &self.store_url()])
            .args(["--state-dir", &dir.display().to_string()])
            .args(["--pool", &self.pools.join(",")])
            .args(
                self.block_size
                    .map(|size| ["--block-size".to_string(), size.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(["--metrics-addr", "127.0.0.1:9099"])
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("start calyx-agent")?;
        std::fs::write(self.agent_pid_file(node), child.id().to_string())?;
        Ok(())
    }

    /// Waits until the agent has written the plugin's state files and created its
    /// VXLAN device.
    pub fn wait_agent_ready(&self, index: usize) -> Result<()> {
        if self.agent.is_none() {
            return Ok(());
        }
        let node = &self.nodes[index];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let has_mtu = self.node_state_dir(node).join("mtu").exists();
            let has_device = sh("ip", &["-n", &node.netns, "link", "show", "vxlan.calyx"])
                .status
                .success();
            if has_mtu && has_device {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.node_state_dir(node).join("agent.log"))
                    .unwrap_or_default();
                bail!("agent on {} not ready after 20 s; log:\n{log}", node.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of the node's agent log (for a failing test's message).
    pub fn agent_log_tail(&self, index: usize, lines: usize) -> String {
        let path = self.node_state_dir(&self.nodes[index]).join("agent.log");
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `signal` (e.g. "KILL", "TERM") to the node's agent.
    pub fn signal_agent(&self, index: usize, signal: &str) -> Result<()> {
        let node = &self.nodes[index];
        let pid = std::fs::read_to_string(self.agent_pid_file(node)).context("agent pid file")?;
        // nsenter execs the agent, so the recorded pid is the agent's own.
        sh("kill", &[&format!("-{signal}"), pid.trim()]);
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{}", pid.trim())).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    fn switch_netns(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.prefix)
    }

    pub fn store_url(&self) -> String {
        match &self.etcd {
            Some(etcd) => etcd.url(),
            None => format!("file://{}/store", self.state_dir().display()),
        }
    }

    /// Node `index` (1-based): eth0 on the switch with 192.0.2.(10+index)/24, forwarding
    /// on, and a default route into the switch so the node has a source address.
    pub fn add_node(&mut self, index: usize) -> Result<Node> {
        let name = format!("node{index}");
        let netns = format!("{}-{name}", self.prefix);
        let underlay_ip = format!("{UNDERLAY_PREFIX}.{}", 10 + index);
        let sw = self.switch_netns();
        let port = format!("port{index}");
        must("ip", &["netns", "add", &netns]);
        must("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        must(
            "ip",
            &[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ],
        );
        must(
            "ip",
            &["-n", &sw, "link", "set", &port, "master", "br0", "up"],
        );
        must(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{underlay_ip}/24"),
                "dev",
                "eth0",
            ],
        );
        must("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        must(
            "ip",
            &[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &format!("{UNDERLAY_PREFIX}.1"),
            ],
        );
        must(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        let node = Node {
            name,
            netns,
            underlay_ip,
        };
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// The plugin's config on a node. With agents, node name and MTU come from the
    /// files the agent writes, as on a real node.
    fn conf(&self, node: &Node) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "calyx-lab",
            "type": "calyx",
            "datastore": self.store_url(),
            "ipam": {"pools": self.pools}
        });
        if let Some(size) = self.block_size {
            conf["ipam"]["blockSize"] = size.into();
        }
        if self.agent.is_some() {
            conf["stateDir"] = self.node_state_dir(node).display().to_string().into();
        } else {
            conf["nodeName"] = node.name.clone().into();
        }
        conf
    }

    /// A host on the underlay that is not a node (192.0.2.100): the "world" pods reach
    /// through masquerade.
    pub fn add_world(&self) -> Result<String> {
        self.add_host("world", 100)
    }

    /// A plain host on the underlay: namespace `<prefix>-<name>` with 192.0.2.<octet>.
    pub fn add_host(&self, name: &str, octet: u8) -> Result<String> {
        let netns = format!("{}-{name}", self.prefix);
        let sw = self.switch_netns();
        let port = format!("port-{name}");
        let address = format!("{UNDERLAY_PREFIX}.{octet}/24");
        must("ip", &["netns", "add", &netns]);
        must("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        let veth = ["-n", &sw, "link", "add", &port, "type", "veth"];
        must(
            "ip",
            &[&veth[..], &["peer", "name", "eth0", "netns", &netns]].concat(),
        );
        must(
            "ip",
            &["-n", &sw, "link", "set", &port, "master", "br0", "up"],
        );
        must(
            "ip",
            &["-n", &netns, "addr", "add", &address, "dev", "eth0"],
        );
        must("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        Ok(netns)
    }

    /// Creates a pod namespace on `node` and runs CNI ADD for it, as a runtime would
    /// (as pod `name` of the Kubernetes namespace `lab`).
    pub fn add_pod(&mut self, node_index: usize, name: &str) -> Result<Pod> {
        self.add_pod_as(node_index, name, ("lab", name))
    }

    /// `add_pod`, with the Kubernetes namespace and pod name the runtime passes.
    pub fn add_pod_as(
        &mut self,
        node_index: usize,
        name: &str,
        (k8s_namespace, k8s_name): (&str, &str),
    ) -> Result<Pod> {
        let node = self.nodes[node_index].clone();
        let netns = format!("{}-{name}", self.prefix);
        must("ip", &["netns", "add", &netns]);
        let result = self.cni(&node, "ADD", name, (k8s_namespace, k8s_name), &netns)?;
        let ips = result["ips"]
            .as_array()
            .map(|ips| {
                ips.iter()
                    .filter_map(|ip| ip["address"].as_str())
                    .map(|a| a.split('/').next().unwrap_or(a).to_string())
                    .collect()
            })
            .unwrap_or_default();
        let pod = Pod {
            name: name.to_string(),
            netns,
            node: node.name.clone(),
            ips,
        };
        self.pods.push(pod.clone());
        self.save()?;
        Ok(pod)
    }

    fn cni(
        &self,
        node: &Node,
        command: &str,
        pod: &str,
        (k8s_namespace, k8s_name): (&str, &str),
        netns: &str,
    ) -> Result<Value> {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.netns))
            .arg(&self.plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("{}-{pod}", self.prefix))
            .env("CNI_NETNS", format!("/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={k8s_namespace};K8S_POD_NAME={k8s_name}"
                ),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run the calyx plugin")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(self.conf(node).to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "CNI {command} {pod}: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_str(&stdout).unwrap_or(Value::Null))
    }

    /// For every ordered pair of pods, whether the first reaches each address of the
    /// second (one ping each, in parallel).
    pub fn reachability(&self) -> Vec<(usize, usize, bool)> {
        let pairs: Vec<(usize, usize)> = (0..self.pods.len())
            .flat_map(|a| {
                (0..self.pods.len())
                    .filter(move |b| *b != a)
                    .map(move |b| (a, b))
            })
            .collect();
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .iter()
                .map(|&(a, b)| {
                    s.spawn(move || {
                        let from = &self.pods[a];
                        let ok = self.pods[b].ips.iter().all(|ip| ping(&from.netns, ip));
                        (a, b, ok)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ping thread"))
                .collect()
        })
    }

    fn save(&self) -> Result<()> {
        let nodes: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| json!({"name": n.name, "netns": n.netns, "underlayIp": n.underlay_ip}))
            .collect();
        let pods: Vec<Value> = self
            .pods
            .iter()
            .map(|p| json!({"name": p.name, "netns": p.netns, "node": p.node, "ips": p.ips}))
            .collect();
        let doc = json!({"plugin": self.plugin, "agent": self.agent, "pools": self.pools,
                         "blockSize": self.block_size, "agentArgs": self.agent_args, "nodes": nodes, "pods": pods});
        std::fs::write(
            self.state_dir().join("cluster.json"),
            serde_json::to_vec_pretty(&doc)?,
        )?;
        Ok(())
    }

    /// Loads the description `create` and `add_pod` saved.
    pub fn load(prefix: &str) -> Result<Cluster> {
        let path = state_dir(prefix).join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no lab is up ({} missing)", path.display()))?;
        let doc: Value = serde_json::from_str(&text)?;
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(Cluster {
            prefix: prefix.to_string(),
            plugin: PathBuf::from(s(&doc["plugin"])),
            agent: doc["agent"].as_str().map(PathBuf::from),
            pools: doc["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect(),
            etcd: None,
            block_size: doc["blockSize"].as_u64().and_then(|n| u8::try_from(n).ok()),
            agent_args: doc["agentArgs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect(),
            nodes: doc["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| Node {
                    name: s(&n["name"]),
                    netns: s(&n["netns"]),
                    underlay_ip: s(&n["underlayIp"]),
                })
                .collect(),
            pods: doc["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| Pod {
                    name: s(&p["name"]),
                    netns: s(&p["netns"]),
                    node: s(&p["node"]),
                    ips: p["ips"].as_array().into_iter().flatten().map(s).collect(),
                })
                .collect(),
        })
    }

    /// Stops the agents, removes every namespace whose name starts with the prefix,
    /// and the state dir.
    pub fn destroy(prefix: &str) -> Result<usize> {
        if let Ok(cluster) = Cluster::load(prefix) {
            for i in 0..cluster.nodes.len() {
                let _ = cluster.signal_agent(i, "KILL");
            }
        }
        let listing = must("ip", &["netns", "list"]);
        let mut removed = 0;
        for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(&format!("{prefix}-")) {
                // Whatever still runs in it (a lab's demo server) goes with it.
                let pids = sh("ip", &["netns", "pids", name]);
                for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                    sh("kill", &["-KILL", pid]);
                }
                let out = sh("ip", &["netns", "del", name]);
                if out.status.success() {
                    removed += 1;
                }
            }
        }
        let state = state_dir(prefix);
        if state.exists() {
            std::fs::remove_dir_all(&state)?;
        }
        Ok(removed)
    }
}
