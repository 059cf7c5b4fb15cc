//! The Store contract, checked against both backends: the embedded file store and a
//! real etcd.

use std::time::Duration;

use calyx_e2e::etcd::Etcd;
use calyx_ipam::store::{self, Expect, Read, Store, StoreError, WatchEvent, Write};

fn put(key: &str, value: &str, expect: Expect) -> Write {
    Write::Put {
        key: key.into(),
        value: value.into(),
        expect,
    }
}

/// Runs `check` against a fresh file store and a fresh etcd.
fn on_both_stores<F, Fut>(check: F)
where
    F: Fn(Box<dyn Store>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = store::open(&format!("file://{}/store", dir.path().display())).unwrap();
    rt.block_on(check(file));
    if let Some(etcd) = Etcd::start() {
        let etcd_store = store::open(&etcd.url()).unwrap();
        rt.block_on(check(etcd_store));
    }
}

#[test]
fn writes_are_all_or_nothing_and_compare_revisions() {
    on_both_stores(|s| async move {
        s.commit(vec![put("a", "1", Expect::Absent)]).await.unwrap();
        let a = s.get("a").await.unwrap().unwrap();
        let err = s
            .commit(vec![
                put("b", "2", Expect::Absent),
                put("a", "3", Expect::Absent),
            ])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(
            s.get("b").await.unwrap(),
            None,
            "{}: partial write",
            s.location()
        );
        s.commit(vec![put("a", "4", Expect::Revision(a.revision))])
            .await
            .unwrap();
        let stale = s
            .commit(vec![put("a", "5", Expect::Revision(a.revision))])
            .await;
        assert!(matches!(stale, Err(StoreError::Conflict { .. })));
        let a2 = s.get("a").await.unwrap().unwrap();
        assert_eq!(a2.value, "4");
        assert!(a2.revision > a.revision);
        s.commit(vec![Write::Delete {
            key: "a".into(),
            expect: Expect::Revision(a2.revision),
        }])
        .await
        .unwrap();
        assert_eq!(s.get("a").await.unwrap(), None);
    });
}

#[test]
fn list_returns_exactly_the_prefix_in_key_order() {
    on_both_stores(|s| async move {
        for key in ["blocks/2", "blocks/1", "handles/x", "blocksx"] {
            s.commit(vec![put(key, "{}", Expect::Absent)])
                .await
                .unwrap();
        }
        let keys: Vec<String> = s
            .list("blocks/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["blocks/1", "blocks/2"], "{}", s.location());
    });
}

#[test]
fn a_listing_and_its_watch_miss_nothing_between_them() {
    on_both_stores(|s| async move {
        s.commit(vec![put("n/a", "1", Expect::Absent)])
            .await
            .unwrap();
        let old = s
            .commit(vec![put("n/b", "2", Expect::Absent)])
            .await
            .unwrap();
        // Later writes elsewhere: the listing's revision is beyond the newest n/ key.
        for i in 0..5 {
            s.commit(vec![put(&format!("other/{i}"), "0", Expect::Absent)])
                .await
                .unwrap();
        }
        let (listed, mut events) = s.list_and_watch("n/").await.unwrap();
        let keys: Vec<&str> = listed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["n/a", "n/b"], "{}", s.location());
        s.commit(vec![Write::Delete {
            key: "n/b".into(),
            expect: Expect::Revision(old),
        }])
        .await
        .unwrap();
        s.commit(vec![put("n/c", "3", Expect::Absent)])
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: events so far {seen:?}", s.location()))
                .unwrap()
                .unwrap();
            seen.push(match event {
                WatchEvent::Put { key, .. } => format!("put {key}"),
                WatchEvent::Delete { key, .. } => format!("delete {key}"),
            });
        }
        seen.sort();
        assert_eq!(seen, ["delete n/b", "put n/c"], "{}", s.location());
    });
}

#[test]
fn a_read_answers_each_key_and_prefix_in_order() {
    on_both_stores(|s| async move {
        for key in ["blocks/2", "blocks/1", "handles/x", "config/ipam"] {
            s.commit(vec![put(key, &format!("\"{key}\""), Expect::Absent)])
                .await
                .unwrap();
        }
        let found = s
            .read(&[
                Read::Key("handles/x".into()),
                Read::Prefix("blocks/".into()),
                Read::Key("handles/missing".into()),
                Read::Key("config/ipam".into()),
                Read::Prefix("nothing/".into()),
            ])
            .await
            .unwrap();
        let keys: Vec<Vec<&str>> = found
            .iter()
            .map(|part| part.iter().map(|(k, _)| k.as_str()).collect())
            .collect();
        let want: [&[&str]; 5] = [
            &["handles/x"],
            &["blocks/1", "blocks/2"],
            &[],
            &["config/ipam"],
            &[],
        ];
        assert_eq!(keys, want, "{}", s.location());
        assert_eq!(found[1][1].1.value, "\"blocks/2\"");
        let x = s.get("handles/x").await.unwrap().unwrap();
        assert_eq!(
            found[0][0].1,
            x,
            "{}: same value and revision as get",
            s.location()
        );
    });
}

#[test]
fn watch_reports_changes_after_a_revision() {
    on_both_stores(|s| async move {
        let rev = s
            .commit(vec![put("n/a", "1", Expect::Absent)])
            .await
            .unwrap();
        let mut rx = s.watch("n/", rev).await.unwrap();
        s.commit(vec![put("n/b", "2", Expect::Absent)])
            .await
            .unwrap();
        let a = s.get("n/a").await.unwrap().unwrap();
        s.commit(vec![Write::Delete {
            key: "n/a".into(),
            expect: Expect::Revision(a.revision),
        }])
        .await
        .unwrap();
        s.commit(vec![put("other/c", "3", Expect::Absent)])
            .await
            .unwrap();
        let mut events = Vec::new();
        while events.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("watch event in time")
                .unwrap()
                .unwrap();
            events.push(event);
        }
        assert!(
            matches!(&events[0], WatchEvent::Put { key, .. } if key == "n/b"),
            "{events:?}"
        );
        assert!(
            matches!(&events[1], WatchEvent::Delete { key, .. } if key == "n/a"),
            "{events:?}"
        );
    });
}

#[test]
fn concurrent_compare_and_swap_loses_no_update() {
    on_both_stores(|s| async move {
        let s: std::sync::Arc<dyn Store> = std::sync::Arc::from(s);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    let mut attempt = 0;
                    loop {
                        let cur = s.get("counter").await.unwrap();
                        let n: u64 = cur.as_ref().map_or(0, |v| v.value.parse().unwrap());
                        let w = put(
                            "counter",
                            &(n + 1).to_string(),
                            Expect::from_current(cur.as_ref()),
                        );
                        match s.commit(vec![w]).await {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => {
                                attempt += 1;
                                tokio::time::sleep(store::conflict_backoff(attempt)).await;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            s.get("counter").await.unwrap().unwrap().value,
            "200",
            "{}",
            s.location()
        );
    });
}

#[test]
fn an_unreachable_etcd_is_reported_as_unavailable_quickly() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let url = etcd.url();
    etcd.stop();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = store::open(&url).unwrap();
    let started = std::time::Instant::now();
    let err = rt.block_on(s.get("x")).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", etcd.client_port)),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// A file store on a small tmpfs that is then filled up.
struct FullDisk {
    dir: tempfile::TempDir,
    filler: std::path::PathBuf,
}

impl FullDisk {
    fn mount(size: &str) -> Option<FullDisk> {
        if !calyx_e2e::lab::privileged() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let options = format!("size={size}");
        calyx_e2e::lab::must(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &options,
                "calyx-test-full",
                dir.path().to_str().unwrap(),
            ],
        );
        let filler = dir.path().join("filler");
        Some(FullDisk { dir, filler })
    }

    fn store_url(&self) -> String {
        format!("file://{}/store", self.dir.path().display())
    }

    /// Fills the disk, then frees `leave` bytes again.
    fn fill_leaving(&self, leave: u64) {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&self.filler).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let len = file.metadata().unwrap().len();
        file.set_len(len.saturating_sub(leave)).unwrap();
    }

    fn free(&self) {
        std::fs::remove_file(&self.filler).unwrap();
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = calyx_e2e::lab::sh("umount", &[self.dir.path().to_str().unwrap()]);
    }
}

/// A commit that cannot be written on a full disk fails and leaves nothing; a commit
/// whose line was written stays committed even when the compaction after it fails.
#[test]
fn a_full_disk_fails_a_commit_cleanly_or_not_at_all() {
    let Some(disk) = FullDisk::mount("2m") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = store::open(&disk.store_url()).unwrap();
        let value = format!("\"{}\"", "x".repeat(2000));
        for i in 0..125 {
            s.commit(vec![put(&format!("k/{i}"), &value, Expect::Absent)])
                .await
                .unwrap();
        }
        let journal = disk.dir.path().join("store.journal");
        let before = std::fs::metadata(&journal).unwrap().len();

        disk.fill_leaving(0);
        // Larger than a page, so it cannot fit in the slack of the journal's last page.
        let too_big = format!("\"{}\"", "y".repeat(3 * 4096));
        let err = s
            .commit(vec![put("k/full", &too_big, Expect::Absent)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        assert_eq!(
            std::fs::metadata(&journal).unwrap().len(),
            before,
            "a failed commit left bytes"
        );

        // Room for the journal lines, not for the compaction one of them starts.
        disk.free();
        disk.fill_leaving(16 * 1024);
        for i in 125..130 {
            s.commit(vec![put(&format!("k/{i}"), &value, Expect::Absent)])
                .await
                .unwrap_or_else(|e| panic!("commit {i}, durable in the journal, reported {e}"));
        }
        let fresh = store::open(&disk.store_url()).unwrap();
        let keys = fresh.list("k/").await.unwrap();
        assert_eq!(keys.len(), 130);
        assert!(keys.iter().all(|(k, _)| k != "k/full"));

        disk.free();
        s.commit(vec![put("k/after", &value, Expect::Absent)])
            .await
            .unwrap();
        assert!(
            std::fs::metadata(&journal).unwrap().len() < before,
            "compacted once there was room"
        );
        assert_eq!(fresh.list("k/").await.unwrap().len(), 131);
    });
}

/// Faults at random points of the embedded store's life: the journal cut at any byte,
/// any byte changed, the snapshot or the journal removed, the disk filled. After each,
/// a read or a commit by a new client either fails with an error that names the store
/// or sees every acknowledged commit (and keeps its own): never less, never other.
#[test]
fn random_faults_either_fail_clearly_or_lose_nothing() {
    let Some(disk) = FullDisk::mount("4m") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seed = std::env::var("CALYX_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut failed_clearly, mut durable) = (0, 0);
    for round in 0..80 {
        let dir = disk.dir.path().join(format!("r{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store");
        let url = format!("file://{}", path.display());
        let mut acked = std::collections::BTreeMap::new();
        rt.block_on(async {
            let s = store::open(&url).unwrap();
            // Enough commits now and then to have compacted once.
            let commits = if rng.bool() {
                rng.usize(1..20)
            } else {
                rng.usize(120..160)
            };
            let big = "x".repeat(2000);
            for i in 0..commits {
                let value = format!("\"{}{i}\"", &big[..rng.usize(1..2000)]);
                let key = format!("k/{}", rng.usize(0..40));
                let expect = match acked.contains_key(&key) {
                    true => Expect::Revision(s.get(&key).await.unwrap().unwrap().revision),
                    false => Expect::Absent,
                };
                s.commit(vec![put(&key, &value, expect)]).await.unwrap();
                acked.insert(key, value);
            }
        });
        let journal = dir.join("store.journal");
        let fault = rng.usize(0..4);
        match fault {
            0 => {
                let len = std::fs::metadata(&journal).unwrap().len();
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&journal)
                    .unwrap();
                file.set_len(rng.u64(0..=len)).unwrap();
            }
            1 => {
                let mut data = std::fs::read(&journal).unwrap();
                if !data.is_empty() {
                    let at = rng.usize(0..data.len());
                    data[at] ^= 1 << rng.u8(0..8);
                    std::fs::write(&journal, data).unwrap();
                }
            }
            2 => {
                let victim = if rng.bool() { &journal } else { &path };
                let _ = std::fs::remove_file(victim);
            }
            _ => disk.fill_leaving(rng.u64(0..8192)),
        }
        rt.block_on(async {
            let s = store::open(&url).unwrap();
            let outcome = if rng.bool() {
                s.list("k/").await.map(|found| (found, None))
            } else {
                let key = "k/new".to_string();
                match s.commit(vec![put(&key, "\"new\"", Expect::Absent)]).await {
                    Ok(_) => store::open(&url)
                        .unwrap()
                        .list("k/")
                        .await
                        .map(|found| (found, Some(key))),
                    Err(e) => Err(e),
                }
            };
            match outcome {
                Ok((found, new_key)) => {
                    let found: std::collections::BTreeMap<String, String> =
                        found.into_iter().map(|(k, v)| (k, v.value)).collect();
                    let mut want = acked.clone();
                    if let Some(key) = new_key {
                        want.insert(key, "\"new\"".into());
                    }
                    assert_eq!(
                        found, want,
                        "round {round}, fault {fault} (seed {seed}): read less or other than committed"
                    );
                    durable += 1;
                }
                Err(e) => {
                    let named = e.to_string().contains(&dir.display().to_string());
                    assert!(named, "round {round}, fault {fault}: error names no file: {e}");
                    failed_clearly += 1;
                }
            }
        });
        if fault == 3 {
            disk.free();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("80 rounds: {durable} read or committed everything, {failed_clearly} failed naming the store");
    assert!(
        durable > 0 && failed_clearly > 0,
        "the faults exercised both outcomes"
    );
}
