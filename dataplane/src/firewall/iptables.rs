//! iptables: chains owned by one caller (named exactly or by prefix) in the builtin
//! tables, plus the jumps into them from builtin chains. `plan` rewrites only chains
//! whose rules differ, adds missing jumps, and removes owned chains and jumps that are
//! no longer wanted, as one `iptables-restore --noflush` input. Chains the caller does
//! not own are never written, flushed or deleted.
//!
//! Rules are kept in the form `iptables-save` prints them (`-d 10.96.0.1/32`,
//! `-p tcp -m tcp --dport 80`), so a dump compares equal to what was written and a
//! restart rewrites nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::{run_tool, FirewallError, IpFamily};

pub const TABLES: [&str; 4] = ["raw", "mangle", "nat", "filter"];

/// Which chains a caller owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub exact: Vec<&'static str>,
    pub prefixes: Vec<&'static str>,
}

impl Ownership {
    pub fn owns(&self, chain: &str) -> bool {
        self.exact.contains(&chain) || self.prefixes.iter().any(|p| chain.starts_with(p))
    }
}

/// A rule in a builtin chain that jumps into an owned chain, e.g. `-j CALYX-FORWARD`
/// in FORWARD; inserted at the top when missing. A jump that must come `first` (before
/// every rule of other owners, e.g. the proxy's REJECT of Services without endpoints
/// before a blanket pod ACCEPT) is moved back to the top when a full sync finds it below
/// someone else's rule.
#[derive(Debug, Clone, Eq)]
pub struct Jump {
    pub from: String,
    pub rule: String,
    pub first: bool,
}

impl PartialEq for Jump {
    /// The same rule in the same chain, wherever it must be.
    fn eq(&self, other: &Jump) -> bool {
        self.from == other.from && self.rule == other.rule
    }
}

impl Jump {
    pub fn new(from: impl Into<String>, rule: impl Into<String>) -> Jump {
        Jump {
            from: from.into(),
            rule: rule.into(),
            first: false,
        }
    }

    pub fn first(from: impl Into<String>, rule: impl Into<String>) -> Jump {
        Jump {
            first: true,
            ..Jump::new(from, rule)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    /// Owned chain -> its rules, each without the leading `-A <chain> `.
    pub chains: BTreeMap<String, Vec<String>>,
    pub jumps: Vec<Jump>,
    /// In a dump: owned jumps found below another owner's rule in their chain.
    pub below_foreign: Vec<Jump>,
}

/// One family's owned chains, by table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: IpFamily,
    pub tables: BTreeMap<&'static str, TableRules>,
}

impl Ruleset {
    pub fn new(family: IpFamily) -> Ruleset {
        Ruleset {
            family,
            tables: BTreeMap::new(),
        }
    }

    pub fn table(&mut self, name: &'static str) -> &mut TableRules {
        self.tables.entry(name).or_default()
    }

    pub fn rule_count(&self) -> usize {
        self.tables
            .values()
            .flat_map(|t| t.chains.values())
            .map(Vec::len)
            .sum()
    }
}

/// A rule as typed parts, rendered in the order `iptables-save` prints them (`-s`, `-d`,
/// `-i`, `-p`, then the matches in the order given, then the target), so that what is
/// written compares equal to what a dump reads back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    source: Option<String>,
    destination: Option<String>,
    in_interface: Option<(bool, String)>,
    protocol: Option<&'static str>,
    matches: Vec<String>,
}

impl Rule {
    pub fn new() -> Rule {
        Rule::default()
    }

    /// `-s`, a CIDR as iptables-save prints it (`10.0.0.1/32`).
    pub fn source(mut self, cidr: impl Into<String>) -> Rule {
        self.source = Some(cidr.into());
        self
    }

    /// `-d`, a CIDR as iptables-save prints it.
    pub fn destination(mut self, cidr: impl Into<String>) -> Rule {
        self.destination = Some(cidr.into());
        self
    }

    /// `! -i NAME`: not arriving on these interfaces (`+` is the wildcard).
    pub fn not_in_interface(mut self, name: impl Into<String>) -> Rule {
        self.in_interface = Some((true, name.into()));
        self
    }

    /// `-p`.
    pub fn protocol(mut self, protocol: &'static str) -> Rule {
        self.protocol = Some(protocol);
        self
    }

    /// `-m comment --comment "TEXT"` (iptables-save always quotes it).
    pub fn comment(self, text: impl std::fmt::Display) -> Rule {
        self.matching(format!("comment --comment \"{text}\""))
    }

    /// `-m PROTOCOL --dport PORT`; the protocol must be given with `protocol` too.
    pub fn dport(self, port: u16) -> Rule {
        let protocol = self.protocol.unwrap_or("tcp");
        self.matching(format!("{protocol} --dport {port}"))
    }

    /// `-m MODULE ARGS...`, after the matches already given.
    pub fn matching(mut self, module_and_arguments: impl std::fmt::Display) -> Rule {
        self.matches.push(format!("-m {module_and_arguments}"));
        self
    }

    /// The rule with `-j TARGET [options]`, as a chain holds it.
    pub fn jump(self, target: impl std::fmt::Display) -> String {
        let mut out = String::new();
        let mut word = |w: &str| {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(w);
        };
        if let Some(s) = &self.source {
            word("-s");
            word(s);
        }
        if let Some(d) = &self.destination {
            word("-d");
            word(d);
        }
        if let Some((negated, name)) = &self.in_interface {
            if *negated {
                word("!");
            }
            word("-i");
            word(name);
        }
        if let Some(p) = self.protocol {
            word("-p");
            word(p);
        }
        for m in &self.matches {
            word(m);
        }
        word("-j");
        word(&target.to_string());
        out
    }
}

/// Chains named by table, e.g. the ones a partial sync compares.
pub type ChainNames = std::collections::BTreeSet<(&'static str, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `:CHAIN - [0:0]`: creates the chain, or flushes it.
    Declare(String),
    Append(String, String),
    /// At the top of a builtin chain.
    Insert(String, String),
    Delete(String, String),
    DeleteChain(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub family: IpFamily,
    pub tables: Vec<(&'static str, Vec<Op>)>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.tables.iter().all(|(_, ops)| ops.is_empty())
    }

    /// The `iptables-restore --noflush` input.
    pub fn restore_input(&self) -> String {
        let mut out = String::new();
        for (table, ops) in &self.tables {
            if ops.is_empty() {
                continue;
            }
            writeln!(out, "*{table}").expect("String");
            for op in ops {
                match op {
                    Op::Declare(c) => writeln!(out, ":{c} - [0:0]"),
                    Op::Append(c, r) => writeln!(out, "-A {c} {r}"),
                    Op::Insert(c, r) => writeln!(out, "-I {c} 1 {r}"),
                    Op::Delete(c, r) => writeln!(out, "-D {c} {r}"),
                    Op::DeleteChain(c) => writeln!(out, "-X {c}"),
                }
                .expect("String");
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// The transaction that turns `current` into `desired` for the chains `owner` owns.
pub fn plan(current: &Ruleset, desired: &Ruleset) -> Transaction {
    let empty = TableRules::default();
    let mut tables = Vec::new();
    for table in TABLES {
        let want = desired.tables.get(table).unwrap_or(&empty);
        let have = current.tables.get(table).unwrap_or(&empty);
        let mut ops = Vec::new();
        let changed: Vec<&String> = want
            .chains
            .iter()
            .filter(|(name, rules)| have.chains.get(*name) != Some(*rules))
            .map(|(name, _)| name)
            .collect();
        let stale: Vec<&String> = have
            .chains
            .keys()
            .filter(|name| !want.chains.contains_key(*name))
            .collect();
        // Chains are written after the chains they jump to, so that the ops can be cut
        // into several restores (see `Transaction::split`) and every cut is a state in
        // which each jump has its target.
        for name in targets_first(&want.chains, &changed) {
            ops.push(Op::Declare(name.clone()));
            for rule in &want.chains[&name] {
                ops.push(Op::Append(name.clone(), rule.clone()));
            }
        }
        // A jump that must be first but is not is taken out and put back on top.
        let misplaced = |j: &Jump| j.first && have.below_foreign.contains(j);
        for jump in &have.jumps {
            let wanted = want.jumps.iter().find(|w| *w == jump);
            if wanted.is_none_or(misplaced) {
                ops.push(Op::Delete(jump.from.clone(), jump.rule.clone()));
            }
        }
        // Inserted at the top in reverse, so they end up in the order given.
        for jump in want.jumps.iter().rev() {
            if !have.jumps.contains(jump) || misplaced(jump) {
                ops.push(Op::Insert(jump.from.clone(), jump.rule.clone()));
            }
        }
        // Removed chains last, when nothing of ours jumps to them any more: emptied
        // (a declaration flushes), then deleted.
        for name in &stale {
            ops.push(Op::Declare((*name).clone()));
        }
        for name in stale {
            ops.push(Op::DeleteChain(name.clone()));
        }
        tables.push((table, ops));
    }
    Transaction {
        family: desired.family,
        tables,
    }
}

/// `changed` in an order where every chain comes after the changed chains it jumps to.
fn targets_first(chains: &BTreeMap<String, Vec<String>>, changed: &[&String]) -> Vec<String> {
    fn visit(
        name: &str,
        chains: &BTreeMap<String, Vec<String>>,
        changed: &std::collections::BTreeSet<&str>,
        done: &mut std::collections::BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        if !done.insert(name.to_string()) {
            return;
        }
        for rule in &chains[name] {
            if let Some(target) = jump_target(rule).filter(|t| changed.contains(t)) {
                visit(target, chains, changed, done, out);
            }
        }
        out.push(name.to_string());
    }
    let set: std::collections::BTreeSet<&str> = changed.iter().map(|s| s.as_str()).collect();
    // Walking down from the chains nothing else jumps to keeps each subtree (a
    // Service's chains) together, so a cut batch mostly refers to its own chains:
    // iptables-nft resolves a jump to a chain of an earlier batch slowly.
    let referenced: std::collections::BTreeSet<&str> = changed
        .iter()
        .flat_map(|name| chains[name.as_str()].iter().filter_map(|r| jump_target(r)))
        .filter(|t| set.contains(t))
        .collect();
    let roots = changed.iter().filter(|n| !referenced.contains(n.as_str()));
    let rest = changed.iter().filter(|n| referenced.contains(n.as_str()));
    let mut done = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for name in roots.chain(rest) {
        visit(name, chains, &set, &mut done, &mut out);
    }
    out
}

impl Transaction {
    /// Cuts a transaction that writes more than `max_chains` chains into several, at
    /// chain boundaries, in order. iptables-nft's restore with --noflush grows
    /// quadratically with the chains one input creates (25 s for 30,000 chains against
    /// 2.5 s in batches of 3,000, measured on Debian 12's iptables 1.8.9); `plan`
    /// orders the ops so that each cut leaves every jump with its target. Not atomic
    /// as a whole: each batch is, and each leaves a working state.
    pub fn split(&self, max_chains: usize) -> Vec<Transaction> {
        let mut out = Vec::new();
        for (table, ops) in &self.tables {
            let mut batch: Vec<Op> = Vec::new();
            let mut chains = 0;
            for op in ops {
                if matches!(op, Op::Declare(_)) {
                    if chains == max_chains {
                        out.push(Transaction {
                            family: self.family,
                            tables: vec![(*table, std::mem::take(&mut batch))],
                        });
                        chains = 0;
                    }
                    chains += 1;
                }
                batch.push(op.clone());
            }
            if !batch.is_empty() {
                out.push(Transaction {
                    family: self.family,
                    tables: vec![(*table, batch)],
                });
            }
        }
        out
    }
}

/// Chains per restore when a transaction is cut (see `Transaction::split`): large
/// enough to keep the restores few, small enough to stay off iptables-nft's quadratic
/// cost (README's benchmarks give the figures).
pub const CHAINS_PER_RESTORE: usize = 1500;

pub trait Backend: Send + Sync {
    /// The owned chains and the jumps into them, as the kernel holds them.
    fn dump(&self, family: IpFamily, owner: &Ownership) -> Result<Ruleset, FirewallError>;
    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError>;

    /// At least the jumps from `builtin` chains (table, chain) into owned chains, with
    /// their placement: what `RulesetSync::jumps_drifted` looks at. A backend that can
    /// read a few chains cheaply reads only those.
    fn dump_jumps(
        &self,
        family: IpFamily,
        owner: &Ownership,
        builtin: &[(&'static str, String)],
    ) -> Result<Ruleset, FirewallError> {
        let _ = builtin;
        self.dump(family, owner)
    }
}

/// A shared backend is a backend: tests keep a handle on the fake they hand over.
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn dump(&self, family: IpFamily, owner: &Ownership) -> Result<Ruleset, FirewallError> {
        (**self).dump(family, owner)
    }
    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError> {
        (**self).apply(tx)
    }
    fn dump_jumps(
        &self,
        family: IpFamily,
        owner: &Ownership,
        builtin: &[(&'static str, String)],
    ) -> Result<Ruleset, FirewallError> {
        (**self).dump_jumps(family, owner, builtin)
    }
}

/// Keeps one owner's chains as wanted (see `nft::TableSync`).
pub struct RulesetSync {
    owner: Ownership,
    last: Option<Ruleset>,
    /// Whether `last` holds the chains too, not only the jumps (`sync_held`).
    last_has_chains: bool,
}

impl RulesetSync {
    pub fn new(owner: Ownership) -> RulesetSync {
        RulesetSync {
            owner,
            last: None,
            last_has_chains: false,
        }
    }

    /// Takes `dumped` (what `Backend::dump` returned, read ahead of the first sync) as
    /// what the kernel holds, so the next sync need not read it again.
    pub fn start_from(&mut self, dumped: Ruleset) {
        self.last = Some(dumped);
        self.last_has_chains = true;
    }

    pub fn sync(
        &mut self,
        backend: &dyn Backend,
        desired: &Ruleset,
        reread: bool,
    ) -> Result<Transaction, FirewallError> {
        let tx = self.plan_full(backend, desired, reread)?;
        self.last = Some(desired.clone());
        self.last_has_chains = true;
        Ok(tx)
    }

    /// As `sync`, but remembers only the jumps it wrote, not a copy of every chain: for
    /// a caller that holds the wanted ruleset itself and hands `sync_changed` the old
    /// versions of the chains a change touches.
    pub fn sync_held(
        &mut self,
        backend: &dyn Backend,
        desired: &Ruleset,
        reread: bool,
    ) -> Result<Transaction, FirewallError> {
        let tx = self.plan_full(backend, desired, reread)?;
        self.last = Some(jumps_of(desired));
        self.last_has_chains = false;
        Ok(tx)
    }

    /// Plans and writes the whole of `desired` against the kernel (read again unless
    /// `last` holds every chain and no re-read was asked for). On failure nothing is
    /// remembered: the next sync reads the kernel again.
    fn plan_full(
        &mut self,
        backend: &dyn Backend,
        desired: &Ruleset,
        reread: bool,
    ) -> Result<Transaction, FirewallError> {
        let current = match self.last.take() {
            Some(last) if !reread && self.last_has_chains => last,
            _ => backend.dump(desired.family, &self.owner)?,
        };
        let tx = plan(&current, desired);
        drop(current);
        if !tx.is_empty() {
            backend.apply(&tx)?;
        }
        Ok(tx)
    }

    /// Writes the chains in `touched` as `desired` has them (or removes them), where
    /// `before` holds those chains as the last sync left them (a chain `before` lacks
    /// was not there). With nothing written yet it is a full sync that reads the
    /// kernel.
    pub fn sync_changed(
        &mut self,
        backend: &dyn Backend,
        before: &Ruleset,
        desired: &Ruleset,
        touched: &ChainNames,
    ) -> Result<Transaction, FirewallError> {
        if self.last.is_none() {
            return self.sync_held(backend, desired, true);
        }
        let tx = plan(&only(before, touched), &only(desired, touched));
        if !tx.is_empty() {
            if let Err(e) = backend.apply(&tx) {
                self.last = None; // The next sync reads the kernel again.
                return Err(e);
            }
        }
        Ok(tx)
    }

    /// Whether the kernel's jumps into the owned chains are not as last applied: one is
    /// missing, or one that must be first sits below another owner's rule (an agent that
    /// inserted its own jump at the top after ours). True when nothing was applied yet.
    /// Reads only the builtin chains those jumps are in.
    pub fn jumps_drifted(&self, backend: &dyn Backend) -> Result<bool, FirewallError> {
        let Some(last) = &self.last else {
            return Ok(true);
        };
        let mut builtin: Vec<(&'static str, String)> = last
            .tables
            .iter()
            .flat_map(|(table, rules)| rules.jumps.iter().map(|j| (*table, j.from.clone())))
            .collect();
        builtin.sort();
        builtin.dedup();
        let now = backend.dump_jumps(last.family, &self.owner, &builtin)?;
        let empty = TableRules::default();
        Ok(last.tables.iter().any(|(table, rules)| {
            let have = now.tables.get(table).unwrap_or(&empty);
            rules
                .jumps
                .iter()
                .any(|j| !have.jumps.contains(j) || (j.first && have.below_foreign.contains(j)))
        }))
    }
}

/// The chains of `from` named in `touched` (no jumps).
fn only(from: &Ruleset, touched: &ChainNames) -> Ruleset {
    let mut out = Ruleset::new(from.family);
    for (table, chain) in touched {
        if let Some(rules) = from.tables.get(table).and_then(|t| t.chains.get(chain)) {
            out.table(table).chains.insert(chain.clone(), rules.clone());
        }
    }
    out
}

/// `ruleset`'s jumps alone (what `jumps_drifted` compares).
fn jumps_of(ruleset: &Ruleset) -> Ruleset {
    let mut out = Ruleset::new(ruleset.family);
    for (table, rules) in &ruleset.tables {
        out.table(table).jumps = rules.jumps.clone();
    }
    out
}

/// Parses `iptables-save` output: the owned chains' rules and the jumps into them.
pub fn parse_save(family: IpFamily, owner: &Ownership, text: &str) -> Ruleset {
    let mut ruleset = Ruleset::new(family);
    let mut table: Option<&'static str> = None;
    // Builtin chains (per table) in which a rule of another owner has been seen.
    let mut foreign_seen: Vec<(&'static str, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = TABLES.into_iter().find(|t| *t == name);
            continue;
        }
        let Some(t) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or_default();
            if owner.owns(chain) {
                ruleset
                    .table(t)
                    .chains
                    .entry(chain.to_string())
                    .or_default();
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            if owner.owns(chain) {
                ruleset
                    .table(t)
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(rule.to_string());
            } else if jump_target(rule).is_some_and(|target| owner.owns(target)) {
                let jump = Jump::new(chain, rule);
                if foreign_seen.contains(&(t, chain.to_string())) {
                    ruleset.table(t).below_foreign.push(jump.clone());
                }
                ruleset.table(t).jumps.push(jump);
            } else {
                foreign_seen.push((t, chain.to_string()));
            }
        }
    }
    ruleset
}

fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// Which of the host's two iptables backends to write to. Rules written to one are
/// invisible to the other, and the kernel runs both: an ACCEPT in nftables cannot
/// override a DROP that kubelet or kube-proxy put in the legacy tables. So Calyx uses
/// the backend the host's other components use, found the way kube-proxy's
/// iptables-wrapper finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `iptables` as PATH has it (a host or image with one backend only).
    Default,
    Nft,
    Legacy,
}

/// What one backend holds, for choosing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendEvidence {
    /// kubelet's KUBE-IPTABLES-HINT or KUBE-KUBELET-CANARY chain (mangle table).
    pub kubelet_hint: bool,
    /// Rules (`-A` lines) in both families' tables.
    pub rules: usize,
}

impl Variant {
    /// iptables-wrapper's choice: the backend kubelet marked, else the one holding more
    /// rules, nft on a tie (a fresh host).
    pub fn choose(nft: BackendEvidence, legacy: BackendEvidence) -> Variant {
        if nft.kubelet_hint {
            Variant::Nft
        } else if legacy.kubelet_hint || legacy.rules > nft.rules {
            Variant::Legacy
        } else {
            Variant::Nft
        }
    }

    /// The tool for `family`: `iptables`, `ip6tables-legacy`, with `-save` etc. added by
    /// the caller.
    pub fn tool(self, family: IpFamily, suffix: &str) -> String {
        let variant = match self {
            Variant::Default => "",
            Variant::Nft => "-nft",
            Variant::Legacy => "-legacy",
        };
        format!("{}{variant}{suffix}", family.iptables())
    }

    /// Looks at the host (the network namespace this thread is in) and chooses; where
    /// only one backend is installed, `Default`.
    pub fn detect() -> Variant {
        let evidence = |variant: Variant| -> Option<BackendEvidence> {
            let mut found = BackendEvidence::default();
            for family in IpFamily::BOTH {
                let save = variant.tool(family, "-save");
                // A backend that is not installed gives no evidence at all.
                let text = match run_tool(&save, &[], None) {
                    Ok(text) => text,
                    Err(FirewallError::Spawn { .. }) => return None,
                    Err(_) => continue, // e.g. no IPv6 support: nothing there
                };
                found.rules += text.lines().filter(|l| l.starts_with("-A ")).count();
                found.kubelet_hint |= text.lines().any(|l| {
                    l.starts_with(":KUBE-IPTABLES-HINT ") || l.starts_with(":KUBE-KUBELET-CANARY ")
                });
            }
            Some(found)
        };
        match (evidence(Variant::Nft), evidence(Variant::Legacy)) {
            (Some(nft), Some(legacy)) => Variant::choose(nft, legacy),
            _ => Variant::Default,
        }
    }
}

/// The kernel, through `iptables-save` / `iptables-restore` of one backend.
#[derive(Debug, Clone, Copy)]
pub struct IptablesCommand {
    pub variant: Variant,
}

impl IptablesCommand {
    /// The backend this host uses, detected once per process (and logged): the host's
    /// choice does not change while the agent runs, and every caller must agree.
    pub fn host() -> IptablesCommand {
        static DETECTED: std::sync::OnceLock<Variant> = std::sync::OnceLock::new();
        let variant = *DETECTED.get_or_init(|| {
            let variant = Variant::detect();
            tracing::info!(?variant, "iptables backend chosen");
            variant
        });
        IptablesCommand { variant }
    }
}

impl Backend for IptablesCommand {
    fn dump(&self, family: IpFamily, owner: &Ownership) -> Result<Ruleset, FirewallError> {
        let mut text = String::new();
        for table in ["nat", "filter"] {
            let save = self.variant.tool(family, "-save");
            text.push_str(&run_tool(&save, &["-t", table], None)?);
        }
        Ok(parse_save(family, owner, &text))
    }

    /// `iptables -S <chain>` per builtin chain: a few short listings instead of the
    /// whole nat table, which holds several rules per Service.
    fn dump_jumps(
        &self,
        family: IpFamily,
        owner: &Ownership,
        builtin: &[(&'static str, String)],
    ) -> Result<Ruleset, FirewallError> {
        let mut text = String::new();
        for (table, chain) in builtin {
            let tool = self.variant.tool(family, "");
            let listed = run_tool(&tool, &["-w", "-t", table, "-S", chain], None)?;
            let _ = writeln!(text, "*{table}");
            text.push_str(&listed);
        }
        Ok(parse_save(family, owner, &text))
    }

    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError> {
        let restore = self.variant.tool(tx.family, "-restore");
        for batch in tx.split(CHAINS_PER_RESTORE) {
            run_tool(&restore, &["-w", "--noflush"], Some(&batch.restore_input()))?;
        }
        Ok(())
    }
}

/// A fake kernel for tests: every table's chains (builtin ones included), changed the
/// way iptables-restore would change them, refusing what it would refuse.
/// Every table's chains and their rules, per family.
type FakeTables = BTreeMap<(IpFamily, &'static str), BTreeMap<String, Vec<String>>>;

#[derive(Default)]
pub struct RecordingIptables {
    state: Mutex<FakeTables>,
    inputs: Mutex<Vec<String>>,
    /// Refuse the next transaction (tests of what follows a failed write).
    fail_next: std::sync::atomic::AtomicBool,
}

impl RecordingIptables {
    /// Refuses the next `apply`, as the tool refuses a transaction: nothing of it
    /// takes effect.
    pub fn fail_next_apply(&self) {
        self.fail_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn new() -> RecordingIptables {
        RecordingIptables::default()
    }

    /// Rules of one chain, without `-A <chain> `.
    pub fn chain(&self, family: IpFamily, table: &'static str, chain: &str) -> Option<Vec<String>> {
        self.lock()
            .get(&(family, table))
            .and_then(|t| t.get(chain))
            .cloned()
    }

    pub fn chains(&self, family: IpFamily, table: &'static str) -> BTreeMap<String, Vec<String>> {
        self.lock()
            .get(&(family, table))
            .cloned()
            .unwrap_or_default()
    }

    /// Puts a rule somewhere, as another program would.
    pub fn append_foreign(&self, family: IpFamily, table: &'static str, chain: &str, rule: &str) {
        self.lock()
            .entry((family, table))
            .or_default()
            .entry(chain.to_string())
            .or_default()
            .push(rule.to_string());
    }

    pub fn take_inputs(&self) -> Vec<String> {
        std::mem::take(&mut *self.inputs.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeTables> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn is_builtin(chain: &str) -> bool {
    matches!(
        chain,
        "PREROUTING" | "INPUT" | "FORWARD" | "OUTPUT" | "POSTROUTING"
    )
}

impl Backend for RecordingIptables {
    fn dump(&self, family: IpFamily, owner: &Ownership) -> Result<Ruleset, FirewallError> {
        let state = self.lock();
        let mut text = String::new();
        for table in TABLES {
            let Some(chains) = state.get(&(family, table)) else {
                continue;
            };
            writeln!(text, "*{table}").expect("String");
            for name in chains.keys() {
                writeln!(text, ":{name} - [0:0]").expect("String");
            }
            for (name, rules) in chains {
                for rule in rules {
                    writeln!(text, "-A {name} {rule}").expect("String");
                }
            }
            text.push_str("COMMIT\n");
        }
        Ok(parse_save(family, owner, &text))
    }

    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError> {
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(FirewallError::Refused {
                tool: "iptables-restore (fake)".into(),
                stderr: "refused as asked".into(),
            });
        }
        let mut state = self.lock();
        let mut next = state.clone();
        let refuse = |why: String| FirewallError::Refused {
            tool: "fake iptables-restore".into(),
            stderr: why,
        };
        for (table, ops) in &tx.tables {
            let chains = next.entry((tx.family, *table)).or_default();
            for op in ops {
                match op {
                    Op::Declare(c) => {
                        chains.insert(c.clone(), Vec::new());
                    }
                    Op::Append(c, r) | Op::Insert(c, r) => {
                        if let Some(target) = jump_target(r) {
                            let known = chains.contains_key(target)
                                || matches!(
                                    target,
                                    "ACCEPT"
                                        | "DROP"
                                        | "RETURN"
                                        | "REJECT"
                                        | "MASQUERADE"
                                        | "DNAT"
                                        | "SNAT"
                                        | "MARK"
                                );
                            if !known {
                                return Err(refuse(format!("{c}: jump to unknown chain {target}")));
                            }
                        }
                        if !chains.contains_key(c) && !is_builtin(c) {
                            return Err(refuse(format!("no chain {c}")));
                        }
                        let rules = chains.entry(c.clone()).or_default();
                        if matches!(op, Op::Insert(..)) {
                            rules.insert(0, r.clone());
                        } else {
                            rules.push(r.clone());
                        }
                    }
                    Op::Delete(c, r) => {
                        let rules = chains
                            .get_mut(c)
                            .ok_or_else(|| refuse(format!("no chain {c}")))?;
                        let at = rules
                            .iter()
                            .position(|x| x == r)
                            .ok_or_else(|| refuse(format!("-D {c} {r}: no such rule")))?;
                        rules.remove(at);
                    }
                    Op::DeleteChain(c) => {
                        if chains.get(c).is_some_and(|r| !r.is_empty()) {
                            return Err(refuse(format!("-X {c}: not empty")));
                        }
                        if chains
                            .values()
                            .flatten()
                            .any(|r| jump_target(r) == Some(c.as_str()))
                        {
                            return Err(refuse(format!("-X {c}: still referenced")));
                        }
                        chains.remove(c);
                    }
                }
            }
        }
        *state = next;
        self.inputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx.restore_input());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Ownership {
        Ownership {
            exact: vec!["CALYX-FORWARD"],
            prefixes: vec!["CALYX-SVC-"],
        }
    }

    #[test]
    fn a_rule_renders_its_parts_in_the_order_iptables_save_prints_them() {
        let rule = Rule::new()
            .protocol("tcp")
            .comment("ns/web:http cluster IP")
            .dport(80)
            .not_in_interface("cyx+")
            .destination("10.96.0.10/32")
            .jump("KUBE-MARK-MASQ");
        assert_eq!(
            rule,
            "-d 10.96.0.10/32 ! -i cyx+ -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"
        );
        assert_eq!(
            Rule::new().source("10.0.0.0/8").jump("RETURN"),
            "-s 10.0.0.0/8 -j RETURN"
        );
        // What it renders is what a dump reads back.
        let text = format!("*nat\n:CALYX-SVC-A - [0:0]\n-A CALYX-SVC-A {rule}\nCOMMIT\n");
        let parsed = parse_save(IpFamily::V4, &owner(), &text);
        assert_eq!(parsed.tables["nat"].chains["CALYX-SVC-A"], vec![rule]);
    }

    #[test]
    fn a_changed_sync_writes_only_the_touched_chains_from_their_old_versions() {
        let fake = RecordingIptables::new();
        let mut sync = RulesetSync::new(owner());
        let mut want = Ruleset::new(IpFamily::V4);
        let nat = want.table("nat");
        for name in ["CALYX-SVC-A", "CALYX-SVC-B"] {
            nat.chains.insert(name.into(), vec!["-j RETURN".into()]);
        }
        nat.jumps = vec![Jump::new("PREROUTING", "-j CALYX-SVC-A")];
        sync.sync_held(&fake, &want, true).unwrap();
        fake.take_inputs();
        // Only the jumps are kept: the drift check still works.
        assert!(!sync.jumps_drifted(&fake).unwrap());
        // B changes and C comes: only they are written, planned from B's old version.
        let mut before = Ruleset::new(IpFamily::V4);
        before
            .table("nat")
            .chains
            .insert("CALYX-SVC-B".into(), vec!["-j RETURN".into()]);
        let nat = want.table("nat");
        nat.chains
            .insert("CALYX-SVC-B".into(), vec!["-j ACCEPT".into()]);
        nat.chains
            .insert("CALYX-SVC-C".into(), vec!["-j DROP".into()]);
        let touched: ChainNames =
            [("nat", "CALYX-SVC-B".into()), ("nat", "CALYX-SVC-C".into())].into();
        let tx = sync.sync_changed(&fake, &before, &want, &touched).unwrap();
        assert_eq!(
            tx.restore_input(),
            "*nat\n:CALYX-SVC-B - [0:0]\n-A CALYX-SVC-B -j ACCEPT\n:CALYX-SVC-C - [0:0]\n-A CALYX-SVC-C -j DROP\nCOMMIT\n"
        );
        assert_eq!(
            fake.chain(IpFamily::V4, "nat", "CALYX-SVC-A"),
            Some(vec!["-j RETURN".into()])
        );
        // C touched and no longer wanted: removed.
        let mut before = Ruleset::new(IpFamily::V4);
        before
            .table("nat")
            .chains
            .insert("CALYX-SVC-C".into(), vec!["-j DROP".into()]);
        want.table("nat").chains.remove("CALYX-SVC-C");
        let tx = sync
            .sync_changed(
                &fake,
                &before,
                &want,
                &[("nat", "CALYX-SVC-C".to_string())].into(),
            )
            .unwrap();
        assert_eq!(
            tx.restore_input(),
            "*nat\n:CALYX-SVC-C - [0:0]\n-X CALYX-SVC-C\nCOMMIT\n"
        );
        assert_eq!(fake.chain(IpFamily::V4, "nat", "CALYX-SVC-C"), None);
        // A failed write: the next changed sync reads the kernel and writes it whole.
        fake.fail_next_apply();
        want.table("nat")
            .chains
            .insert("CALYX-SVC-D".into(), vec!["-j DROP".into()]);
        let d: ChainNames = [("nat", "CALYX-SVC-D".to_string())].into();
        assert!(sync
            .sync_changed(&fake, &Ruleset::new(IpFamily::V4), &want, &d)
            .is_err());
        sync.sync_changed(&fake, &Ruleset::new(IpFamily::V4), &want, &d)
            .unwrap();
        assert_eq!(
            fake.chain(IpFamily::V4, "nat", "CALYX-SVC-D"),
            Some(vec!["-j DROP".into()])
        );
        // A full sync without a re-read asked for still reads the kernel (only the
        // jumps were kept), so a chain no longer wanted goes.
        want.table("nat").chains.remove("CALYX-SVC-A");
        want.table("nat").jumps.clear();
        sync.sync_held(&fake, &want, false).unwrap();
        assert_eq!(fake.chain(IpFamily::V4, "nat", "CALYX-SVC-A"), None);
    }

    #[test]
    fn the_backend_is_chosen_as_kube_proxys_iptables_wrapper_does() {
        let rules = |n| BackendEvidence {
            kubelet_hint: false,
            rules: n,
        };
        let hint = BackendEvidence {
            kubelet_hint: true,
            rules: 0,
        };
        assert_eq!(Variant::choose(rules(0), rules(0)), Variant::Nft);
        assert_eq!(Variant::choose(rules(3), rules(3)), Variant::Nft);
        assert_eq!(Variant::choose(rules(1), rules(9)), Variant::Legacy);
        assert_eq!(Variant::choose(rules(0), hint), Variant::Legacy);
        assert_eq!(Variant::choose(hint, rules(50)), Variant::Nft);
        assert_eq!(
            Variant::Legacy.tool(IpFamily::V6, "-save"),
            "ip6tables-legacy-save"
        );
        assert_eq!(Variant::Default.tool(IpFamily::V4, ""), "iptables");
    }

    #[test]
    fn chains_are_written_after_the_chains_they_jump_to() {
        let mut chains = BTreeMap::new();
        chains.insert(
            "A".to_string(),
            vec!["-j B".to_string(), "-j C".to_string()],
        );
        chains.insert("B".to_string(), vec!["-j C".to_string()]);
        chains.insert("C".to_string(), vec!["-j ACCEPT".to_string()]);
        let names: Vec<String> = chains.keys().cloned().collect();
        let changed: Vec<&String> = names.iter().collect();
        assert_eq!(targets_first(&chains, &changed), ["C", "B", "A"]);
    }

    fn ruleset(svc_rules: &[&str]) -> Ruleset {
        let mut r = Ruleset::new(IpFamily::V4);
        let filter = r.table("filter");
        filter.chains.insert(
            "CALYX-FORWARD".into(),
            vec!["-s 10.244.0.0/16 -j ACCEPT".into()],
        );
        filter.jumps.push(Jump::new("FORWARD", "-j CALYX-FORWARD"));
        if !svc_rules.is_empty() {
            r.table("nat").chains.insert(
                "CALYX-SVC-A".into(),
                svc_rules.iter().map(|s| s.to_string()).collect(),
            );
        }
        r
    }

    #[test]
    fn only_changed_chains_are_rewritten_and_foreign_chains_are_left_alone() {
        let fake = RecordingIptables::new();
        fake.append_foreign(IpFamily::V4, "filter", "FORWARD", "-j KUBE-FORWARD-X");
        fake.append_foreign(IpFamily::V4, "filter", "KUBE-FORWARD-X", "-j ACCEPT");
        let mut sync = RulesetSync::new(owner());
        sync.sync(
            &fake,
            &ruleset(&["-j DNAT --to-destination 10.244.1.2:80"]),
            false,
        )
        .unwrap();
        assert_eq!(
            fake.chain(IpFamily::V4, "filter", "FORWARD").unwrap(),
            ["-j CALYX-FORWARD", "-j KUBE-FORWARD-X"]
        );
        let tx = sync
            .sync(
                &fake,
                &ruleset(&["-j DNAT --to-destination 10.244.1.3:80"]),
                false,
            )
            .unwrap();
        assert_eq!(
            tx.restore_input(),
            "*nat\n:CALYX-SVC-A - [0:0]\n-A CALYX-SVC-A -j DNAT --to-destination 10.244.1.3:80\nCOMMIT\n"
        );
        // Removing the chain; a restart that reads the kernel then finds nothing to do.
        sync.sync(&fake, &ruleset(&[]), false).unwrap();
        assert!(fake.chain(IpFamily::V4, "nat", "CALYX-SVC-A").is_none());
        let again = RulesetSync::new(owner())
            .sync(&fake, &ruleset(&[]), true)
            .unwrap();
        assert!(again.is_empty(), "{}", again.restore_input());
        assert!(fake
            .chain(IpFamily::V4, "filter", "KUBE-FORWARD-X")
            .is_some());
    }

    #[test]
    fn a_jump_that_must_be_first_is_moved_back_above_another_owners_rule() {
        let fake = RecordingIptables::new();
        let mut want = ruleset(&[]);
        want.table("filter").jumps[0].first = true;
        let mut sync = RulesetSync::new(owner());
        assert!(sync.jumps_drifted(&fake).unwrap(), "nothing applied yet");
        sync.sync(&fake, &want, false).unwrap();
        assert!(!sync.jumps_drifted(&fake).unwrap());
        // Another owner inserts its own rule on top.
        fake.append_foreign(IpFamily::V4, "filter", "OTHER", "-j ACCEPT");
        let mut other = Ruleset::new(IpFamily::V4);
        other
            .table("filter")
            .jumps
            .push(Jump::new("FORWARD", "-j OTHER"));
        let tx = plan(&Ruleset::new(IpFamily::V4), &other);
        fake.apply(&tx).unwrap();
        assert_eq!(
            fake.chain(IpFamily::V4, "filter", "FORWARD").unwrap(),
            ["-j OTHER", "-j CALYX-FORWARD"]
        );
        // Between full syncs nothing moves, but the cheap check sees it; a full sync
        // puts ours first again, once.
        assert!(sync.sync(&fake, &want, false).unwrap().is_empty());
        assert!(sync.jumps_drifted(&fake).unwrap());
        assert!(!sync.sync(&fake, &want, true).unwrap().is_empty());
        assert_eq!(
            fake.chain(IpFamily::V4, "filter", "FORWARD").unwrap(),
            ["-j CALYX-FORWARD", "-j OTHER"]
        );
        assert!(!sync.jumps_drifted(&fake).unwrap());
        assert!(sync.sync(&fake, &want, true).unwrap().is_empty());
        // A jump deleted by hand is drift too.
        let mut gone = Ruleset::new(IpFamily::V4);
        gone.table("filter")
            .jumps
            .push(Jump::new("FORWARD", "-j CALYX-FORWARD"));
        fake.apply(&plan(&gone, &Ruleset::new(IpFamily::V4)))
            .unwrap();
        assert!(sync.jumps_drifted(&fake).unwrap());
    }

    #[test]
    fn a_transaction_cut_into_restores_keeps_every_jump_target_in_place() {
        // A tree of chains: TOP -> CALYX-SVC-i -> CALYX-SVC-i-EP-j.
        let mut want = Ruleset::new(IpFamily::V4);
        let nat = want.table("nat");
        let mut top = Vec::new();
        for i in 0..5 {
            let svc = format!("CALYX-SVC-{i}");
            let eps: Vec<String> = (0..2).map(|j| format!("CALYX-SVC-{i}-EP-{j}")).collect();
            for ep in &eps {
                nat.chains.insert(
                    ep.clone(),
                    vec!["-j DNAT --to-destination 10.0.0.1:80".into()],
                );
            }
            nat.chains
                .insert(svc.clone(), eps.iter().map(|e| format!("-j {e}")).collect());
            top.push(format!("-j {svc}"));
        }
        nat.chains.insert("CALYX-SVC-TOP".into(), top);
        nat.jumps.push(Jump::new("PREROUTING", "-j CALYX-SVC-TOP"));
        let fake = RecordingIptables::new();
        let tx = plan(&Ruleset::new(IpFamily::V4), &want);
        let batches = tx.split(4);
        assert!(batches.len() >= 4);
        // The fake refuses a jump to a chain that does not exist: every cut is whole.
        for batch in &batches {
            fake.apply(batch).unwrap();
        }
        let got = RecordingIptables::new();
        got.apply(&tx).unwrap();
        assert_eq!(
            fake.chains(IpFamily::V4, "nat"),
            got.chains(IpFamily::V4, "nat")
        );
        // Removing half of it, cut the same way, also only ever leaves whole states.
        let mut less = want.clone();
        let nat = less.table("nat");
        for i in 0..3 {
            nat.chains.remove(&format!("CALYX-SVC-{i}"));
            for j in 0..2 {
                nat.chains.remove(&format!("CALYX-SVC-{i}-EP-{j}"));
            }
        }
        nat.chains.insert(
            "CALYX-SVC-TOP".into(),
            vec!["-j CALYX-SVC-3".into(), "-j CALYX-SVC-4".into()],
        );
        for batch in plan(&want, &less).split(2) {
            fake.apply(&batch).unwrap();
        }
        assert_eq!(fake.chains(IpFamily::V4, "nat").len(), 1 + 2 * 3 + 1);
    }

    #[test]
    fn save_output_is_read_back_for_owned_chains_only() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:CALYX-FORWARD - [0:0]\n:OTHER - [0:0]\n\
                    -A FORWARD -j OTHER\n-A FORWARD -m comment --comment \"x y\" -j CALYX-FORWARD\n\
                    -A CALYX-FORWARD -s 10.244.0.0/16 -j ACCEPT\n-A OTHER -j ACCEPT\nCOMMIT\n";
        let r = parse_save(IpFamily::V4, &owner(), save);
        let filter = &r.tables["filter"];
        assert_eq!(filter.chains.len(), 1);
        assert_eq!(
            filter.jumps[0].rule,
            "-m comment --comment \"x y\" -j CALYX-FORWARD"
        );
    }
}
