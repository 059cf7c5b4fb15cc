//! Model-based test of IPAM: random sequences of ADD, DEL, GC, release (forced and
//! not), empty-block release, node release and client crashes (the client dropped
//! and opened again), on the embedded store and on etcd. After every step the store is
//! compared with a simple model: which attachment holds which address. No address is
//! ever held twice, nothing held is lost, and once everything is released nothing is
//! left allocated and `check` finds no problem.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use calyx_e2e::etcd::Etcd;
use calyx_ipam::allocator::AllocationRequest;
use calyx_ipam::model::{AllocationAttrs, Pool};
use calyx_ipam::store::{self, Store};
use calyx_ipam::{Ipam, ReleaseOutcome};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const NODES: [&str; 2] = ["n1", "n2"];
const PODS: usize = 10;

#[derive(Debug, Clone)]
enum Op {
    Add {
        node: usize,
        pod: usize,
    },
    Del {
        pod: usize,
    },
    /// The runtime lists only the pods in `keep` on `node`.
    Gc {
        node: usize,
        keep: Vec<bool>,
    },
    ReleaseIp {
        pod: usize,
        force: bool,
    },
    ReleaseEmptyBlocks {
        node: usize,
    },
    ReleaseNode {
        node: usize,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..NODES.len(), 0..PODS).prop_map(|(node, pod)| Op::Add { node, pod }),
        3 => (0..PODS).prop_map(|pod| Op::Del { pod }),
        1 => (0..NODES.len(), prop::collection::vec(any::<bool>(), PODS))
            .prop_map(|(node, keep)| Op::Gc { node, keep }),
        1 => (0..PODS, any::<bool>()).prop_map(|(pod, force)| Op::ReleaseIp { pod, force }),
        1 => (0..NODES.len()).prop_map(|node| Op::ReleaseEmptyBlocks { node }),
        1 => (0..NODES.len()).prop_map(|node| Op::ReleaseNode { node }),
        1 => Just(Op::Crash),
    ]
}

fn handle(pod: usize) -> String {
    format!("model.c{pod}.eth0")
}

fn request(node: usize, pod: usize) -> AllocationRequest {
    AllocationRequest {
        handle_id: handle(pod),
        network: "model".into(),
        attrs: AllocationAttrs {
            node: NODES[node].into(),
            pod: Some(format!("p{pod}")),
            namespace: Some("m".into()),
            container_id: Some(format!("c{pod}")),
            ifname: Some("eth0".into()),
            time: calyx_ipam::unix_now(),
        },
        host_interface: None,
        pool_filter: vec![],
    }
}

/// What the model says is held: handle -> (node, addresses).
type Model = BTreeMap<String, (usize, Vec<IpAddr>)>;

async fn apply(ipam: &Ipam<'_>, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let fail = |what: String| TestCaseError::fail(what);
    match op {
        Op::Add { node, pod } => {
            let (h, created) = ipam
                .allocate(&request(*node, *pod))
                .await
                .map_err(|e| fail(format!("{op:?}: {e}")))?;
            let ips: Vec<IpAddr> = h.addresses.iter().map(|a| a.ip).collect();
            match model.get(&handle(*pod)) {
                Some((_, held)) => {
                    prop_assert!(!created, "{:?} allocated again", op);
                    prop_assert_eq!(&ips, held, "{:?} returned other addresses", op);
                }
                None => {
                    prop_assert!(created);
                    model.insert(handle(*pod), (*node, ips));
                }
            }
        }
        Op::Del { pod } => {
            let released = ipam
                .release(&handle(*pod))
                .await
                .map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(released.is_some(), model.remove(&handle(*pod)).is_some());
        }
        Op::Gc { node, keep } => {
            let keep: BTreeSet<String> = (0..PODS).filter(|p| keep[*p]).map(handle).collect();
            let stale = ipam
                .stale_handles("model", NODES[*node], &keep)
                .await
                .map_err(|e| fail(e.to_string()))?;
            for h in stale {
                ipam.release(&h.id).await.map_err(|e| fail(e.to_string()))?;
                prop_assert!(
                    model.remove(&h.id).is_some(),
                    "GC released {} the model lacks",
                    h.id
                );
            }
            let expected_left = model
                .iter()
                .filter(|(id, (n, _))| *n == *node && !keep.contains(*id))
                .count();
            prop_assert_eq!(expected_left, 0, "GC left stale handles");
        }
        Op::ReleaseIp { pod, force } => {
            let Some((_, ips)) = model.get(&handle(*pod)).cloned() else {
                return Ok(());
            };
            let outcome = ipam
                .release_ip(ips[0], None, *force)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if *force {
                prop_assert_eq!(outcome, ReleaseOutcome::Released(handle(*pod)));
                model.remove(&handle(*pod));
            } else {
                prop_assert_eq!(outcome, ReleaseOutcome::InUse(handle(*pod)));
            }
        }
        Op::ReleaseEmptyBlocks { node } => {
            ipam.release_empty_blocks(NODES[*node])
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        Op::ReleaseNode { node } => {
            let holds = model.values().any(|(n, _)| n == node);
            match ipam.release_node(NODES[*node], false).await {
                Ok(_) => prop_assert!(!holds, "node release without --force freed live pods"),
                Err(calyx_ipam::IpamError::NodeNotEmpty { .. }) => prop_assert!(holds),
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        Op::Crash => unreachable!("handled by the caller"),
    }
    Ok(())
}

/// The store agrees with the model: the same handles with the same addresses, each
/// address allocated in its block to its handle, and no other allocation.
async fn agrees(ipam: &Ipam<'_>, model: &Model) -> Result<(), TestCaseError> {
    let handles = ipam
        .handles()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let stored: Model = handles
        .iter()
        .map(|h| {
            let node = NODES.iter().position(|n| *n == h.attrs.node).unwrap_or(99);
            (
                h.id.clone(),
                (node, h.addresses.iter().map(|a| a.ip).collect()),
            )
        })
        .collect();
    prop_assert_eq!(&stored, model);
    let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
    let blocks = ipam
        .blocks()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for b in blocks.values() {
        for (ordinal, allocation) in &b.block.allocations {
            let ip = b.block.ip_at(*ordinal);
            let previous = owner.insert(ip, allocation.handle.clone());
            prop_assert!(previous.is_none(), "{} allocated twice", ip);
        }
    }
    let held: BTreeMap<IpAddr, String> = model
        .iter()
        .flat_map(|(id, (_, ips))| ips.iter().map(move |ip| (*ip, id.clone())))
        .collect();
    prop_assert_eq!(owner, held, "block allocations differ from the handles");
    Ok(())
}

fn run_model(open: &dyn Fn() -> Box<dyn Store>, ops: &[Op]) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut store = open();
        let pool = Pool::with_defaults("10.9.0.0/27".parse().unwrap(), Some(30)).unwrap();
        Ipam::new(store.as_ref())
            .ensure_pools(&[pool])
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut model = Model::new();
        for op in ops {
            if let Op::Crash = op {
                store = open(); // a new process: nothing remembered
            } else {
                apply(&Ipam::new(store.as_ref()), &mut model, op).await?;
            }
            agrees(&Ipam::new(store.as_ref()), &model).await?;
        }
        let ipam = Ipam::new(store.as_ref());
        for id in model.keys() {
            ipam.release(id)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        agrees(&ipam, &Model::new()).await?;
        let problems = ipam
            .check(None)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(problems.is_empty(), "{:?}", problems);
        Ok(())
    })
}

fn sequences(cases: u32, open_case: &dyn Fn(u32) -> Box<dyn Fn() -> Box<dyn Store>>) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::cell::Cell::new(0u32);
    runner
        .run(&prop::collection::vec(op(), 1..40), |ops| {
            case.set(case.get() + 1);
            run_model(&*open_case(case.get()), &ops)
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn ipam_follows_the_model_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    sequences(48, &|case| {
        let url = format!("file://{}/case{case}/store", root.display());
        Box::new(move || store::open(&url).unwrap())
    });
}

#[test]
fn ipam_follows_the_model_on_etcd() {
    let Some(etcd) = Etcd::start() else {
        return;
    };
    let base = etcd.url();
    sequences(16, &|case| {
        let url = format!("{base}?prefix=/model{case}/");
        Box::new(move || store::open(&url).unwrap())
    });
}
