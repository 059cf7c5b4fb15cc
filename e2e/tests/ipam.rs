//! IPAM across nodes, on the embedded store and on a real etcd: concurrency, an etcd
//! outage, and allocating processes killed mid-run.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use calyx_e2e::etcd::Etcd;
use calyx_ipam::allocator::AllocationRequest;
use calyx_ipam::check::ProblemKind;
use calyx_ipam::model::{AllocationAttrs, Pool};
use calyx_ipam::store::{self, StoreError};
use calyx_ipam::{Ipam, IpamError};

/// A datastore for one test: a file store, or a fresh etcd (kept alive by the guard).
fn datastore(etcd: bool) -> Option<(String, Option<Etcd>, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    if etcd {
        let server = Etcd::start()?;
        Some((server.url(), Some(server), dir))
    } else {
        let url = format!("file://{}/store", dir.path().display());
        Some((url, None, dir))
    }
}

fn request(node: &str, i: usize) -> AllocationRequest {
    AllocationRequest {
        handle_id: format!("t.{node}.{i}"),
        network: "t".into(),
        attrs: AllocationAttrs {
            node: node.into(),
            pod: Some(format!("{node}-{i}")),
            namespace: Some("t".into()),
            ..Default::default()
        },
        host_interface: None,
        pool_filter: vec![],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn three_nodes_each_allocating_100_at_once(etcd: bool) {
    let Some((url, _server, _dir)) = datastore(etcd) else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let setup = store::open(&url).unwrap();
        let pool = Pool::with_defaults("10.244.0.0/16".parse().unwrap(), None).unwrap();
        Ipam::new(setup.as_ref())
            .ensure_pools(&[pool])
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for node in ["n1", "n2", "n3"] {
            // One store client per node, as separate hosts would have.
            let client: &'static dyn store::Store = Box::leak(store::open(&url).unwrap());
            for i in 0..100 {
                tasks.push(tokio::spawn(async move {
                    let (handle, _) = Ipam::new(client).allocate(&request(node, i)).await.unwrap();
                    handle.addresses[0].ip
                }));
            }
        }
        let mut ips = BTreeSet::new();
        for t in tasks {
            assert!(
                ips.insert(t.await.unwrap()),
                "an address was handed out twice"
            );
        }
        assert_eq!(ips.len(), 300);
        let ipam = Ipam::new(setup.as_ref());
        for stored in ipam.blocks().await.unwrap().values() {
            let owner = stored.block.affinity.as_deref().unwrap();
            for a in stored.block.allocations.values() {
                assert_eq!(
                    a.attrs.node, owner,
                    "block {} holds another node's address",
                    stored.block.cidr
                );
            }
        }
        assert_eq!(ipam.check(None).await.unwrap(), vec![]);
    });
}

#[test]
fn three_nodes_each_allocating_100_at_once_file() {
    three_nodes_each_allocating_100_at_once(false);
}

#[test]
fn three_nodes_each_allocating_100_at_once_etcd() {
    three_nodes_each_allocating_100_at_once(true);
}

#[test]
fn an_etcd_outage_fails_calls_cleanly_and_allocation_resumes_after() {
    let Some(mut server) = Etcd::start() else {
        return;
    };
    let url = server.url();
    let rt = runtime();
    let s = rt.block_on(async { store::open(&url).unwrap() });
    let ipam = Ipam::new(s.as_ref());
    rt.block_on(async {
        let pool = Pool::with_defaults("10.244.0.0/16".parse().unwrap(), None).unwrap();
        ipam.ensure_pools(&[pool]).await.unwrap();
        for i in 0..30 {
            ipam.allocate(&request("n1", i)).await.unwrap();
        }
    });
    server.stop();
    rt.block_on(async {
        for i in 30..33 {
            let started = std::time::Instant::now();
            let err = ipam.allocate(&request("n1", i)).await.unwrap_err();
            assert!(
                matches!(err, IpamError::Store(StoreError::Unavailable { .. })),
                "{err}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    });
    server.resume();
    rt.block_on(async {
        let mut resumed = false;
        for _ in 0..50 {
            if ipam.allocate(&request("n1", 30)).await.is_ok() {
                resumed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(resumed, "allocation did not resume after etcd came back");
        for i in 31..60 {
            ipam.allocate(&request("n1", i)).await.unwrap();
        }
        assert_eq!(ipam.check(None).await.unwrap(), vec![]);
        assert_eq!(ipam.handles().await.unwrap().len(), 60);
    });
}

fn bin(name: &str) -> PathBuf {
    let here = PathBuf::from(env!("CARGO_BIN_EXE_ipam-load"));
    let path = here.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

fn killed_allocators_leave_leaks_that_check_finds_and_release_repairs(etcd: bool) {
    let Some((url, _server, dir)) = datastore(etcd) else {
        return;
    };
    let mut loads: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|node| {
            Command::new(bin("ipam-load"))
                .args([
                    "--datastore",
                    &url,
                    "--node",
                    node,
                    "--count",
                    "100000",
                    "--concurrency",
                    "4",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Let them get going, then kill them mid-allocation.
    let ipamctl = bin("ipamctl");
    let handles_now = || {
        let out = Command::new(&ipamctl)
            .args(["--datastore", &url, "-o", "json", "show"])
            .output()
            .unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        doc["pools"][0]["inUse"].as_u64().unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while handles_now() < 30 {
        assert!(
            std::time::Instant::now() < deadline,
            "the allocators made no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for load in &mut loads {
        load.kill().unwrap();
        load.wait().unwrap();
    }
    // No live pods: everything the killed allocators got is a leak.
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, r#"{"items": []}"#).unwrap();
    let report = dir.path().join("report.json");
    let check = Command::new(&ipamctl)
        .args([
            "--datastore",
            &url,
            "check",
            "--pods",
            pods.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        check.status.code(),
        Some(1),
        "check must fail when it finds leaks"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let problems: Vec<calyx_ipam::check::Problem> =
        serde_json::from_value(doc["problems"].clone()).unwrap();
    assert!(problems.len() >= 30, "{} problems", problems.len());
    assert!(
        problems.iter().all(|p| p.kind == ProblemKind::PodGone),
        "a SIGKILL must never leave a half-written allocation: {problems:?}"
    );
    let release = Command::new(&ipamctl)
        .args([
            "--datastore",
            &url,
            "release",
            "--from-report",
            report.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        release.status.success(),
        "{}",
        String::from_utf8_lossy(&release.stderr)
    );
    let after = Command::new(&ipamctl)
        .args([
            "--datastore",
            &url,
            "check",
            "--pods",
            pods.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
    assert_eq!(handles_now(), 0);
}

#[test]
fn killed_allocators_leave_leaks_that_check_finds_and_release_repairs_file() {
    killed_allocators_leave_leaks_that_check_finds_and_release_repairs(false);
}

#[test]
fn killed_allocators_leave_leaks_that_check_finds_and_release_repairs_etcd() {
    killed_allocators_leave_leaks_that_check_finds_and_release_repairs(true);
}
