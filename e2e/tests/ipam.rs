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
    let handles_now = || {
        let (_, stdout, _) = ipamctl(&url, &["-o", "json", "show"]);
        let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
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
    let (pods, report_path) = (pods.to_str().unwrap(), report.to_str().unwrap());
    let (code, _, stderr) = ipamctl(&url, &["check", "--pods", pods]);
    assert_eq!(code, Some(1), "an empty pod list needs --allow-no-pods");
    assert!(stderr.contains("--allow-no-pods"), "{stderr}");
    let (code, _, _) = ipamctl(
        &url,
        &[
            "check",
            "--pods",
            pods,
            "--allow-no-pods",
            "--report",
            report_path,
        ],
    );
    assert_eq!(code, Some(1), "check must fail when it finds leaks");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let problems: Vec<calyx_ipam::check::Problem> =
        serde_json::from_value(doc["problems"].clone()).unwrap();
    assert!(problems.len() >= 30, "{} problems", problems.len());
    assert!(
        problems.iter().all(|p| p.kind == ProblemKind::PodGone),
        "a SIGKILL must never leave a half-written allocation: {problems:?}"
    );
    ipamctl_ok(&url, &["release", "--from-report", report_path]);
    let (code, stdout, _) = ipamctl(&url, &["check", "--pods", pods, "--allow-no-pods"]);
    assert_eq!(code, Some(0), "{stdout}");
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

/// Runs ipamctl against `url`; returns (exit code, stdout, stderr).
fn ipamctl(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("ipamctl"))
        .args(["--datastore", url])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ipamctl_ok(url: &str, args: &[&str]) -> String {
    let (code, stdout, stderr) = ipamctl(url, args);
    assert_eq!(code, Some(0), "ipamctl {args:?} failed: {stderr}");
    stdout
}

fn now_request(node: &str, i: usize) -> AllocationRequest {
    let mut r = request(node, i);
    r.attrs.time = calyx_ipam::unix_now();
    r
}

/// A store (file or a fresh etcd) holding one /28 pool of four /30 blocks, so every
/// limit is reached within a few allocations.
struct SmallPool {
    url: String,
    runtime: tokio::runtime::Runtime,
    store: Box<dyn store::Store>,
    _etcd: Option<Etcd>,
    _dir: tempfile::TempDir,
}

fn small_pool(etcd: bool) -> Option<SmallPool> {
    let (url, server, dir) = datastore(etcd)?;
    let runtime = runtime();
    let store = runtime.block_on(async { store::open(&url).unwrap() });
    ipamctl_ok(&url, &["pools", "add", "10.9.0.0/28", "--block-size", "30"]);
    Some(SmallPool {
        url,
        runtime,
        store,
        _etcd: server,
        _dir: dir,
    })
}

fn block_lifecycle(etcd: bool) {
    let Some(f) = small_pool(etcd) else {
        return;
    };
    let (url, rt, s) = (&f.url, &f.runtime, f.store.as_ref());
    let ipam = Ipam::new(s);
    ipamctl_ok(
        url,
        &[
            "config",
            "set",
            "--max-blocks-per-node",
            "2",
            "--strict-affinity",
            "true",
        ],
    );
    let ip_of = |h: &calyx_ipam::model::Handle| h.addresses[0].ip.to_string();
    rt.block_on(async {
        // n1 fills its two blocks; the cap and strict affinity stop the ninth.
        for i in 0..8 {
            ipam.allocate(&now_request("n1", i)).await.unwrap();
        }
        let err = ipam.allocate(&now_request("n1", 8)).await.unwrap_err();
        assert!(
            matches!(&err, IpamError::PoolExhausted(m) if m.contains("maxBlocksPerNode (2)")),
            "{err}"
        );
        for i in 0..2 {
            ipam.allocate(&now_request("n2", i)).await.unwrap();
        }
    });
    // Without strict affinity, n1 borrows from n2's block.
    ipamctl_ok(url, &["config", "set", "--strict-affinity", "false"]);
    let borrowed = rt.block_on(async { ipam.allocate(&now_request("n1", 8)).await.unwrap().0 });
    let borrowed_ip = ip_of(&borrowed);
    assert_eq!(borrowed.addresses[0].block.to_string(), "10.9.0.8/30");
    let shown: serde_json::Value = serde_json::from_str(&ipamctl_ok(
        url,
        &["-o", "json", "show", "--ip", &borrowed_ip],
    ))
    .unwrap();
    assert_eq!(shown["borrowed"], true, "{shown}");
    assert_eq!(shown["blockNode"], "n2");
    assert_eq!(shown["allocation"]["node"], "n1");
    let n1: serde_json::Value =
        serde_json::from_str(&ipamctl_ok(url, &["-o", "json", "show", "--node", "n1"])).unwrap();
    assert_eq!(n1["blocks"].as_array().unwrap().len(), 2);
    assert_eq!(n1["borrowed"][0]["ip"], borrowed_ip.as_str());
    assert_eq!(rt.block_on(ipam.check(None)).unwrap(), vec![]);

    // A freed address rests for the cooldown: the next two allocations avoid it.
    ipamctl_ok(url, &["config", "set", "--ip-cooldown-seconds", "3600"]);
    rt.block_on(async {
        let freed = ipam.release("t.n2.0").await.unwrap().unwrap();
        for i in 2..4 {
            let (h, _) = ipam.allocate(&now_request("n2", i)).await.unwrap();
            assert_ne!(ip_of(&h), ip_of(&freed), "reused within the cooldown");
        }
    });
    ipamctl_ok(
        url,
        &[
            "config",
            "set",
            "--ip-cooldown-seconds",
            "0",
            "--empty-block-grace-seconds",
            "0",
        ],
    );

    // n1 empties its second block: it goes back to the pool; the full one stays.
    rt.block_on(async {
        for i in 4..8 {
            ipam.release(&format!("t.n1.{i}")).await.unwrap().unwrap();
        }
        let released = ipam.release_empty_blocks("n1").await.unwrap();
        assert_eq!(released, ["blocks/10.9.0.4-30"]);
        assert!(ipam.release_empty_blocks("n1").await.unwrap().is_empty());
        let index: Vec<String> = s
            .list("affinities/n1/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            index,
            ["affinities/n1/10.9.0.0-30"],
            "the index follows the blocks"
        );
    });

    // Releasing n2 refuses while its pods hold addresses, then --force frees them; the
    // block that lends n1 an address stays (without affinity) until it empties.
    let (code, _, stderr) = ipamctl(url, &["node", "release", "n2"]);
    assert!(
        code != Some(0) && stderr.contains("still has 3 address(es)"),
        "{stderr}"
    );
    let out = ipamctl_ok(url, &["node", "release", "n2", "--force"]);
    assert!(out.contains("released 3 handle(s)"), "{out}");
    rt.block_on(async {
        let blocks = ipam.blocks().await.unwrap();
        let lender = &blocks["blocks/10.9.0.8-30"].block;
        assert_eq!(lender.affinity, None);
        assert_eq!(lender.allocations.len(), 1);
        assert!(!blocks.contains_key("blocks/10.9.0.12-30"));
        assert!(s.list("affinities/n2/").await.unwrap().is_empty());
        assert!(ipam
            .handles()
            .await
            .unwrap()
            .iter()
            .all(|h| h.attrs.node == "n1"));
        assert_eq!(ipam.check(None).await.unwrap(), vec![]);
        ipam.release("t.n1.8").await.unwrap().unwrap();
        let released = ipam.release_empty_blocks("n1").await.unwrap();
        assert_eq!(released, ["blocks/10.9.0.8-30"]);
    });
    let (code, _, stderr) = ipamctl(url, &["node", "release", "nobody"]);
    assert!(
        code != Some(0) && stderr.contains("no such node"),
        "{stderr}"
    );
}

#[test]
fn block_lifecycle_file() {
    block_lifecycle(false);
}

#[test]
fn block_lifecycle_etcd() {
    block_lifecycle(true);
}

#[test]
fn migrate_from_the_embedded_store_to_etcd_is_safe_to_repeat() {
    let Some((etcd_url, _server, _)) = datastore(true) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file_url = format!("file://{}/store", dir.path().display());
    let rt = runtime();
    let source = rt.block_on(async { store::open(&file_url).unwrap() });
    let from = Ipam::new(source.as_ref());
    ipamctl_ok(&file_url, &["pools", "add", "10.244.0.0/16"]);
    ipamctl_ok(&file_url, &["config", "set", "--max-blocks-per-node", "8"]);
    rt.block_on(async {
        for i in 0..20 {
            from.allocate(&request(["n1", "n2"][i % 2], i))
                .await
                .unwrap();
        }
    });
    let migrate = ["migrate", "--from", &file_url, "--to", &etcd_url];
    let first = ipamctl_ok(&file_url, &migrate);
    // 1 pool + 1 config + 2 blocks + their 2 index entries + 20 handles.
    assert!(first.contains("copied 26, already present 0"), "{first}");
    let again = ipamctl_ok(&file_url, &migrate);
    assert!(again.contains("copied 0, already present 26"), "{again}");

    let target = rt.block_on(async { store::open(&etcd_url).unwrap() });
    let to = Ipam::new(target.as_ref());
    rt.block_on(async {
        assert_eq!(to.config().await.unwrap().max_blocks_per_node, Some(8));
        assert_eq!(to.check(None).await.unwrap(), vec![]);
        let before: BTreeSet<String> = to
            .handles()
            .await
            .unwrap()
            .iter()
            .map(|h| h.addresses[0].ip.to_string())
            .collect();
        assert_eq!(before.len(), 20);
        // Allocation goes on from where the embedded store left off.
        for i in 20..25 {
            let (h, _) = to.allocate(&request("n1", i)).await.unwrap();
            assert!(!before.contains(&h.addresses[0].ip.to_string()));
        }
        // The source changes after the copy: the changed block is a conflict, left alone.
        from.release("t.n2.1").await.unwrap().unwrap();
    });
    let (code, stdout, _) = ipamctl(&file_url, &migrate);
    assert_ne!(code, Some(0), "a conflict must fail the run");
    assert!(
        stdout.contains("differs in") && stdout.contains("blocks/"),
        "{stdout}"
    );
    rt.block_on(async {
        assert!(
            to.handle("t.n2.1").await.unwrap().is_some(),
            "target untouched"
        );
        assert_eq!(to.check(None).await.unwrap(), vec![]);
    });
}

/// 25 processes of one node allocating 150 addresses at once, as a burst of CNI ADDs
/// does (Calico's users saw ADDs fail on block conflicts at 120+ pods per node): with
/// the host lock they take turns and all succeed with distinct addresses.
fn a_burst_of_processes_on_one_node_takes_turns(etcd: bool) {
    let Some((url, _server, dir)) = datastore(etcd) else {
        return;
    };
    let lock = dir.path().join("node1.ipam.lock");
    let loads: Vec<_> = (0..25)
        .map(|_| {
            Command::new(bin("ipam-load"))
                .args(["--datastore", &url, "--node", "n1", "--count", "6"])
                .arg("--host-lock")
                .arg(&lock)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut load in loads {
        assert!(load.wait().unwrap().success(), "an allocator failed");
    }
    let rt = runtime();
    rt.block_on(async {
        let s = store::open(&url).unwrap();
        let ipam = Ipam::new(s.as_ref());
        let handles = ipam.handles().await.unwrap();
        let ips: BTreeSet<_> = handles.iter().map(|h| h.addresses[0].ip).collect();
        assert_eq!((handles.len(), ips.len()), (150, 150));
        assert_eq!(ipam.blocks().await.unwrap().len(), 3, "64 + 64 + 22");
        assert_eq!(ipam.check(None).await.unwrap(), vec![]);
    });
}

#[test]
fn a_burst_of_processes_on_one_node_takes_turns_file() {
    a_burst_of_processes_on_one_node_takes_turns(false);
}

#[test]
fn a_burst_of_processes_on_one_node_takes_turns_etcd() {
    a_burst_of_processes_on_one_node_takes_turns(true);
}

#[test]
fn ipamctl_names_a_bad_argument_in_one_line() {
    for (args, named) in [
        (&["show", "--ip", "10.0.0"][..], "--ip"),
        (
            &["pools", "add", "10.0.0.0/8", "--block-size", "x"][..],
            "--block-size",
        ),
        (
            &["config", "set", "--max-blocks-per-node", "0"][..],
            "--max-blocks-per-node",
        ),
        (
            &["config", "set", "--strict-affinity", "maybe"][..],
            "--strict-affinity",
        ),
        (&["node", "frobnicate"][..], "frobnicate"),
    ] {
        let (code, _, stderr) = ipamctl("file:///nonexistent/store", args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}

#[test]
fn ipamctl_calls_a_store_that_was_never_written_an_error_not_an_empty_store() {
    for args in [&["check"][..], &["show"][..], &["pools", "list"][..]] {
        let (code, stdout, stderr) = ipamctl("file:///nonexistent/store", args);
        assert_eq!(code, Some(1), "{args:?}: {stdout}");
        assert!(
            stderr.contains("no store at /nonexistent/store"),
            "{args:?}: {stderr}"
        );
    }
}

/// `pools delete` refuses while addresses are allocated, then removes the pool with
/// its empty blocks and their index entries (nothing left for `check` to report).
fn deleting_a_pool_takes_its_empty_blocks(etcd: bool) {
    let Some(f) = small_pool(etcd) else {
        return;
    };
    let (url, rt, s) = (&f.url, &f.runtime, f.store.as_ref());
    let ipam = Ipam::new(s);
    let name = "default-ipv4-10-9-0-0-28";
    rt.block_on(async {
        for i in 0..5 {
            ipam.allocate(&request("n1", i)).await.unwrap();
        }
    });
    let (code, _, stderr) = ipamctl(url, &["pools", "delete", name]);
    assert!(
        code != Some(0) && stderr.contains("5 allocation(s)"),
        "{stderr}"
    );
    rt.block_on(async {
        for i in 0..5 {
            ipam.release(&format!("t.n1.{i}")).await.unwrap().unwrap();
        }
        assert_eq!(ipam.blocks().await.unwrap().len(), 2);
    });
    ipamctl_ok(url, &["pools", "delete", name]);
    rt.block_on(async {
        assert!(ipam.pools().await.unwrap().is_empty());
        assert!(ipam.blocks().await.unwrap().is_empty());
        assert!(s.list("affinities/").await.unwrap().is_empty());
        assert_eq!(ipam.check(None).await.unwrap(), vec![]);
    });
}

#[test]
fn deleting_a_pool_takes_its_empty_blocks_file() {
    deleting_a_pool_takes_its_empty_blocks(false);
}

#[test]
fn deleting_a_pool_takes_its_empty_blocks_etcd() {
    deleting_a_pool_takes_its_empty_blocks(true);
}

/// A long-lived client reads the blocks it saw last time beside the node's index;
/// when they have since gone to another node, it must notice and not allocate there.
fn stale_remembered_blocks_are_not_used(etcd: bool) {
    let Some(f) = small_pool(etcd) else {
        return;
    };
    let (url, rt, s) = (&f.url, &f.runtime, f.store.as_ref());
    let long_lived = Ipam::new(s);
    let (first, _) = rt
        .block_on(long_lived.allocate(&now_request("n1", 0)))
        .unwrap();
    let n1_block = first.addresses[0].block;
    rt.block_on(long_lived.release(&first.id)).unwrap();
    // n1 leaves; n2 takes the block n1 had and fills it.
    ipamctl_ok(url, &["node", "release", "n1"]);
    let other = Ipam::new(s);
    for i in 0..4 {
        let (h, _) = rt.block_on(other.allocate(&now_request("n2", i))).unwrap();
        assert_eq!(h.addresses[0].block, n1_block, "n2 reuses the freed block");
    }
    // n1 comes back: its client still remembers that block.
    let (again, _) = rt
        .block_on(long_lived.allocate(&now_request("n1", 1)))
        .unwrap();
    assert_ne!(again.addresses[0].block, n1_block, "{again:?}");
    let report: serde_json::Value =
        serde_json::from_str(&ipamctl_ok(url, &["-o", "json", "check"])).unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let shown: serde_json::Value = serde_json::from_str(&ipamctl_ok(
        url,
        &[
            "-o",
            "json",
            "show",
            "--ip",
            &again.addresses[0].ip.to_string(),
        ],
    ))
    .unwrap();
    assert_eq!(shown["blockNode"], "n1", "{shown}");
    assert_eq!(shown["borrowed"], false, "{shown}");
}

#[test]
fn stale_remembered_blocks_are_not_used_file() {
    stale_remembered_blocks_are_not_used(false);
}

#[test]
fn stale_remembered_blocks_are_not_used_etcd() {
    stale_remembered_blocks_are_not_used(true);
}

/// `release --ip` / `--handle` of an address a pod holds is refused without --force:
/// freeing it would hand a live pod's address to the next pod.
fn releasing_what_a_pod_holds_needs_force(etcd: bool) {
    let Some(f) = small_pool(etcd) else {
        return;
    };
    let (url, rt, s) = (&f.url, &f.runtime, f.store.as_ref());
    let ipam = Ipam::new(s);
    let (a, b) = rt.block_on(async {
        let a = ipam.allocate(&now_request("n1", 0)).await.unwrap().0;
        let b = ipam.allocate(&now_request("n1", 1)).await.unwrap().0;
        (a, b)
    });
    let ip = a.addresses[0].ip.to_string();
    let (code, _, stderr) = ipamctl(url, &["release", "--ip", &ip]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--force") && stderr.contains(&a.id),
        "{stderr}"
    );
    let (code, _, stderr) = ipamctl(url, &["release", "--handle", &b.id]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    rt.block_on(async {
        assert!(ipam.handle(&a.id).await.unwrap().is_some());
        assert!(ipam.handle(&b.id).await.unwrap().is_some());
    });

    let out = ipamctl_ok(url, &["-o", "json", "release", "--ip", &ip, "--force"]);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("-o json is JSON");
    assert_eq!(doc["released"], serde_json::json!([a.id]), "{doc}");
    ipamctl_ok(url, &["release", "--handle", &b.id, "--force"]);
    rt.block_on(async {
        assert!(ipam.handle(&a.id).await.unwrap().is_none());
        assert!(ipam.handle(&b.id).await.unwrap().is_none());
    });
    let (code, stdout, _) = ipamctl(url, &["check"]);
    assert_eq!(code, Some(0), "{stdout}");
}

#[test]
fn releasing_what_a_pod_holds_needs_force_file() {
    releasing_what_a_pod_holds_needs_force(false);
}

#[test]
fn releasing_what_a_pod_holds_needs_force_etcd() {
    releasing_what_a_pod_holds_needs_force(true);
}

/// The network config's pools are created one by one where the store lacks them (an
/// IPv6 pool joins an IPv4 cluster), and one overlapping a stored pool is refused.
fn config_pools_join_the_stored_ones(etcd: bool) {
    let Some((url, _server, _dir)) = datastore(etcd) else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let s = store::open(&url).unwrap();
        let ipam = Ipam::new(s.as_ref());
        let pool = |cidr: &str| Pool::with_defaults(cidr.parse().unwrap(), None).unwrap();
        ipam.ensure_pools(&[pool("10.20.0.0/16")]).await.unwrap();
        ipam.ensure_pools(&[pool("10.20.0.0/16"), pool("fd00:20::/56")])
            .await
            .unwrap();
        let cidrs: BTreeSet<String> = ipam
            .pools()
            .await
            .unwrap()
            .iter()
            .map(|p| p.cidr.to_string())
            .collect();
        assert_eq!(
            cidrs,
            BTreeSet::from(["10.20.0.0/16".into(), "fd00:20::/56".into()])
        );
        let err = ipam
            .ensure_pools(&[pool("10.20.5.0/24")])
            .await
            .unwrap_err();
        assert!(matches!(err, IpamError::PoolOverlap { .. }), "{err}");
        assert!(err.to_string().contains("10.20.0.0/16"), "{err}");
        assert_eq!(ipam.pools().await.unwrap().len(), 2);
    });
}

#[test]
fn config_pools_join_the_stored_ones_file() {
    config_pools_join_the_stored_ones(false);
}

#[test]
fn config_pools_join_the_stored_ones_etcd() {
    config_pools_join_the_stored_ones(true);
}

/// The agent's node record calls: a registration, heartbeats from several writers at
/// once (every beat counted: compare-and-swap, retried), a record that vanishes, and a
/// registration again.
fn node_records_register_and_beat(etcd: bool) {
    use calyx_ipam::model::{node_key, NodeRecord};
    use calyx_ipam::store::{Expect, Write};
    let Some((url, _server, _dir)) = datastore(etcd) else {
        return;
    };
    runtime().block_on(async {
        let store = store::open(&url).unwrap();
        let ipam = Ipam::new(store.as_ref());
        let record = NodeRecord {
            name: "node1".into(),
            underlay_ip: "192.0.2.11".parse().unwrap(),
            vtep_ipv4: Some("10.244.0.0".parse().unwrap()),
            vtep_ipv6: None,
            vtep_mac: "0e:00:00:00:00:01".into(),
            heartbeat: 0,
        };
        assert_eq!(
            ipam.register_node(record.clone()).await.unwrap().heartbeat,
            1
        );
        assert_eq!(ipam.heartbeat("node1").await.unwrap().unwrap().heartbeat, 2);
        let beats = (0..4).map(|_| async {
            for _ in 0..5 {
                ipam.heartbeat("node1").await.unwrap().unwrap();
            }
        });
        futures::future::join_all(beats).await;
        let (nodes, _): (Vec<NodeRecord>, Vec<u64>) =
            ipam.nodes().await.unwrap().into_iter().unzip();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].heartbeat, 22, "every beat of every writer counted");
        assert_eq!(
            nodes[0].underlay_ip, record.underlay_ip,
            "the record is kept"
        );
        // Registering again keeps the count going.
        assert_eq!(
            ipam.register_node(record.clone()).await.unwrap().heartbeat,
            23
        );
        let held = store.get(&node_key("node1")).await.unwrap().unwrap();
        store
            .commit(vec![Write::Delete {
                key: node_key("node1"),
                expect: Expect::Revision(held.revision),
            }])
            .await
            .unwrap();
        assert!(
            ipam.heartbeat("node1").await.unwrap().is_none(),
            "gone: register again"
        );
        assert_eq!(ipam.register_node(record).await.unwrap().heartbeat, 1);
    });
}

#[test]
fn node_records_register_and_beat_file() {
    node_records_register_and_beat(false)
}

#[test]
fn node_records_register_and_beat_etcd() {
    node_records_register_and_beat(true)
}
