//! ipsets as data: the sets an owner wants, compared with what the kernel holds, and
//! written as ONE `ipset restore` script per sync (never one process per entry: that
//! cost kube-proxy over 15 s per sync at 2,500 Services, kubernetes PR #93445).
//! Entries are kept in the form `ipset save` prints, so a dump compares as text.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
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

/// Which sets an owner has: by name.
pub type Owns = fn(&str) -> bool;

/// The restore script that turns `held` into `desired` (sets `owns` claims and
/// `desired` lacks are destroyed; the caller removes the rules using them first).
/// Empty when nothing differs. A set whose type changed is rebuilt beside and swapped
/// in, so rules matching it never see it missing.
pub fn plan(held: &HeldSets, desired: &[SetSpec], owns: Owns) -> String {
    let mut script = String::new();
    for set in desired {
        match held.get(&set.name) {
            Some(h) if h.kind == set.kind => {
                for e in h.entries.difference(&set.entries) {
                    let _ = writeln!(script, "del {} {e}", set.name);
                }
                for e in set.entries.difference(&h.entries) {
                    let _ = writeln!(script, "add {} {e}", set.name);
                }
            }
            Some(_) => {
                let tmp = format!("{}-", &set.name[..set.name.len().min(30)]);
                let _ = writeln!(script, "create {tmp} {} {}", set.kind, set.create_options());
                for e in &set.entries {
                    let _ = writeln!(script, "add {tmp} {e}");
                }
                let _ = writeln!(script, "swap {tmp} {}", set.name);
                let _ = writeln!(script, "destroy {tmp}");
            }
            None => {
                let _ = writeln!(
                    script,
                    "create {} {} {}",
                    set.name,
                    set.kind,
                    set.create_options()
                );
                for e in &set.entries {
                    let _ = writeln!(script, "add {} {e}", set.name);
                }
            }
        }
    }
    let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    for name in held.keys() {
        if owns(name) && !wanted.contains(name.as_str()) {
            let _ = writeln!(script, "destroy {name}");
        }
    }
    script
}

/// What `script` does to `held`, as `ipset restore -exist` would.
pub fn apply_to(held: &mut HeldSets, script: &str) -> Result<(), String> {
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["create", name, kind, ..] => {
                held.entry(name.to_string()).or_insert_with(|| HeldSet {
                    kind: kind.to_string(),
                    entries: BTreeSet::new(),
                });
            }
            ["add", name, entry] => {
                held.get_mut(*name)
                    .ok_or(format!("add to missing set {name}"))?
                    .entries
                    .insert(entry.to_string());
            }
            ["del", name, entry] => {
                held.get_mut(*name)
                    .ok_or(format!("del from missing set {name}"))?
                    .entries
                    .remove(*entry);
            }
            ["swap", a, b] => {
                let x = held.remove(*a).ok_or(format!("swap of missing set {a}"))?;
                let y = held.remove(*b).ok_or(format!("swap of missing set {b}"))?;
                held.insert(a.to_string(), y);
                held.insert(b.to_string(), x);
            }
            ["destroy", name] => {
                held.remove(*name);
            }
            [] => {}
            _ => return Err(format!("not understood: {line}")),
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
    /// Runs the script as one `ipset restore -exist`.
    fn restore(&self, script: &str) -> Result<(), FirewallError>;
}

/// A shared backend is a backend: tests keep a handle on the fake they hand over.
impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn dump(&self, owns: Owns) -> Result<HeldSets, FirewallError> {
        (**self).dump(owns)
    }
    fn restore(&self, script: &str) -> Result<(), FirewallError> {
        (**self).restore(script)
    }
}

/// The kernel, through the `ipset` tool.
pub struct IpsetCommand;

impl Backend for IpsetCommand {
    fn dump(&self, owns: Owns) -> Result<HeldSets, FirewallError> {
        Ok(parse_save(&run_tool("ipset", &["save"], None)?, owns))
    }

    /// Runs of `add` and `del` lines go over netlink (`ipset_netlink`); the rest
    /// (create, swap, destroy, and entries of a form netlink is not taught) to
    /// `ipset restore -exist`, in the script's order.
    fn restore(&self, script: &str) -> Result<(), FirewallError> {
        let tool = |text: &str| run_tool("ipset", &["restore", "-exist"], Some(text)).map(|_| ());
        for segment in segments(script) {
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
                Segment::Script(text) => tool(&text)?,
            }
        }
        Ok(())
    }
}

/// A run of a restore script: entries only, or anything else.
#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Entries(Vec<EntryOp<'a>>),
    Script(String),
}

fn segments(script: &str) -> Vec<Segment<'_>> {
    let mut out: Vec<Segment> = Vec::new();
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let op = match words.as_slice() {
            [verb @ ("add" | "del"), set, entry] => Some(EntryOp {
                add: *verb == "add",
                set,
                entry,
            }),
            [] => continue,
            _ => None,
        };
        match (op, out.last_mut()) {
            (Some(op), Some(Segment::Entries(ops))) => ops.push(op),
            (Some(op), _) => out.push(Segment::Entries(vec![op])),
            (None, Some(Segment::Script(text))) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => out.push(Segment::Script(format!("{line}\n"))),
        }
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

    /// Writes what differs; returns the script written (empty: nothing).
    pub fn sync(
        &mut self,
        backend: &dyn Backend,
        desired: &[SetSpec],
        reread: bool,
    ) -> Result<String, FirewallError> {
        let mut held = match self.last.take() {
            Some(last) if !reread => last,
            _ => backend.dump(self.owns)?,
        };
        let script = plan(&held, desired, self.owns);
        // On failure `last` stays empty: the next sync reads the kernel.
        write(backend, &mut held, &script)?;
        self.last = Some(held);
        Ok(script)
    }

    /// A partial sync: writes only the `touched` entries (set name, entry) that differ
    /// from what was last written; the sets themselves are as the last full sync left
    /// them. Without a last write to compare with, a full sync.
    pub fn sync_entries<'a>(
        &mut self,
        backend: &dyn Backend,
        desired: &[SetSpec],
        touched: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<String, FirewallError> {
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
        let held = self.last.as_mut().expect("checked above");
        let mut script = String::new();
        for (name, entry) in touched {
            let want = wanted(name).expect("checked above").entries.contains(entry);
            match (want, held[name].entries.contains(entry)) {
                (true, false) => {
                    let _ = writeln!(script, "add {name} {entry}");
                }
                (false, true) => {
                    let _ = writeln!(script, "del {name} {entry}");
                }
                _ => {}
            }
        }
        if let Err(e) = write(backend, held, &script) {
            self.last = None; // Part of it may have taken effect.
            return Err(e);
        }
        Ok(script)
    }
}

/// Writes `script` (nothing when empty) and applies it to `held`, which then says what
/// the kernel holds.
fn write(backend: &dyn Backend, held: &mut HeldSets, script: &str) -> Result<(), FirewallError> {
    if script.is_empty() {
        return Ok(());
    }
    backend.restore(script)?;
    apply_to(held, script).map_err(|why| FirewallError::Dump {
        what: "the ipset script just written".into(),
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

    fn restore(&self, script: &str) -> Result<(), FirewallError> {
        let mut sets = self.sets.lock().unwrap();
        let mut after = sets.clone();
        apply_to(&mut after, script).map_err(|stderr| FirewallError::Refused {
            tool: "ipset (fake)".into(),
            stderr,
        })?;
        *sets = after;
        self.scripts.lock().unwrap().push(script.to_string());
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
        fake.restore("create mine hash:ip family inet\nadd mine 10.0.0.1\n")
            .unwrap();
        fake.take_scripts();
        let mut sync = IpsetSync::new(owns);
        let mut want = vec![
            spec("KUBE-CLUSTER-IP", "hash:ip,port", &["10.96.0.10,tcp:80"]),
            spec("KUBE-NODE-PORT-TCP", "bitmap:port", &["30080"]),
        ];
        let first = sync.sync(&fake, &want, true).unwrap();
        assert!(first.contains("create KUBE-CLUSTER-IP hash:ip,port family inet"));
        assert!(first.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535"));
        want[0].entries.insert("10.96.0.11,udp:53".into());
        want[0].entries.remove("10.96.0.10,tcp:80");
        let second = sync.sync(&fake, &want, false).unwrap();
        assert_eq!(
            second,
            "del KUBE-CLUSTER-IP 10.96.0.10,tcp:80\nadd KUBE-CLUSTER-IP 10.96.0.11,udp:53\n"
        );
        assert_eq!(sync.sync(&fake, &want, true).unwrap(), "");
        want.pop();
        assert_eq!(
            sync.sync(&fake, &want, false).unwrap(),
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
        assert_eq!(partial, "add KUBE-CLUSTER-IP 10.96.0.12,tcp:443\n");
        want[0].entries.remove("10.96.0.12,tcp:443");
        let partial = sync
            .sync_entries(&fake, &want, [("KUBE-CLUSTER-IP", "10.96.0.12,tcp:443")])
            .unwrap();
        assert_eq!(partial, "del KUBE-CLUSTER-IP 10.96.0.12,tcp:443\n");
        assert_eq!(
            sync.sync(&fake, &want, false).unwrap(),
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
        let script = plan(
            &held,
            &[spec("KUBE-X", "hash:ip,port", &["10.0.0.1,tcp:1"])],
            owns,
        );
        assert!(script.contains("swap KUBE-X- KUBE-X"), "{script}");
        apply_to(&mut held, &script).unwrap();
        assert_eq!(held["KUBE-X"].kind, "hash:ip,port");
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_script_is_cut_into_runs_of_entries_and_the_rest_in_order() {
        let script = "create A hash:ip family inet\nadd A 10.0.0.1\nadd A 10.0.0.2\nswap B A\ndestroy B\ndel A 10.0.0.1\n";
        let add = |entry| EntryOp {
            add: true,
            set: "A",
            entry,
        };
        assert_eq!(
            segments(script),
            vec![
                Segment::Script("create A hash:ip family inet\n".into()),
                Segment::Entries(vec![add("10.0.0.1"), add("10.0.0.2")]),
                Segment::Script("swap B A\ndestroy B\n".into()),
                Segment::Entries(vec![EntryOp {
                    add: false,
                    set: "A",
                    entry: "10.0.0.1"
                }]),
            ]
        );
        assert_eq!(
            text_of(&[add("10.0.0.1")]),
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
