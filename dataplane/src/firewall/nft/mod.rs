//! nftables: one table per family, owned whole by its caller. `plan` turns (what the
//! kernel holds, what is wanted) into one transaction that touches only what differs:
//! changed chains are flushed and refilled, set and map elements are added and deleted
//! one by one, and nothing else is written. A restart with the table already right
//! plans nothing.
//!
//! What the kernel holds is read back with `nft -j list table`. Rules are not parsed
//! back: the first rule of each chain carries a digest of the chain's rules in its
//! comment, and each set a digest of its declaration in its own.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

mod command;
mod fake;
pub mod netlink;

pub use command::{parse_dump, NftCommand};
pub use fake::RecordingNft;

use imbl::ordmap::DiffItem;
use imbl::OrdMap;

use super::{digest, FirewallError, IpFamily};

/// An nftables table family: one address family, or `inet` (both in one table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ip,
    Ip6,
    Inet,
}

impl Family {
    /// The keyword nft reads and prints.
    pub fn keyword(self) -> &'static str {
        match self {
            Family::Ip => "ip",
            Family::Ip6 => "ip6",
            Family::Inet => "inet",
        }
    }

    /// The netlink protocol family number (NFPROTO_*).
    pub fn number(self) -> u8 {
        match self {
            Family::Ip => 2,
            Family::Ip6 => 10,
            Family::Inet => 1,
        }
    }
}

impl From<IpFamily> for Family {
    fn from(family: IpFamily) -> Family {
        match family {
            IpFamily::V4 => Family::Ip,
            IpFamily::V6 => Family::Ip6,
        }
    }
}

/// A base chain's hook: `type <kind> hook <hook> priority <priority>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub kind: &'static str,
    pub hook: &'static str,
    pub priority: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub hook: Option<Hook>,
    /// Rules in nft syntax, without the table and chain (and without a comment: the
    /// first rule's comment holds the chain's digest).
    pub rules: Vec<String>,
    /// For a chain read from the kernel: the digest its first rule recorded.
    kernel_digest: Option<String>,
}

impl Chain {
    pub fn new(rules: Vec<String>) -> Chain {
        Chain {
            hook: None,
            rules,
            kernel_digest: None,
        }
    }

    pub fn base(hook: Hook, rules: Vec<String>) -> Chain {
        Chain {
            hook: Some(hook),
            rules,
            kernel_digest: None,
        }
    }

    /// None for an empty chain.
    pub fn digest(&self) -> Option<String> {
        if self.rules.is_empty() {
            return self.kernel_digest.clone();
        }
        Some(digest(&self.rules.join("\n")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    Set,
    Map,
}

/// A set or map. Elements are written as nft prints them (`10.96.0.1 . tcp . 80`,
/// values after the key for maps), so a dump compares equal to what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    /// The declaration's body, e.g. `type ipv4_addr . inet_proto . inet_service : verdict;`.
    pub declaration: String,
    /// Filled by the kernel (e.g. session-affinity sets): elements are never diffed.
    pub dynamic: bool,
    /// A persistent map: a copy shares its elements, and two sets one was copied from
    /// compare by what changed, so a table rebuilt for one change plans in time to it.
    pub elements: OrdMap<String, Option<String>>,
    digest: String,
}

impl Set {
    pub fn new(kind: SetKind, declaration: impl Into<String>) -> Set {
        let declaration = declaration.into();
        Set {
            kind,
            digest: digest(&declaration),
            declaration,
            dynamic: false,
            elements: OrdMap::new(),
        }
    }

    pub fn dynamic(mut self) -> Set {
        self.dynamic = true;
        self
    }

    pub fn insert(&mut self, key: impl Into<String>, value: Option<String>) {
        self.elements.insert(key.into(), value);
    }

    /// The set without its elements.
    fn clone_declaration(&self) -> Set {
        Set {
            kind: self.kind,
            declaration: self.declaration.clone(),
            dynamic: self.dynamic,
            elements: OrdMap::new(),
            digest: self.digest.clone(),
        }
    }
}

/// One table as wanted, or as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub chains: BTreeMap<String, Chain>,
    pub sets: BTreeMap<String, Set>,
    /// Named counters (`counter name <name>` in a rule), read for metrics.
    pub counters: BTreeSet<String>,
}

impl Table {
    pub fn new(family: impl Into<Family>, name: impl Into<String>) -> Table {
        Table {
            family: family.into(),
            name: name.into(),
            chains: BTreeMap::new(),
            sets: BTreeMap::new(),
            counters: BTreeSet::new(),
        }
    }

    /// The base chains on `hook`, in the order the kernel runs them (by priority).
    pub fn base_chains(&self, hook: &str) -> Vec<&str> {
        let mut chains: Vec<(&str, i32)> = self
            .chains
            .iter()
            .filter_map(|(name, c)| {
                c.hook
                    .as_ref()
                    .filter(|h| h.hook == hook)
                    .map(|h| (name.as_str(), h.priority))
            })
            .collect();
        chains.sort_by_key(|(_, priority)| *priority);
        chains.into_iter().map(|(name, _)| name).collect()
    }

    /// Elements across all sets and maps (for logs and metrics).
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum()
    }
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddTable,
    DeleteTable,
    AddChain(String, Option<Hook>),
    FlushChain(String),
    DeleteChain(String),
    /// (chain, rule, comment)
    AddRule(String, String, Option<String>),
    /// A set or map with no elements.
    AddSet(String, Set),
    DeleteSet(String),
    AddElements(String, Vec<(String, Option<String>)>),
    DeleteElements(String, Vec<String>),
    AddCounter(String),
    DeleteCounter(String),
}

/// What `plan` emits: applied with one `nft -f`, all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub family: Family,
    pub table: String,
    pub ops: Vec<Op>,
}

impl Transaction {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The `nft -f` script.
    pub fn script(&self) -> String {
        let t = format!("{} {}", self.family.keyword(), self.table);
        let mut out = String::new();
        for op in &self.ops {
            match op {
                Op::AddTable => writeln!(out, "add table {t}"),
                Op::DeleteTable => writeln!(out, "delete table {t}"),
                Op::AddChain(name, None) => writeln!(out, "add chain {t} {name}"),
                Op::AddChain(name, Some(h)) => writeln!(
                    out,
                    "add chain {t} {name} {{ type {} hook {} priority {}; policy accept; }}",
                    h.kind, h.hook, h.priority
                ),
                Op::FlushChain(name) => writeln!(out, "flush chain {t} {name}"),
                Op::DeleteChain(name) => writeln!(out, "delete chain {t} {name}"),
                Op::AddRule(chain, rule, None) => writeln!(out, "add rule {t} {chain} {rule}"),
                Op::AddRule(chain, rule, Some(c)) => {
                    writeln!(out, "add rule {t} {chain} {rule} comment \"{c}\"")
                }
                Op::AddSet(name, set) => writeln!(
                    out,
                    "add {} {t} {name} {{ {} comment \"{}\"; }}",
                    match set.kind {
                        SetKind::Set => "set",
                        SetKind::Map => "map",
                    },
                    set.declaration,
                    set.digest
                ),
                Op::DeleteSet(name) => writeln!(out, "delete set {t} {name}"),
                Op::AddElements(name, elements) => {
                    let list: Vec<String> = elements
                        .iter()
                        .map(|(k, v)| match v {
                            Some(v) => format!("{k} : {v}"),
                            None => k.clone(),
                        })
                        .collect();
                    writeln!(out, "add element {t} {name} {{ {} }}", list.join(", "))
                }
                Op::DeleteElements(name, keys) => {
                    writeln!(out, "delete element {t} {name} {{ {} }}", keys.join(", "))
                }
                Op::AddCounter(name) => writeln!(out, "add counter {t} {name}"),
                Op::DeleteCounter(name) => writeln!(out, "delete counter {t} {name}"),
            }
            .expect("write to a String");
        }
        out
    }
}

/// Elements per `add element` line: long enough to be cheap, short enough for nft.
const ELEMENTS_PER_LINE: usize = 1000;

/// The transaction that turns `current` (None: no such table) into `desired`.
pub fn plan(current: Option<&Table>, desired: &Table) -> Transaction {
    let mut ops = Vec::new();
    let rebuild = match current {
        None => {
            ops.push(Op::AddTable);
            true
        }
        Some(current) => {
            // A set whose declaration changed, or a chain whose hook changed, cannot be
            // altered in place: rebuild the table in the same transaction.
            let set_changed = desired.sets.iter().any(|(name, set)| {
                current
                    .sets
                    .get(name)
                    .is_some_and(|c| c.digest != set.digest || c.kind != set.kind)
            });
            let hook_changed = desired.chains.iter().any(|(name, chain)| {
                current
                    .chains
                    .get(name)
                    .is_some_and(|c| c.hook != chain.hook)
            });
            if set_changed || hook_changed {
                ops.extend([Op::AddTable, Op::DeleteTable, Op::AddTable]);
                true
            } else {
                false
            }
        }
    };
    let empty = Table::new(desired.family, desired.name.clone());
    let current = if rebuild {
        &empty
    } else {
        current.expect("not a rebuild")
    };

    // 1. New sets, counters and chains, so that everything below may refer to them.
    for name in desired.counters.difference(&current.counters) {
        ops.push(Op::AddCounter(name.clone()));
    }
    for (name, set) in &desired.sets {
        if !current.sets.contains_key(name) {
            let mut decl = set.clone();
            decl.elements.clear();
            ops.push(Op::AddSet(name.clone(), decl));
        }
    }
    for (name, chain) in &desired.chains {
        if !current.chains.contains_key(name) {
            ops.push(Op::AddChain(name.clone(), chain.hook.clone()));
        }
    }
    // 2. Elements: deletions first (a changed map value is a delete and an add). The
    //    persistent maps' diff skips what the two share, so an unchanged set of a
    //    table rebuilt from the last one costs nothing here.
    let empty = OrdMap::new();
    let mut additions = Vec::new();
    for (name, set) in &desired.sets {
        if set.dynamic {
            continue;
        }
        let before = current.sets.get(name).map_or(&empty, |s| &s.elements);
        let mut stale = Vec::new();
        let mut new = Vec::new();
        for change in before.diff(&set.elements) {
            match change {
                DiffItem::Remove(k, _) => stale.push(k.clone()),
                DiffItem::Update { old, new: (k, v) } => {
                    stale.push(old.0.clone());
                    new.push((k.clone(), v.clone()));
                }
                DiffItem::Add(k, v) => new.push((k.clone(), v.clone())),
            }
        }
        for chunk in stale.chunks(ELEMENTS_PER_LINE) {
            ops.push(Op::DeleteElements(name.clone(), chunk.to_vec()));
        }
        for chunk in new.chunks(ELEMENTS_PER_LINE) {
            additions.push(Op::AddElements(name.clone(), chunk.to_vec()));
        }
    }
    ops.extend(additions);
    // 3. Chains whose rules differ: flushed and refilled.
    for (name, chain) in &desired.chains {
        let had = current.chains.get(name);
        if had.is_some_and(|c| c.digest() == chain.digest()) {
            continue;
        }
        if had.is_some() {
            ops.push(Op::FlushChain(name.clone()));
        }
        let digest = chain.digest();
        for (i, rule) in chain.rules.iter().enumerate() {
            let comment = if i == 0 { digest.clone() } else { None };
            ops.push(Op::AddRule(name.clone(), rule.clone(), comment));
        }
    }
    // 4. What is no longer wanted: chains flushed first (one may jump to another),
    //    then deleted; then sets, which no rule refers to any more.
    let stale_chains: Vec<&String> = current
        .chains
        .keys()
        .filter(|name| !desired.chains.contains_key(*name))
        .collect();
    for name in &stale_chains {
        ops.push(Op::FlushChain((*name).clone()));
    }
    for name in &stale_chains {
        ops.push(Op::DeleteChain((*name).clone()));
    }
    for name in current.sets.keys() {
        if !desired.sets.contains_key(name) {
            ops.push(Op::DeleteSet(name.clone()));
        }
    }
    for name in current.counters.difference(&desired.counters) {
        ops.push(Op::DeleteCounter(name.clone()));
    }
    Transaction {
        family: desired.family,
        table: desired.name.clone(),
        ops,
    }
}

/// What a change touched: elements (set, key), and chains and sets added or removed.
/// `TableSync::sync_touched` compares only these, so its cost follows the change,
/// not the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub elements: BTreeSet<(String, String)>,
    pub chains: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.elements.is_empty() && self.chains.is_empty() && self.sets.is_empty()
    }
}

/// The part of `table` that `touched` names: touched chains, and touched sets or sets
/// holding touched elements, with only their touched elements. (Counters are never
/// touched: a caller of `sync_touched` keeps its counters as they were.)
fn restrict(table: &Table, touched: &Touched) -> Table {
    let mut out = Table::new(table.family, table.name.clone());
    for name in &touched.chains {
        if let Some(chain) = table.chains.get(name) {
            out.chains.insert(name.clone(), chain.clone());
        }
    }
    let sets = touched
        .sets
        .iter()
        .chain(touched.elements.iter().map(|(set, _)| set));
    for name in sets {
        if let Some(set) = table.sets.get(name) {
            out.sets.entry(name.clone()).or_insert_with(|| Set {
                elements: OrdMap::new(),
                ..set.clone_declaration()
            });
        }
    }
    for (set, key) in &touched.elements {
        let value = table.sets.get(set).and_then(|s| s.elements.get(key));
        if let (Some(value), Some(target)) = (value, out.sets.get_mut(set)) {
            target.elements.insert(key.clone(), value.clone());
        }
    }
    out
}

/// The transaction that removes the table (nothing when it is not there).
pub fn plan_removal(current: Option<&Table>, family: impl Into<Family>, name: &str) -> Transaction {
    Transaction {
        family: family.into(),
        table: name.to_string(),
        ops: if current.is_some() {
            vec![Op::DeleteTable]
        } else {
            Vec::new()
        },
    }
}

/// Where tables are read from and transactions applied: the kernel through `nft`, or
/// a recording fake.
pub trait Backend: Send + Sync {
    fn dump(&self, family: Family, table: &str) -> Result<Option<Table>, FirewallError>;
    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError>;

    /// `apply`, with the table as wanted at hand (each set's declaration), for a
    /// backend that writes some transactions another way.
    fn apply_in(&self, tx: &Transaction, desired: &Table) -> Result<(), FirewallError> {
        let _ = desired;
        self.apply(tx)
    }

    /// The names of the table's chains (None: no such table), for
    /// `TableSync::drifted`; a backend that can list chains without their rules does.
    fn chain_names(
        &self,
        family: Family,
        table: &str,
    ) -> Result<Option<BTreeSet<String>>, FirewallError> {
        Ok(self
            .dump(family, table)?
            .map(|t| t.chains.into_keys().collect()))
    }
}

/// A shared backend is a backend: tests keep a handle on the fake they hand over.
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn dump(&self, family: Family, table: &str) -> Result<Option<Table>, FirewallError> {
        (**self).dump(family, table)
    }
    fn apply(&self, tx: &Transaction) -> Result<(), FirewallError> {
        (**self).apply(tx)
    }
    fn apply_in(&self, tx: &Transaction, desired: &Table) -> Result<(), FirewallError> {
        (**self).apply_in(tx, desired)
    }
    fn chain_names(
        &self,
        family: Family,
        table: &str,
    ) -> Result<Option<BTreeSet<String>>, FirewallError> {
        (**self).chain_names(family, table)
    }
}

/// Keeps one table as wanted: reads the kernel on the first sync (and whenever asked
/// to, e.g. a periodic full resync), otherwise diffs against what it applied last.
pub struct TableSync {
    last: Option<Table>,
    known: bool,
}

impl Default for TableSync {
    fn default() -> Self {
        Self::new()
    }
}

impl TableSync {
    pub fn new() -> TableSync {
        TableSync {
            last: None,
            known: false,
        }
    }

    /// Takes `dumped` (what `Backend::dump` returned, read ahead of the first sync) as
    /// what the kernel holds, so the next sync need not read it again.
    pub fn start_from(&mut self, dumped: Option<Table>) {
        self.last = dumped;
        self.known = true;
    }

    /// Applies what differs; returns the transaction applied (empty when none was).
    pub fn sync(
        &mut self,
        backend: &dyn Backend,
        desired: &Table,
        reread: bool,
    ) -> Result<Transaction, FirewallError> {
        if reread || !self.known {
            self.last = backend.dump(desired.family, &desired.name)?;
            self.known = true;
        }
        let tx = plan(self.last.as_ref(), desired);
        if !tx.is_empty() {
            // Element changes alone may take the backend's faster way.
            if let Err(e) = backend.apply_in(&tx, desired) {
                // The kernel holds what it held; read it again next time.
                self.known = false;
                return Err(e);
            }
        }
        self.last = Some(desired.clone());
        Ok(tx)
    }
}

impl TableSync {
    /// Whether the kernel lost the table or any of its chains since the last sync (a
    /// flush of the ruleset, a chain deleted by hand): cheap, as it reads no rules.
    /// Rules changed by hand are found by the next full sync. True when nothing is known.
    pub fn drifted(&self, backend: &dyn Backend) -> Result<bool, FirewallError> {
        let Some(last) = self.last.as_ref().filter(|_| self.known) else {
            return Ok(true);
        };
        let wanted: BTreeSet<&String> = last.chains.keys().collect();
        Ok(match backend.chain_names(last.family, &last.name)? {
            Some(names) => names.iter().collect::<BTreeSet<_>>() != wanted,
            None => true,
        })
    }

    /// Like `sync`, comparing only what `touched` names (the rest of `desired` must be
    /// what was applied last). Falls back to a whole comparison when nothing was
    /// applied yet.
    pub fn sync_touched(
        &mut self,
        backend: &dyn Backend,
        desired: &Table,
        touched: &Touched,
    ) -> Result<Transaction, FirewallError> {
        let Some(last) = self.last.as_mut().filter(|_| self.known) else {
            return self.sync(backend, desired, false);
        };
        let tx = plan(Some(&restrict(last, touched)), &restrict(desired, touched));
        if !tx.is_empty() {
            if let Err(e) = backend.apply_in(&tx, desired) {
                self.known = false;
                return Err(e);
            }
        }
        for name in &touched.chains {
            match desired.chains.get(name) {
                Some(chain) => last.chains.insert(name.clone(), chain.clone()),
                None => last.chains.remove(name),
            };
        }
        for name in &touched.sets {
            match desired.sets.get(name) {
                Some(set) => last.sets.insert(name.clone(), set.clone()),
                None => last.sets.remove(name),
            };
        }
        for (set, key) in &touched.elements {
            let value = desired.sets.get(set).and_then(|s| s.elements.get(key));
            if let Some(target) = last.sets.get_mut(set) {
                match value {
                    Some(v) => target.elements.insert(key.clone(), v.clone()),
                    None => target.elements.remove(key),
                };
            }
        }
        Ok(tx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(elements: &[(&str, &str)]) -> Table {
        let mut t = Table::new(IpFamily::V4, "t");
        let mut map = Set::new(
            SetKind::Map,
            "type ipv4_addr . inet_proto . inet_service : verdict;",
        );
        for (k, v) in elements {
            map.insert(*k, Some(v.to_string()));
        }
        t.sets.insert("svc".into(), map);
        t.chains
            .insert("lb".into(), Chain::new(vec!["counter".into()]));
        t.chains.insert(
            "pre".into(),
            Chain::base(
                Hook {
                    kind: "nat",
                    hook: "prerouting",
                    priority: -100,
                },
                vec!["ip daddr . meta l4proto . th dport vmap @svc".into()],
            ),
        );
        t
    }

    #[test]
    fn a_first_sync_writes_everything_and_a_second_nothing() {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        let want = sample(&[("10.0.0.1 . tcp . 80", "goto lb")]);
        let tx = sync.sync(&fake, &want, false).unwrap();
        assert_eq!(tx.ops[0], Op::AddTable);
        assert_eq!(fake.table(IpFamily::V4, "t").unwrap().sets, want.sets);
        assert!(sync.sync(&fake, &want, false).unwrap().is_empty());
        // A restart (a new TableSync reading the fake) plans nothing either.
        assert!(TableSync::new()
            .sync(&fake, &want, true)
            .unwrap()
            .is_empty());
        // The cheap check: nothing lost, until someone deletes the table.
        assert!(!sync.drifted(&fake).unwrap());
        let delete = Transaction {
            family: Family::Ip,
            table: "t".into(),
            ops: vec![Op::DeleteTable],
        };
        fake.apply(&delete).unwrap();
        assert!(sync.drifted(&fake).unwrap());
        assert!(
            TableSync::new().drifted(&fake).unwrap(),
            "nothing known yet"
        );
    }

    #[test]
    fn an_element_change_emits_only_that_element() {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        sync.sync(&fake, &sample(&[("10.0.0.1 . tcp . 80", "goto lb")]), false)
            .unwrap();
        let tx = sync
            .sync(
                &fake,
                &sample(&[
                    ("10.0.0.1 . tcp . 80", "goto lb"),
                    ("10.0.0.2 . udp . 53", "goto lb"),
                ]),
                false,
            )
            .unwrap();
        assert_eq!(
            tx.script(),
            "add element ip t svc { 10.0.0.2 . udp . 53 : goto lb }\n"
        );
        let tx = sync
            .sync(&fake, &sample(&[("10.0.0.2 . udp . 53", "drop")]), false)
            .unwrap();
        assert_eq!(
            tx.script(),
            "delete element ip t svc { 10.0.0.1 . tcp . 80, 10.0.0.2 . udp . 53 }\n\
             add element ip t svc { 10.0.0.2 . udp . 53 : drop }\n"
        );
    }

    #[test]
    fn a_stale_chain_is_unreferenced_flushed_and_deleted_in_that_order() {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        sync.sync(&fake, &sample(&[("10.0.0.1 . tcp . 80", "goto lb")]), false)
            .unwrap();
        let mut want = sample(&[]);
        want.chains.remove("lb");
        let tx = sync.sync(&fake, &want, false).unwrap();
        assert_eq!(
            tx.script(),
            "delete element ip t svc { 10.0.0.1 . tcp . 80 }\n\
             flush chain ip t lb\ndelete chain ip t lb\n"
        );
        assert_eq!(fake.table(IpFamily::V4, "t").unwrap().chains.len(), 1);
    }

    #[test]
    fn a_changed_set_declaration_rebuilds_the_table_in_one_transaction() {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        sync.sync(&fake, &sample(&[("10.0.0.1 . tcp . 80", "goto lb")]), false)
            .unwrap();
        let mut want = sample(&[("10.0.0.1 . tcp . 80", "goto lb")]);
        want.sets
            .get_mut("svc")
            .unwrap()
            .declaration
            .push_str(" flags interval;");
        let old_digest = want.sets["svc"].digest.clone();
        want.sets.get_mut("svc").unwrap().digest = digest(&want.sets["svc"].declaration);
        assert_ne!(old_digest, want.sets["svc"].digest);
        let tx = sync.sync(&fake, &want, false).unwrap();
        assert_eq!(&tx.ops[..3], &[Op::AddTable, Op::DeleteTable, Op::AddTable]);
        assert_eq!(
            fake.table(IpFamily::V4, "t").unwrap().sets["svc"]
                .elements
                .len(),
            1
        );
    }

    #[test]
    fn counters_come_before_their_rules_and_go_after_them_in_an_inet_table() {
        let fake = RecordingNft::new();
        let mut sync = TableSync::new();
        let mut want = Table::new(Family::Inet, "p");
        want.counters.insert("denied/x/ingress".into());
        want.chains.insert(
            "c".into(),
            Chain::new(vec!["counter name denied/x/ingress drop".into()]),
        );
        let tx = sync.sync(&fake, &want, false).unwrap();
        assert_eq!(
            tx.script(),
            "add table inet p\nadd counter inet p denied/x/ingress\nadd chain inet p c\n\
             add rule inet p c counter name denied/x/ingress drop comment \""
                .to_string()
                + &want.chains["c"].digest().unwrap()
                + "\"\n"
        );
        want.chains.remove("c");
        want.counters.clear();
        let tx = sync.sync(&fake, &want, false).unwrap();
        assert_eq!(
            tx.script(),
            "flush chain inet p c\ndelete chain inet p c\ndelete counter inet p denied/x/ingress\n"
        );
        assert!(fake.table(Family::Inet, "p").unwrap().counters.is_empty());
    }

    #[test]
    fn a_dump_reads_back_elements_digests_and_hooks() {
        let json = r#"{"nftables": [{"metainfo": {}},
          {"table": {"family": "ip", "name": "t"}},
          {"map": {"family": "ip", "name": "ep-2", "table": "t", "comment": "abc", "map": "ipv4_addr . inet_service",
            "elem": [[{"concat": ["10.96.0.10", "tcp", 80, 0]}, {"concat": ["10.244.1.2", 8080]}]]}},
          {"map": {"name": "svc", "table": "t", "map": "verdict",
            "elem": [[{"concat": ["10.96.0.10", "tcp", 80]}, {"goto": {"target": "lb-2"}}],
                     [{"concat": ["10.96.0.11", "udp", 53]}, {"drop": null}]]}},
          {"set": {"name": "fw", "table": "t", "elem": [{"concat": ["1.2.3.4", "tcp", 80, {"prefix": {"addr": "10.0.0.0", "len": 8}}]}]}},
          {"chain": {"family": "ip", "table": "t", "name": "pre", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}},
          {"chain": {"family": "ip", "table": "t", "name": "empty"}},
          {"counter": {"family": "ip", "table": "t", "name": "denied/x/ingress", "packets": 3, "bytes": 180}},
          {"rule": {"chain": "pre", "comment": "d1", "expr": []}},
          {"rule": {"chain": "pre", "expr": []}}]}"#;
        let t = parse_dump(IpFamily::V4, "t", json).unwrap();
        assert_eq!(
            t.sets["ep-2"].elements["10.96.0.10 . tcp . 80 . 0"].as_deref(),
            Some("10.244.1.2 . 8080")
        );
        assert_eq!(t.sets["ep-2"].digest, "abc");
        assert_eq!(
            t.sets["svc"].elements["10.96.0.10 . tcp . 80"].as_deref(),
            Some("goto lb-2")
        );
        assert_eq!(
            t.sets["svc"].elements["10.96.0.11 . udp . 53"].as_deref(),
            Some("drop")
        );
        assert!(t.sets["fw"]
            .elements
            .contains_key("1.2.3.4 . tcp . 80 . 10.0.0.0/8"));
        assert_eq!(t.chains["pre"].digest().as_deref(), Some("d1"));
        assert_eq!(t.chains["pre"].hook.as_ref().unwrap().priority, -100);
        assert_eq!(t.chains["empty"].digest(), None);
        assert!(t.counters.contains("denied/x/ingress"));
    }
}
