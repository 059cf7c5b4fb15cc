//! iptables mode: kube-proxy's chains (`chains`), kept as wanted per family across
//! changes by a `RulesAssembler`, written by the firewall layer's `RulesetSync`: a
//! change recomputes and compares only its Services' chains (and the shared chains
//! whose rules it changed), as kube-proxy's partial syncs do.

pub mod chains;

use std::collections::BTreeMap;
use std::time::Instant;

use calyx_dataplane::firewall::iptables::{self as ipt, ChainNames, Ruleset, RulesetSync};
use calyx_dataplane::firewall::{FirewallError, IpFamily};

use super::kube_chains;
#[cfg(test)]
use super::model::ProxyState;
use super::model::{PortPlan, ServiceKey};
use super::node::NodeSettings;
use super::proxier::{Changes, Prefetch, Proxier, Result, Scope};
use chains::{ServiceRules, SharedChain};

/// What one Service put in: the names of its own chains (their rules are in the
/// ruleset) and how many rules it has in each shared chain. The shared rules
/// themselves live only in the ruleset, in runs laid out by Service key.
#[derive(Default)]
struct ServiceShare {
    chains: Vec<String>,
    shared_counts: [usize; SharedChain::ALL.len()],
}

/// A Service replaced since the last `finish`: its chain names and shared rules now.
struct Replaced {
    chains: Vec<String>,
    shared: BTreeMap<SharedChain, Vec<String>>,
}

/// One family's ruleset as wanted, kept across changes: a changed Service's chains
/// are replaced, and its runs in the shared chains are spliced when the batch ends.
pub struct RulesAssembler {
    ruleset: Ruleset,
    services: BTreeMap<ServiceKey, ServiceShare>,
    replaced: BTreeMap<ServiceKey, Replaced>,
    /// The chains touched since `take_before`, as they were before (the firewall
    /// layer plans a change from them, so it need not hold a copy of the ruleset).
    before: Ruleset,
}

impl RulesAssembler {
    pub fn new(family: IpFamily, node: &NodeSettings) -> RulesAssembler {
        let mut ruleset = chains::skeleton(family);
        let nat_services = SharedChain::NatServices;
        ruleset.table(nat_services.table()).chains.insert(
            nat_services.name().to_string(),
            chains::node_ports_last(family, node),
        );
        RulesAssembler {
            ruleset,
            services: BTreeMap::new(),
            replaced: BTreeMap::new(),
            before: Ruleset::new(family),
        }
    }

    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    /// The touched chains as they were before the changes since the last call.
    pub fn take_before(&mut self) -> Ruleset {
        std::mem::replace(&mut self.before, Ruleset::new(self.ruleset.family))
    }

    /// Notes `chain` as it is now, the first time a change touches it.
    fn remember(&mut self, table: &'static str, chain: &str, touched: &mut ChainNames) {
        if touched.insert((table, chain.to_string())) {
            if let Some(rules) = self
                .ruleset
                .tables
                .get(table)
                .and_then(|t| t.chains.get(chain))
            {
                self.before
                    .table(table)
                    .chains
                    .insert(chain.to_string(), rules.clone());
            }
        }
    }

    /// Replaces one Service's rules (its plans in this family; none: it is gone),
    /// adding the chains it touched to `touched`. Call `finish` after the last one.
    pub fn replace(&mut self, key: &ServiceKey, plans: &[PortPlan], touched: &mut ChainNames) {
        let mut sorted: Vec<&PortPlan> = plans.iter().collect();
        sorted.sort_by(|a, b| a.port_name.cmp(&b.port_name));
        let ServiceRules { chains, shared } = chains::service_rules(&sorted, self.ruleset.family);
        let old_chains = match self.replaced.remove(key) {
            Some(replaced) => replaced.chains,
            None => self
                .services
                .get_mut(key)
                .map(|share| std::mem::take(&mut share.chains))
                .unwrap_or_default(),
        };
        for name in old_chains {
            if !chains.contains_key(&name) {
                self.remember("nat", &name, touched);
                self.ruleset.table("nat").chains.remove(&name);
            }
        }
        let names: Vec<String> = chains.keys().cloned().collect();
        for (name, rules) in chains {
            if self.ruleset.table("nat").chains.get(&name) != Some(&rules) {
                self.remember("nat", &name, touched);
                self.ruleset.table("nat").chains.insert(name, rules);
            }
        }
        self.replaced.insert(
            key.clone(),
            Replaced {
                chains: names,
                shared,
            },
        );
    }

    /// Splices the replaced Services' runs into the shared chains (adding those that
    /// changed to `touched`) and records what each Service now has.
    pub fn finish(&mut self, touched: &mut ChainNames) {
        let mut replaced = std::mem::take(&mut self.replaced);
        let counts: Vec<[usize; SharedChain::ALL.len()]> = replaced
            .values()
            .map(|r| SharedChain::ALL.map(|chain| r.shared.get(&chain).map_or(0, Vec::len)))
            .collect();
        for (i, chain) in SharedChain::ALL.into_iter().enumerate() {
            let involved = replaced.iter().zip(&counts).any(|((key, _), new)| {
                new[i] > 0
                    || self
                        .services
                        .get(key)
                        .is_some_and(|s| s.shared_counts[i] > 0)
            });
            if involved {
                self.splice(i, chain, &mut replaced, touched);
            }
        }
        for ((key, r), shared_counts) in replaced.into_iter().zip(counts) {
            if r.chains.is_empty() && shared_counts == [0; SharedChain::ALL.len()] {
                self.services.remove(&key);
            } else {
                let share = ServiceShare {
                    chains: r.chains,
                    shared_counts,
                };
                self.services.insert(key, share);
            }
        }
    }

    /// Lays shared chain `chain` (index `i`) out again: every Service's run in key
    /// order, the replaced ones' new rules in place of their old runs; whatever
    /// follows the last run (KUBE-SERVICES' node-port jump) stays last.
    fn splice(
        &mut self,
        i: usize,
        chain: SharedChain,
        replaced: &mut BTreeMap<ServiceKey, Replaced>,
        touched: &mut ChainNames,
    ) {
        let (table, name) = (chain.table(), chain.name());
        let old = self
            .ruleset
            .table(table)
            .chains
            .remove(name)
            .unwrap_or_default();
        let mut old_rules = old.iter();
        let mut new = Vec::with_capacity(old.len());
        // Both maps are in key order: walk them together.
        let mut kept = self.services.iter().peekable();
        let mut changed = replaced.iter_mut().peekable();
        loop {
            let take_kept = match (kept.peek(), changed.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((a, _)), Some((b, _))) => a <= b,
            };
            if take_kept {
                let (key, share) = kept.next().expect("peeked");
                let run = old_rules.by_ref().take(share.shared_counts[i]);
                match changed.peek() {
                    Some((k, _)) if *k == key => {
                        run.for_each(drop);
                        let (_, r) = changed.next().expect("peeked");
                        new.extend(r.shared.remove(&chain).unwrap_or_default());
                    }
                    _ => new.extend(run.cloned()),
                }
            } else {
                let (_, r) = changed.next().expect("peeked");
                new.extend(r.shared.remove(&chain).unwrap_or_default());
            }
        }
        new.extend(old_rules.cloned());
        let now = if new == old {
            old
        } else {
            if touched.insert((table, name.to_string())) {
                self.before
                    .table(table)
                    .chains
                    .insert(name.to_string(), old);
            }
            new
        };
        self.ruleset
            .table(table)
            .chains
            .insert(name.to_string(), now);
    }
}

pub struct IptablesProxier {
    backend: Box<dyn ipt::Backend>,
    node: NodeSettings,
    rulesets: [RulesetSync; 2],
    assemblers: [Option<RulesAssembler>; 2],
    /// This sync reads the kernel rather than trusting what was last written.
    reread: bool,
    prefetch: Option<Prefetch<Ruleset>>,
}

impl IptablesProxier {
    pub fn new(backend: Box<dyn ipt::Backend>, node: NodeSettings) -> IptablesProxier {
        IptablesProxier {
            backend,
            node,
            rulesets: [
                RulesetSync::new(chains::ownership()),
                RulesetSync::new(chains::ownership()),
            ],
            assemblers: [None, None],
            reread: false,
            prefetch: None,
        }
    }

    /// Starts reading the kernel's rules for the first sync, with `read` (which owns
    /// its own backend: the thread outlives this call).
    pub fn prefetch(
        &mut self,
        read: impl FnOnce() -> [std::result::Result<Ruleset, FirewallError>; 2] + Send + 'static,
    ) {
        self.prefetch = Prefetch::start(read);
    }

    fn sync_family(&mut self, family: IpFamily, changes: &Changes) -> Result<usize> {
        let i = family as usize;
        let reread = self.reread;
        let started = Instant::now();
        let full = matches!(changes.scope, Scope::Full { .. });
        if full {
            self.assemblers[i] = None;
        }
        let node = &self.node;
        let assembler = self.assemblers[i].get_or_insert_with(|| RulesAssembler::new(family, node));
        let mut touched = ChainNames::new();
        for (key, plans) in changes.services {
            assembler.replace(key, plans, &mut touched);
        }
        assembler.finish(&mut touched);
        let computed = started.elapsed();
        let backend = self.backend.as_ref();
        let before = assembler.take_before();
        let tx = if full {
            self.rulesets[i].sync_held(backend, assembler.ruleset(), reread)?
        } else {
            self.rulesets[i].sync_changed(backend, &before, assembler.ruleset(), &touched)?
        };
        let ops = tx.tables.iter().map(|(_, ops)| ops.len()).sum::<usize>();
        tracing::debug!(%family, ?computed, written = ?started.elapsed(), ops, "iptables sync");
        Ok(ops)
    }
}

impl Proxier for IptablesProxier {
    fn begin(&mut self, scope: Scope) -> Result<()> {
        let syncs = &mut self.rulesets;
        self.reread = Prefetch::begin(&mut self.prefetch, scope, |i, read| {
            syncs[i].start_from(read)
        });
        Ok(())
    }

    fn sync(&mut self, family: IpFamily, changes: &Changes) -> Result<usize> {
        // After a failure what the kernel holds is unknown: rebuilt on the next sync.
        self.sync_family(family, changes)
            .inspect_err(|_| self.assemblers = [None, None])
    }

    fn drifted(&mut self) -> Option<String> {
        kube_chains::jumps_drifted(&self.rulesets, self.backend.as_ref())
    }
}

/// Removes this mode's chains (another mode runs, or `--proxy-cleanup`).
pub fn remove_all(backend: &dyn ipt::Backend) {
    for family in IpFamily::BOTH {
        let mut sync = RulesetSync::new(chains::ownership());
        match sync.sync(backend, &Ruleset::new(family), true) {
            Ok(tx) if !tx.is_empty() => {
                tracing::info!(%family, "removed the iptables proxy chains")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%family, error = %e, "could not remove the iptables proxy chains")
            }
        }
    }
}

/// The whole ruleset for `plans` at once (what a full sync writes).
#[cfg(test)]
pub fn desired_ruleset(plans: &[PortPlan], family: IpFamily, node: &NodeSettings) -> Ruleset {
    let mut by_service: BTreeMap<&ServiceKey, Vec<PortPlan>> = BTreeMap::new();
    for plan in plans {
        by_service
            .entry(&plan.service)
            .or_default()
            .push(plan.clone());
    }
    let mut assembler = RulesAssembler::new(family, node);
    let mut touched = ChainNames::new();
    for (key, plans) in by_service {
        assembler.replace(key, &plans, &mut touched);
    }
    assembler.finish(&mut touched);
    assembler.ruleset
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::port_plans;
    use crate::proxy::proxier::ServiceUpdate;
    use crate::proxy::testing::{endpoint, service, slice, slice_mut, state};
    use calyx_dataplane::firewall::iptables::RecordingIptables;
    use std::sync::Arc;

    fn node() -> NodeSettings {
        NodeSettings {
            nodeport_addresses: vec!["192.0.2.11/32".parse().unwrap()],
        }
    }

    #[test]
    fn a_change_rewrites_only_the_chains_of_its_service() {
        let mut st = state(
            (0..50)
                .map(|i| service(&format!("s{i}"), &format!("10.96.0.{}", i + 1), 80))
                .collect(),
            (0..50)
                .map(|i| {
                    slice(
                        &format!("s{i}"),
                        8080,
                        vec![endpoint(&format!("10.244.1.{}", i + 1), "n1")],
                    )
                })
                .collect(),
        );
        let fake = Arc::new(RecordingIptables::new());
        let mut proxier = IptablesProxier::new(Box::new(fake.clone()), node());
        let updates = |st: &ProxyState, keys: &[&str]| -> [Vec<ServiceUpdate>; 2] {
            IpFamily::BOTH.map(|family| {
                let plans = port_plans(st, "n1", family);
                keys.iter()
                    .map(|k| {
                        let key = crate::proxy::testing::key(k);
                        let own = plans.iter().filter(|p| p.service == key).cloned().collect();
                        (key, own)
                    })
                    .collect()
            })
        };
        // One sync as the controller runs it.
        let run =
            |proxier: &mut IptablesProxier, scope: Scope, updates: &[Vec<ServiceUpdate>; 2]| {
                proxier.begin(scope).unwrap();
                for (family, services) in IpFamily::BOTH.into_iter().zip(updates) {
                    let changes = Changes {
                        scope,
                        services,
                        health_check_ports: &[],
                    };
                    proxier.sync(family, &changes).unwrap();
                }
            };
        let all: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let full = updates(&st, &all);
        run(&mut proxier, Scope::Full { reread: true }, &full);
        fake.take_inputs();
        // A second endpoint for s7: its Service chain and a new endpoint chain only.
        slice_mut(&mut st, "s7")
            .endpoints
            .push(endpoint("10.244.2.7", "n2"));
        let change = updates(&st, &["s7"]);
        run(&mut proxier, Scope::Partial, &change);
        let inputs = fake.take_inputs().join("");
        let declared: Vec<&str> = inputs.lines().filter_map(|l| l.strip_prefix(':')).collect();
        assert_eq!(
            declared.len(),
            2,
            "one KUBE-SVC and one new KUBE-SEP: {inputs}"
        );
        assert!(declared
            .iter()
            .all(|d| d.starts_with("KUBE-SVC-") || d.starts_with("KUBE-SEP-")));
        // The whole ruleset is what a full build of the same state gives.
        let whole = desired_ruleset(&port_plans(&st, "n1", IpFamily::V4), IpFamily::V4, &node());
        for (table, rules) in &whole.tables {
            for (chain, want) in &rules.chains {
                assert_eq!(
                    fake.chain(IpFamily::V4, table, chain).as_ref(),
                    Some(want),
                    "{table} {chain}"
                );
            }
        }
        // s7 loses every endpoint: its chains go and it is refused in filter KUBE-SERVICES.
        slice_mut(&mut st, "s7").endpoints.clear();
        let change = updates(&st, &["s7"]);
        run(&mut proxier, Scope::Partial, &change);
        let filter = fake.chain(IpFamily::V4, "filter", "KUBE-SERVICES").unwrap();
        assert_eq!(filter.len(), 1);
        assert!(
            filter[0].contains("default/s7:http has no endpoints"),
            "{filter:?}"
        );
        let nat = fake.chains(IpFamily::V4, "nat");
        for gone in ["10.244.1.8:8080", "10.244.2.7:8080"] {
            assert!(
                !nat.values().flatten().any(|rule| rule.contains(gone)),
                "{gone} is still DNATed to"
            );
        }
    }
}
