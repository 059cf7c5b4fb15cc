//! A real etcd for tests: Debian's etcd-server on free loopback ports with a temporary
//! data directory. It can be stopped and started again (same data, same ports) to test
//! outages, and is killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The network namespace etcd runs in (None: this process's).
    netns: Option<String>,
    pub ip: String,
    pub client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether etcd is installed. In CI (`CI` set) a missing etcd is a failure; elsewhere
/// this prints why the test skips.
pub fn available() -> bool {
    let installed = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !installed {
        let why = "etcd is not installed (apt-get install etcd-server)";
        if std::env::var_os("CI").is_some() {
            panic!("etcd test cannot run in CI: {why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    installed
}

impl Etcd {
    /// Starts etcd, or returns None (printing why) when it is not installed outside CI.
    /// In CI (`CI` set) a missing etcd is a failure.
    pub fn start() -> Option<Etcd> {
        Etcd::start_in(None, "127.0.0.1")
    }

    /// `start`, with the data directory under `base` (say a tmpfs, to measure without
    /// the disk's fsyncs).
    pub fn start_with_data_in(base: &std::path::Path) -> Option<Etcd> {
        Etcd::start_full(
            None,
            "127.0.0.1",
            tempfile::tempdir_in(base).expect("temp dir"),
        )
    }

    /// Starts etcd inside `netns`, listening on `ip` there (the namespaces that use it
    /// must reach that address).
    pub fn start_in(netns: Option<&str>, ip: &str) -> Option<Etcd> {
        Etcd::start_full(netns, ip, tempfile::tempdir().expect("temp dir"))
    }

    fn start_full(netns: Option<&str>, ip: &str, dir: tempfile::TempDir) -> Option<Etcd> {
        if !available() {
            return None;
        }
        let mut etcd = Etcd {
            child: None,
            dir,
            netns: netns.map(str::to_string),
            ip: ip.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.resume();
        Some(etcd)
    }

    /// Freezes the server (SIGSTOP: it accepts connections and answers nothing, as a
    /// stalled etcd does) or thaws it (SIGCONT).
    pub fn freeze(&self, frozen: bool) {
        let child = self.child.as_ref().expect("etcd is running");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} etcd");
    }

    /// The datastore URL for Calyx.
    pub fn url(&self) -> String {
        format!("etcd://{}:{}", self.ip, self.client_port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is running already");
        let client = format!("http://{}:{}", self.ip, self.client_port);
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log");
        let child = self
            .command("etcd")
            .args(["--name", "calyx-test"])
            .args([
                "--data-dir",
                &self.dir.path().join("data").display().to_string(),
            ])
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("calyx-test={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last_check;
        loop {
            // The check runs where etcd runs: its address may exist only there.
            let check = self
                .command("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &client, "--command-timeout=1s"])
                .args(["endpoint", "health"])
                .output();
            match check {
                Ok(out) if out.status.success() => return,
                Ok(out) => last_check = String::from_utf8_lossy(&out.stderr).into_owned(),
                Err(e) => last_check = e.to_string(),
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                panic!(
                    "etcd did not become healthy (exited: {exited:?}); last check: {last_check}\n{log}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs in etcd's namespace.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Runs etcdctl against this server; panics with its message when it fails.
    fn etcdctl(&self, args: &[&str]) -> String {
        let out = self
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &format!("http://{}:{}", self.ip, self.client_port),
            ])
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The keys under Calyx's prefix + `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("/calyx/v1/{prefix}"),
        ])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
    }

    /// Discards the history up to `revision`, as etcd's periodic compaction does: a
    /// watch from before it fails.
    pub fn compact(&self, revision: u64) {
        self.etcdctl(&["compact", &revision.to_string()]);
    }

    /// etcd's WAL fsync durations since it started, from its Prometheus histogram:
    /// (bucket upper bound in seconds, cumulative count). Every commit waits for one,
    /// so a slow disk shows here first. Only for an etcd outside a namespace.
    pub fn wal_fsync_histogram(&self) -> std::io::Result<Vec<(f64, u64)>> {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect((self.ip.as_str(), self.client_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.ip)?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text
            .lines()
            .filter_map(|line| {
                line.strip_prefix("etcd_disk_wal_fsync_duration_seconds_bucket{le=\"")
            })
            .filter_map(|rest| {
                let (bound, count) = rest.split_once("\"} ")?;
                let bound = match bound {
                    "+Inf" => f64::INFINITY,
                    b => b.parse().ok()?,
                };
                Some((bound, count.trim().parse().ok()?))
            })
            .collect())
    }

    /// Kills the server (its data stays for `resume`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
