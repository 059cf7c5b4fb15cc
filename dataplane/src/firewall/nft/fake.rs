//! A fake kernel's nftables for tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;

/// A fake kernel for tests: holds tables, applies transactions to them the way the
/// kernel does (refusing what it would refuse), and records every script.
#[derive(Default)]
pub struct RecordingNft {
    tables: Mutex<BTreeMap<(Family, String), Table>>,
    scripts: Mutex<Vec<String>>,
    /// Refuse the next transaction (tests of what follows a failed write).
    fail_next: std::sync::atomic::AtomicBool,
}

impl RecordingNft {
    /// Refuses the next `apply`, as the tool refuses a transaction: nothing of it
    /// takes effect.
    pub fn fail_next_apply(&self) {
        self.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn new() -> RecordingNft {
        RecordingNft::default()
    }

    pub fn table(&self, family: impl Into<Family>, name: &str) -> Option<Table> {
        self.lock_tables()
            .get(&(family.into(), name.to_string()))
            .cloned()
    }

    /// Every script applied so far, oldest first.
    pub fn scripts(&self) -> Vec<String> {
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn take_scripts(&self) -> Vec<String> {
        std::mem::take(&mut *self.scripts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn lock_tables(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Family, String), Table>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for RecordingNft {
    fn dump(&self, family: Family, table: &str) -> Result<Option<Table>, FirewallError> {
        Ok(self.table(family, table))
    }

    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError> {
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(FirewallError::Refused {
                tool: "nft (fake)".into(),
                stderr: "refused as asked".into(),
            });
        }
        let mut tables = self.lock_tables();
        let key = (tx.family, tx.table.clone());
        // Work on a copy: a refused transaction changes nothing.
        let mut table = tables.get(&key).cloned();
        let refuse = |why: String| FirewallError::Refused {
            tool: "fake nft".into(),
            stderr: why,
        };
        for op in &tx.ops {
            if !matches!(op, Op::AddTable) && table.is_none() {
                return Err(refuse(format!("{op:?}: no table {}", tx.table)));
            }
            match op {
                Op::AddTable => {
                    table.get_or_insert_with(|| Table::new(tx.family, tx.table.clone()));
                }
                Op::DeleteTable => table = None,
                Op::AddChain(name, hook) => {
                    let t = table.as_mut().expect("checked");
                    t.chains.entry(name.clone()).or_insert(Chain {
                        hook: hook.clone(),
                        ..Chain::default()
                    });
                }
                Op::FlushChain(name) => {
                    let t = table.as_mut().expect("checked");
                    t.chains
                        .get_mut(name)
                        .ok_or_else(|| refuse(format!("flush: no chain {name}")))?
                        .rules
                        .clear();
                }
                Op::DeleteChain(name) => {
                    let t = table.as_mut().expect("checked");
                    let chain = t
                        .chains
                        .get(name)
                        .ok_or_else(|| refuse(format!("delete: no chain {name}")))?;
                    if !chain.rules.is_empty() {
                        return Err(refuse(format!("delete chain {name}: not empty")));
                    }
                    let target = format!(" {name}");
                    let referenced =
                        t.chains.values().flat_map(|c| &c.rules).any(|r| {
                            r.ends_with(&format!("jump{target}"))
                                || r.ends_with(&format!("goto{target}"))
                        }) || t.sets.values().flat_map(|s| s.elements.values()).any(|v| {
                            v.as_deref()
                                .is_some_and(|v| v.ends_with(&target) && v.contains("goto"))
                        });
                    if referenced {
                        return Err(refuse(format!("delete chain {name}: still referenced")));
                    }
                    t.chains.remove(name);
                }
                Op::AddRule(chain, rule, _) => {
                    let t = table.as_mut().expect("checked");
                    t.chains
                        .get_mut(chain)
                        .ok_or_else(|| refuse(format!("add rule: no chain {chain}")))?
                        .rules
                        .push(rule.clone());
                }
                Op::AddSet(name, set) => {
                    let t = table.as_mut().expect("checked");
                    t.sets.entry(name.clone()).or_insert_with(|| set.clone());
                }
                Op::DeleteSet(name) => {
                    let t = table.as_mut().expect("checked");
                    if t.chains
                        .values()
                        .flat_map(|c| &c.rules)
                        .any(|r| r.contains(&format!("@{name}")))
                    {
                        return Err(refuse(format!("delete set {name}: still referenced")));
                    }
                    t.sets.remove(name);
                }
                Op::AddElements(name, elements) => {
                    let t = table.as_mut().expect("checked");
                    let chains: BTreeSet<String> = t.chains.keys().cloned().collect();
                    let set = t
                        .sets
                        .get_mut(name)
                        .ok_or_else(|| refuse(format!("add element: no set {name}")))?;
                    for (k, v) in elements {
                        if let Some(target) = v.as_deref().and_then(|v| v.strip_prefix("goto ")) {
                            if !chains.contains(target) {
                                return Err(refuse(format!("{name}: goto unknown chain {target}")));
                            }
                        }
                        // As the kernel: adding an existing key keeps its old value.
                        set.elements.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                Op::AddCounter(name) => {
                    table
                        .as_mut()
                        .expect("checked")
                        .counters
                        .insert(name.clone());
                }
                Op::DeleteCounter(name) => {
                    let t = table.as_mut().expect("checked");
                    let reference = format!("counter name {name} ");
                    if t.chains
                        .values()
                        .flat_map(|c| &c.rules)
                        .any(|r| format!("{r} ").contains(&reference))
                    {
                        return Err(refuse(format!("delete counter {name}: still referenced")));
                    }
                    if !t.counters.remove(name) {
                        return Err(refuse(format!("delete counter {name}: not there")));
                    }
                }
                Op::DeleteElements(name, keys) => {
                    let t = table.as_mut().expect("checked");
                    let set = t
                        .sets
                        .get_mut(name)
                        .ok_or_else(|| refuse(format!("delete element: no set {name}")))?;
                    for k in keys {
                        if set.elements.remove(k).is_none() {
                            return Err(refuse(format!(
                                "delete element {k} from {name}: not there"
                            )));
                        }
                    }
                }
            }
        }
        match table {
            Some(t) => tables.insert(key, t),
            None => tables.remove(&key),
        };
        self.scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx.script());
        Ok(())
    }
}
