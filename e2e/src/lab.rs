//! A one-node test lab: a "node" network namespace the plugin runs in (so host-side
//! veths and routes never touch the real host), pod namespaces, and a private store.
//! Everything is removed when the lab is dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub const NODE_V4: &str = "192.0.2.1";
pub const NODE_V6: &str = "2001:db8::1";

/// Privileged tests need root and network namespaces. In CI (`CI` set) their absence
/// is a failure; elsewhere the test prints why it skips.
pub fn privileged() -> bool {
    let why = if !is_root() {
        Some("not running as root".to_string())
    } else if !run_ok("ip", &["netns", "list"]) {
        Some("`ip netns` does not work here (is iproute2 installed?)".to_string())
    } else if !run_ok("ping", &["-V"]) {
        Some("ping is not installed (iputils-ping)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("privileged test cannot run in CI: {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn run_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

/// Polls `ok` every 100 ms; panics naming `what` when `timeout` passes first.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn must(cmd: &str, args: &[&str]) -> String {
    let out = sh(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The outcome of one plugin call.
#[derive(Debug)]
pub struct Call {
    pub ok: bool,
    pub stdout: Value,
    pub stderr: String,
}

impl Call {
    pub fn code(&self) -> u64 {
        self.stdout["code"].as_u64().unwrap_or(0)
    }

    pub fn ips(&self) -> Vec<String> {
        self.stdout["ips"]
            .as_array()
            .map(|ips| {
                ips.iter()
                    .map(|ip| {
                        let a = ip["address"].as_str().unwrap();
                        a.split('/').next().unwrap().to_string()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct Lab {
    /// The CNI plugin binary the lab runs.
    pub plugin: PathBuf,
    pub node: String,
    namespaces: Vec<String>,
    pub dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl Lab {
    pub fn new(plugin: impl Into<PathBuf>) -> Lab {
        let node = unique_name("node");
        must("ip", &["netns", "add", &node]);
        let lab = Lab {
            plugin: plugin.into(),
            node: node.clone(),
            namespaces: vec![node.clone()],
            dir: tempfile::tempdir().unwrap(),
            mounts: Vec::new(),
        };
        let n = &node;
        must("ip", &["-n", n, "link", "set", "lo", "up"]);
        must(
            "ip",
            &[
                "-n",
                n,
                "addr",
                "add",
                &format!("{NODE_V4}/32"),
                "dev",
                "lo",
            ],
        );
        must(
            "ip",
            &[
                "-n",
                n,
                "addr",
                "add",
                &format!("{NODE_V6}/128"),
                "dev",
                "lo",
            ],
        );
        lab
    }

    /// A new, empty pod namespace; returns its name.
    pub fn pod(&mut self) -> String {
        let name = unique_name("pod");
        must("ip", &["netns", "add", &name]);
        self.namespaces.push(name.clone());
        name
    }

    pub fn store_url(&self) -> String {
        format!("file://{}/store", self.dir.path().display())
    }

    /// A network config for this lab, with `extra` merged over the defaults.
    pub fn conf(&self, extra: Value) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "calyx-test",
            "type": "calyx",
            "datastore": self.store_url(),
            "nodeName": "node-1",
            "mtu": 1450,
            "ipam": {"pools": ["10.244.0.0/16"]}
        });
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        conf
    }

    /// Runs the plugin inside the node namespace with exactly the given environment,
    /// as a runtime would.
    pub fn cni_raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Call {
        use std::io::Write;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node))
            .arg(&self.plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn calyx");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let stdout = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
        };
        Call {
            ok: out.status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn cni(&self, command: &str, conf: &Value, container: &str, pod_ns: Option<&str>) -> Call {
        let netns = pod_ns
            .map(|p| format!("/run/netns/{p}"))
            .unwrap_or_default();
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=test;K8S_POD_NAME={container}");
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", args.as_str()),
        ];
        self.cni_raw(&env, conf.to_string().as_bytes())
    }

    pub fn add(&self, conf: &Value, container: &str, pod_ns: &str) -> Call {
        let call = self.cni("ADD", conf, container, Some(pod_ns));
        assert!(
            call.ok,
            "ADD {container} failed: {} {}",
            call.stdout, call.stderr
        );
        call
    }

    pub fn del(&self, conf: &Value, container: &str, pod_ns: Option<&str>) {
        let call = self.cni("DEL", conf, container, pod_ns);
        assert!(
            call.ok,
            "DEL {container} failed: {} {}",
            call.stdout, call.stderr
        );
    }

    pub fn ping(&self, from_ns: &str, ip: &str) -> bool {
        ping(from_ns, ip)
    }

    /// Host-side veths in the node namespace.
    pub fn host_veths(&self) -> Vec<String> {
        must("ip", &["-n", &self.node, "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap().to_string())
            .filter(|name| name.starts_with("cyx"))
            .collect()
    }

    /// Routes in the node namespace that the plugin installed (proto 201).
    pub fn host_routes(&self) -> Vec<String> {
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            let out = must(
                "ip",
                &["-n", &self.node, family, "route", "show", "proto", "201"],
            );
            routes.extend(out.lines().map(str::to_string));
        }
        routes
    }

    /// Interfaces other than lo in a pod namespace.
    pub fn pod_links(&self, pod_ns: &str) -> Vec<String> {
        must("ip", &["-n", pod_ns, "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap().to_string())
            .filter(|name| name != "lo")
            .collect()
    }

    /// The store's documents under a prefix (handles/, blocks/ ...).
    pub fn store_keys(&self, prefix: &str) -> Vec<(String, Value)> {
        let store = calyx_ipam::store::file::FileStore::new(self.dir.path().join("store"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let listed = runtime.block_on(calyx_ipam::store::Store::list(&store, prefix));
        listed
            .expect("the lab's store reads")
            .into_iter()
            .map(|(key, v)| {
                (
                    key,
                    serde_json::from_str(&v.value).expect("documents are JSON"),
                )
            })
            .collect()
    }

    /// Allocated addresses over all blocks.
    pub fn allocated_count(&self) -> usize {
        self.store_keys("blocks/")
            .iter()
            .map(|(_, b)| b["allocations"].as_object().unwrap().len())
            .sum()
    }

    /// Asserts nothing of any pod is left: no veth, no route, no handle, no allocation.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.host_veths(),
            Vec::<String>::new(),
            "leftover host veths"
        );
        assert_eq!(
            self.host_routes(),
            Vec::<String>::new(),
            "leftover host routes"
        );
        assert_eq!(self.store_keys("handles/").len(), 0, "leftover handles");
        assert_eq!(self.allocated_count(), 0, "leftover allocations");
    }

    /// Mounts a read-only tmpfs at `dir` (removed on drop).
    pub fn read_only_dir(&mut self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        must(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "ro,size=1m",
                "calyx-test-ro",
                dir.to_str().unwrap(),
            ],
        );
        self.mounts.push(dir.to_path_buf());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for m in &self.mounts {
            let _ = sh("umount", &[m.to_str().unwrap()]);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
}

/// Whether `ip` answers a ping from inside `netns` within 3 s (one echo a second).
pub fn ping(netns: &str, ip: &str) -> bool {
    sh(
        "nsenter",
        &[
            &format!("--net=/run/netns/{netns}"),
            "ping",
            "-c1",
            "-w3",
            "-q",
            ip,
        ],
    )
    .status
    .success()
}

fn unique_name(kind: &str) -> String {
    format!(
        "cyxt-{}-{kind}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}
