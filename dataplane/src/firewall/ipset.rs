//! ipsets as data: the sets an owner wants, compared with what the kernel holds, and
//! written as one typed plan per sync (`SetOp`s): entry changes over netlink, the rest
//! as ONE `ipset restore` (never one process per entry: that cost kube-proxy over 15 s
//! per sync at 2,500 Services, kubernetes PR #93445). Entries are kept in the form
//! `ipset save` prints, so a dump compares as text.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::ipset_netlink::EntryOp;
use super::{run_tool, FirewallError, IpFamily};

/// One set as wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    /// The set type: `hash:ip,port`, `bitmap:port`, ...
    pub kind: &'static str,
    pub family: IpFamily,
    pub entries: BTreeSet<String>,
}

impl SetSpec {
    pub fn new(name: impl Into<String>, kind: &'static str, family: IpFamily) -> SetSpec {
        SetSpec {
            name: name.into(),
            kind,
            family,
            entries: BTreeSet::new(),
        }
    }

    /// The options `ipset create` takes after the type.
    fn create_options(&self) -> String {
        if self.kind.starts_with("bitmap:port") {
            "range 0-65535".into()
        } else {
            let family = match self.family {
                IpFamily::V4 => "inet",
                IpFamily::V6 => "inet6",
            };
            format!("family {family} hashsize 1024 maxelem 65536")
        }
    }
}

/// One set as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeldSet {
    pub kind: String,
    pub entries: BTreeSet<String>,
}

pub type HeldSets = BTreeMap<String, HeldSet>;

/// One step of a plan, as `ipset restore` takes it (its `Display` is the line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOp {
    Create {
        name: String,
        kind: String,
        options: String,
    },
    Add {
        set: String,
        entry: String,
    },
    Del {
        set: String,
        entry: String,
    },
    /// Exchanges two sets' contents and types.
    Swap {
        from: String,
        to: String,
    },
    Destroy(String),
}

impl std::fmt::Display for SetOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetOp::Create {
                name,
                kind,
                options,
            } => write!(f, "create {name} {kind} {options}"),
            SetOp::Add { set, entry } => write!(f, "add {set} {entry}"),
            SetOp::Del { set, entry } => write!(f, "del {set} {entry}"),
            SetOp::Swap { from, to } => write!(f, "swap {from} {to}"),
            SetOp::Destroy(name) => write!(f, "destroy {name}"),
        }
    }
}

/// The `ipset restore` input for `ops`.
pub fn script(ops: &[SetOp]) -> String {
    ops.iter().map(|op| format!("{op}\n")).collect()
}

fn add(set: &str, entry: &str) -> SetOp {
    SetOp::Add {
        set: set.to_string(),
        entry: entry.to_string(),
    }
}

fn del(set: &str, entry: &str) -> SetOp {
    SetOp::Del {
        set: set.to_string(),
        entry: entry.to_string(),
    }
}

/// Which sets an owner has: by name.
pub type Owns = fn(&str) -> bool;

/// The plan that turns `held` into `desired` (sets `owns` claims and `desired` lacks
/// are destroyed; the caller removes the rules using them first). Empty when nothing
/// differs. A set whose type changed is rebuilt beside and swapped in, so rules
/// matching it never see it missing.
pub fn plan(held: &HeldSets, desired: &[SetSpec], owns: Owns) -> Vec<SetOp> {
    let mut ops = Vec::new();
    for set in desired {
        let create = |name: &str| SetOp::Create {
            name: name.to_string(),
            kind: set.kind.to_string(),
            options: set.create_options(),
        };
        match held.get(&set.name) {
            Some(h) if h.kind == set.kind => {
                ops.extend(
                    h.entries
                        .difference(&set.entries)
                        .map(|e| del(&set.name, e)),
                );
                ops.extend(
                    set.entries
                        .difference(&h.entries)
                        .map(|e| add(&set.name, e)),
                );
            }
            Some(_) => {
                let tmp = format!("{}-", &set.name[..set.name.len().min(30)]);
                ops.push(create(&tmp));
                ops.extend(set.entries.iter().map(|e| add(&tmp, e)));
                ops.push(SetOp::Swap {
                    from: tmp.clone(),
                    to: set.name.clone(),
                });
                ops.push(SetOp::Destroy(tmp));
            }
            None => {
                ops.push(create(&set.name));
                ops.extend(set.entries.iter().map(|e| add(&set.name, e)));
            }
        }
    }
    let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    for name in held.keys() {
        if owns(name) && !wanted.contains(name.as_str()) {
            ops.push(SetOp::Destroy(name.clone()));
        }
    }
    ops
}

/// What `ops` do to `held`, as `ipset restore -exist` would; a missing set is refused.
pub fn apply_to(held: &mut HeldSets, ops: &[SetOp]) -> Result<(), String> {
    for op in ops {
        match op {
            SetOp::Create { name, kind, .. } => {
                held.entry(name.clone()).or_insert_with(|| HeldSet {
                    kind: kind.clone(),
                    entries: BTreeSet::new(),
                });
            }
            SetOp::Add { set, entry } => {
                held.get_mut(set)
                    .ok_or(format!("add to missing set {set}"))?
                    .entries
                    .insert(entry.clone());
            }
            SetOp::Del { set, entry } => {
                held.get_mut(set)
                    .ok_or(format!("del from missing set {set}"))?
                    .entries
                    .remove(entry);
            }
            SetOp::Swap { from, to } => {
                let x = held
                    .remove(from)
                    .ok_or(format!("swap of missing set {from}"))?;
                let y = held.remove(to).ok_or(format!("swap of missing set {to}"))?;
                held.insert(from.clone(), y);
                held.insert(to.clone(), x);
            }
            SetOp::Destroy(name) => {
                held.remove(name);
            }
        }
    }
    Ok(())
}

/// Parses `ipset save` output: the sets `owns` claims.
pub fn parse_save(text: &str, owns: Owns) -> HeldSets {
    let mut held = HeldSets::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, kind, ..] if owns(name) => {
                held.insert(
                    name.to_string(),
                    HeldSet {
                        kind: kind.to_string(),
                        entries: BTreeSet::new(),
                    },
                );
            }
            ["add", name, entry, ..] => {
                if let Some(set) = held.get_mut(*name) {
                    set.entries.insert(entry.to_string());
                }
            }
            _ => {}
        }
    }
    held
}

pub trait Backend: Send + Sync {
    fn dump(&self, owns: Owns) -> Result<HeldSets, FirewallError>;
    /// Writes `ops` in order, as one `ipset restore -exist` would.
    fn apply(&self, ops: &[SetOp]) -> Result<(), FirewallError>;
}

/// A shared backend is a backend: tests keep a handle on the fake they hand over.
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn dump(&self, owns: Owns) -> Result<HeldSets, FirewallError> {
        (**self).dump(owns)
    }
    fn apply(&self, ops: &[SetOp]) -> Result<(), FirewallError> {
        (**self).apply(ops)
    }
}

/// The kernel, through the `ipset` tool.
pub struct IpsetCommand;

impl Backend for IpsetCommand {
    fn dump(&self, owns: Owns) -> Result<HeldSets, FirewallError> {
        Ok(parse_save(&run_tool("ipset", &["save"], None)?, owns))
    }

    /// Runs of adds and dels go over netlink (`ipset_netlink`); the rest (create,
    /// swap, destroy, and entries of a form netlink is not taught) to `ipset restore
    /// -exist`, in the plan's order.
    fn apply(&self, ops: &[SetOp]) -> Result<(), FirewallError> {
        let tool = |text: &str| run_tool("ipset", &["restore", "-exist"], Some(text)).map(|_| ());
        for segment in segments(ops) {
            match segment {
                Segment::Entries(ops) => match super::ipset_netlink::encode(&ops) {
                    Some(requests) => {
                        if let Err(e) = super::ipset_netlink::send(&ops, &requests) {
                            // The tool says it again, naming the line, or succeeds
                            // where netlink was refused (an old kernel's protocol).
                            tracing::warn!(error = %e, "ipset over netlink refused; trying ipset restore");
                            tool(&text_of(&ops))?;
                        }
                    }
                    None => tool(&text_of(&ops))?,
                },
                Segment::Other(ops) => tool(&script(ops))?,
            }
        }
        Ok(())
    }
}

/// A run of a plan: entries only, or anything else.
#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Entries(Vec<EntryOp<'a>>),
    Other(&'a [SetOp]),
}

fn segments(ops: &[SetOp]) -> Vec<Segment<'_>> {
    let mut out: Vec<Segment> = Vec::new();
    let mut other_from = None;
    for (i, op) in ops.iter().enumerate() {
        let entry = match op {
            SetOp::Add { set, entry } => Some(EntryOp {
                add: true,
                set,
                entry,
            }),
            SetOp::Del { set, entry } => Some(EntryOp {
                add: false,
                set,
                entry,
            }),
            _ => None,
        };
        match entry {
            Some(entry) => {
                if let Some(from) = other_from.take() {
                    out.push(Segment::Other(&ops[from..i]));
                }
                match out.last_mut() {
                    Some(Segment::Entries(run)) => run.push(entry),
                    _ => out.push(Segment::Entries(vec![entry])),
                }
            }
            None => {
                other_from.get_or_insert(i);
            }
        }
    }
    if let Some(from) = other_from {
        out.push(Segment::Other(&ops[from..]));
    }
    out
}

fn text_of(ops: &[EntryOp]) -> String {
    ops.iter().map(|op| format!("{op}\n")).collect()
}

/// Keeps one owner's sets as wanted: compares with what it last wrote, and reads the
/// kernel again on request or after a failed write.
pub struct IpsetSync {
    owns: Owns,
    last: Option<HeldSets>,
}

impl IpsetSync {
    pub fn new(owns: Owns) -> IpsetSync {
        IpsetSync { owns, last: None }
    }

    /// Whether it knows what the kernel holds (a sync without it reads the kernel).
    pub fn knows_kernel(&self) -> bool {
        self.last.is_some()
    }

    /// Takes `held` as what the kernel holds (read by the caller, for several owners
    /// at once): the next sync compares with it instead of reading.
    pub fn start_from(&mut self, held: HeldSets) {
        self.last = Some(held);
    }

    /// Writes what differs; returns the plan written (empty: nothing).
    pub fn sync(
        &mut self,
        backend: &dyn Backend,
        desired: &[SetSpec],
        reread: bool,
    ) -> Result<Vec<SetOp>, FirewallError> {
        let mut held = match self.last.take() {
            Some(last) if !reread => last,
            _ => backend.dump(self.owns)?,
        };
        let ops = plan(&held, desired, self.owns);
        // On failure `last` stays empty: the next sync reads the kernel.
        write(backend, &mut held, &ops)?;
        self.last = Some(held);
        Ok(ops)
    }

    /// A partial sync: writes only the `touched` entries (set name, entry) that differ
    /// from what was last written; the sets themselves are as the last full sync left
    /// them. Without a last write to compare with, a full sync.
    pub fn sync_entries<'a>(
        &mut self,
        backend: &dyn Backend,
        desired: &[SetSpec],
        touched: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Vec<SetOp>, FirewallError> {
        let touched: Vec<(&str, &str)> = touched.into_iter().collect();
        let wanted = |name: &str| desired.iter().find(|s| s.name == name);
        // A set added or removed, or nothing to compare with: only a full sync does.
        let partial = self.last.as_ref().is_some_and(|held| {
            touched
                .iter()
                .all(|(name, _)| wanted(name).is_some() && held.contains_key(*name))
        });
        if !partial {
            return self.sync(backend, desired, self.last.is_none());
        }
        let Some(held) = self.last.as_mut() else {
            return self.sync(backend, desired, true);
        };
        let mut ops = Vec::new();
        for (name, entry) in touched {
            let want = wanted(name).is_some_and(|s| s.entries.contains(entry));
            match (want, held[name].entries.contains(entry)) {
                (true, false) => ops.push(add(name, entry)),
                (false, true) => ops.push(del(name, entry)),
                _ => {}
            }
        }
        if let Err(e) = write(backend, held, &ops) {
            self.last = None; // Part of it may have taken effect.
            return Err(e);
        }
        Ok(ops)
    }
}

/// Writes `ops` (nothing when empty) and applies them to `held`, which then says what
/// the kernel holds.
fn write(backend: &dyn Backend, held: &mut HeldSets, ops: &[SetOp]) -> Result<(), FirewallError> {
    if ops.is_empty() {
        return Ok(());
    }
    backend.apply(ops)?;
    apply_to(held, ops).map_err(|why| FirewallError::Dump {
        what: "the ipset plan just written".into(),
        why,
    })
}

/// A fake `ipset` for tests.
#[derive(Default)]
pub struct RecordingIpset {
    pub sets: Mutex<HeldSets>,
    pub scripts: Mutex<Vec<String>>,
}

impl RecordingIpset {
    pub fn new() -> RecordingIpset {
        RecordingIpset::default()
    }

    pub fn set(&self, name: &str) -> Option<BTreeSet<String>> {
        self.sets
            .lock()
            .unwrap()
            .get(name)
            .map(|s| s.entries.clone())
    }

    pub fn take_scripts(&self) -> Vec<String> {
        std::mem::take(&mut self.scripts.lock().unwrap())
    }
}

impl Backend for RecordingIpset {
    fn dump(&self, owns: Owns) -> Result<HeldSets, FirewallError> {
        Ok(self
            .sets
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| owns(name))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect())
    }

    /// Applies `ops` as the tool would (all or nothing, a missing set refused) and
    /// records them as the script the tool would have read.
    fn apply(&self, ops: &[SetOp]) -> Result<(), FirewallError> {
        let mut sets = self.sets.lock().unwrap();
        let mut after = sets.clone();
        apply_to(&mut after, ops).map_err(|stderr| FirewallError::Refused {
            tool: "ipset (fake)".into(),
            stderr,
        })?;
        *sets = after;
        self.scripts.lock().unwrap().push(script(ops));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owns(name: &str) -> bool {
        name.starts_with("KUBE-")
    }

    fn spec(name: &str, kind: &'static str, entries: &[&str]) -> SetSpec {
        let mut s = SetSpec::new(name, kind, IpFamily::V4);
        s.entries = entries.iter().map(|e| e.to_string()).collect();
        s
    }

    #[test]
    fn a_sync_writes_only_what_changed_and_destroys_only_owned_sets() {
        let fake = RecordingIpset::new();
        fake.apply(&[
            SetOp::Create {
                name: "mine".into(),
                kind: "hash:ip".into(),
                options: "family inet".into(),
            },
            add("mine", "10.0.0.1"),
        ])
        .unwrap();
        fake.take_scripts();
        let mut sync = IpsetSync::new(owns);
        let mut want = vec![
            spec("KUBE-CLUSTER-IP", "hash:ip,port", &["10.96.0.10,tcp:80"]),
            spec("KUBE-NODE-PORT-TCP", "bitmap:port", &["30080"]),
        ];
        let first = script(&sync.sync(&fake, &want, true).unwrap());
        assert!(first.contains("create KUBE-CLUSTER-IP hash:ip,port family inet"));
        assert!(first.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"));
        want[0].entries.insert("10.96.0.11,udp:53".into());
        want[0].entries.remove("10.96.0.10,tcp:80");
        let second = script(&sync.sync(&fake, &want, false).unwrap());
        assert_eq!(
            second,
            "del KUBE-CLUSTER-IP 10.96.0.10,tcp:80\nadd KUBE-CLUSTER-IP 10.96.0.11,udp:53\n"
        );
        assert!(sync.sync(&fake, &want, true).unwrap().is_empty());
        want.pop();
        assert_eq!(
            script(&sync.sync(&fake, &want, false).unwrap()),
            "destroy KUBE-NODE-PORT-TCP\n"
        );
        assert!(fake.set("mine").is_some(), "a set Calyx does not own stays");
        // A partial sync writes the touched entries that differ, and nothing else (the
        // untouched difference waits for a full sync).
        want[0].entries.insert("10.96.0.12,tcp:443".into());
        want[0].entries.insert("10.96.0.13,tcp:443".into());
        let partial = sync
            .sync_entries(
                &fake,
                &want,
                [
                    ("KUBE-CLUSTER-IP", "10.96.0.12,tcp:443"),
                    ("KUBE-CLUSTER-IP", "10.96.0.11,udp:53"),
                ],
            )
            .unwrap();
        assert_eq!(script(&partial), "add KUBE-CLUSTER-IP 10.96.0.12,tcp:443\n");
        want[0].entries.remove("10.96.0.12,tcp:443");
        let partial = sync
            .sync_entries(&fake, &want, [("KUBE-CLUSTER-IP", "10.96.0.12,tcp:443")])
            .unwrap();
        assert_eq!(script(&partial), "del KUBE-CLUSTER-IP 10.96.0.12,tcp:443\n");
        assert_eq!(
            script(&sync.sync(&fake, &want, false).unwrap()),
            "add KUBE-CLUSTER-IP 10.96.0.13,tcp:443\n"
        );
    }

    #[test]
    fn a_set_whose_type_changed_is_swapped_not_emptied() {
        let mut held = HeldSets::new();
        held.insert(
            "KUBE-X".into(),
            HeldSet {
                kind: "hash:ip".into(),
                entries: ["10.0.0.1".to_string()].into(),
            },
        );
        let ops = plan(
            &held,
            &[spec("KUBE-X", "hash:ip,port", &["10.0.0.1,tcp:1"])],
            owns,
        );
        let text = script(&ops);
        assert!(text.contains("swap KUBE-X- KUBE-X"), "{text}");
        apply_to(&mut held, &ops).unwrap();
        assert_eq!(held["KUBE-X"].kind, "hash:ip,port");
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_plan_is_cut_into_runs_of_entries_and_the_rest_in_order() {
        let create = SetOp::Create {
            name: "A".into(),
            kind: "hash:ip".into(),
            options: "family inet".into(),
        };
        let ops = vec![
            create.clone(),
            add("A", "10.0.0.1"),
            add("A", "10.0.0.2"),
            SetOp::Swap {
                from: "B".into(),
                to: "A".into(),
            },
            SetOp::Destroy("B".into()),
            del("A", "10.0.0.1"),
        ];
        let entry = |add, entry| EntryOp {
            add,
            set: "A",
            entry,
        };
        assert_eq!(
            segments(&ops),
            vec![
                Segment::Other(&ops[0..1]),
                Segment::Entries(vec![entry(true, "10.0.0.1"), entry(true, "10.0.0.2")]),
                Segment::Other(&ops[3..5]),
                Segment::Entries(vec![entry(false, "10.0.0.1")]),
            ]
        );
        assert_eq!(
            script(&ops[3..5]),
            "swap B A\ndestroy B\n",
            "as the tool reads it"
        );
        assert_eq!(
            text_of(&[entry(true, "10.0.0.1")]),
            "add A 10.0.0.1\n",
            "as the tool reads it"
        );
    }

    #[test]
    fn save_output_parses_back() {
        let text = "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536 bucketsize 12 initval 0x1\n\
                    add KUBE-6-CLUSTER-IP fd00::1,tcp:80\n\
                    create other hash:ip family inet\nadd other 10.0.0.1\n";
        let held = parse_save(text, owns);
        assert_eq!(held.len(), 1);
        assert_eq!(
            held["KUBE-6-CLUSTER-IP"].entries,
            ["fd00::1,tcp:80".to_string()].into()
        );
    }
}
