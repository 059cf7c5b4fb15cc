//! `calyx-agent install-cni`: what the DaemonSet's init container runs on each node.
//! It copies the plugin into the host's CNI bin directory and writes the conflist, both
//! whole and then renamed into place (a runtime never reads half a file, and a bad
//! datastore URL never truncates a working conflist: nothing is written until the new
//! one is rendered and checked).
//!
//! The conflist is rendered as JSON, with the node name from the downward API and
//! `requireAgent`, so ADD waits (code 11) until the agent has registered this node.
//! It names no pools: the store is the one source of truth for them.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use calyx_ipam::model::validate_node_name;
use calyx_ipam::store;
use serde_json::{json, Value};

/// Our conflist's name. Runtimes take the first conflist in lexical order: "05-" comes
/// before Calico's and flannel's "10-" files, so a leftover one cannot win silently.
pub const CONFLIST_NAME: &str = "05-calyx.conflist";
/// Names earlier Calyx versions wrote: replaced, not left to compete with ours.
const OLD_CONFLIST_NAMES: [&str; 1] = ["10-calyx.conflist"];
/// Where the plugin reads the etcd client certificates, under the CNI config dir.
const TLS_SUBDIR: &str = "calyx-tls";

/// Why an install or uninstall step failed, naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A setting or host layout that cannot work, named.
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    File {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("datastore {what}: {source}")]
    Datastore {
        what: String,
        #[source]
        source: calyx_ipam::store::StoreError,
    },
    #[error("render the conflist: {0}")]
    Render(#[from] serde_json::Error),
    #[error(transparent)]
    Overlay(#[from] crate::overlay::error::OverlayError),
    #[error(transparent)]
    Dataplane(#[from] calyx_dataplane::DataplaneError),
    #[error("remove the pool rules: {0}")]
    PoolRules(#[from] calyx_dataplane::firewall::FirewallError),
}

type Result<T> = std::result::Result<T, InstallError>;

/// The error of a file operation on `what`.
fn file_error(what: String) -> impl FnOnce(std::io::Error) -> InstallError {
    move |source| InstallError::File { what, source }
}

/// The host's CNI directories, as the pod mounts them.
#[derive(clap::Args, Debug, Clone)]
pub struct HostDirs {
    /// Where the host's root filesystem is mounted: every host path is found under it.
    #[arg(long, env = "CALYX_HOST_ROOT", default_value = "/host")]
    pub host_root: PathBuf,
    #[arg(long, env = "CALYX_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    #[arg(long, env = "CALYX_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    #[command(flatten)]
    pub host: HostDirs,
    /// The plugin binary to install (in the image).
    #[arg(long, env = "CALYX_PLUGIN", default_value = "/usr/local/bin/calyx")]
    pub plugin: PathBuf,
    #[arg(long, env = "CALYX_NODE_NAME")]
    pub node_name: String,
    #[arg(long, env = "CALYX_DATASTORE")]
    pub datastore: String,
    /// A mounted TLS Secret (ca.crt, tls.crt, tls.key) for an etcds:// datastore: copied
    /// where the plugin reads it, readable by root only.
    #[arg(long, env = "CALYX_ETCD_TLS_DIR")]
    pub etcd_tls_dir: Option<PathBuf>,
    /// The plugin's log file on the host (its directory is created).
    #[arg(
        long,
        env = "CALYX_CNI_LOG_FILE",
        default_value = "/var/log/calyx/cni.log"
    )]
    pub log_file: PathBuf,
    #[arg(long, env = "CALYX_CNI_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// What the installer decided, before anything is written (pure, tested as data).
#[derive(Debug)]
pub struct InstallPlan {
    pub conflist: Value,
    /// (source, host destination) certificate copies.
    pub tls_copies: Vec<(PathBuf, PathBuf)>,
    pub warnings: Vec<String>,
}

/// Renders the conflist and checks it; `host_files` lists the names already in the
/// host's CNI config dir, `portmap_present` whether the host has the portmap plugin.
pub fn plan(
    args: &InstallArgs,
    host_files: &[String],
    portmap_present: bool,
) -> Result<InstallPlan> {
    validate_node_name(&args.node_name)
        .map_err(|why| InstallError::Config(format!("node name {:?} {why}", args.node_name)))?;
    let tls_dir = args.host.cni_conf_dir.join(TLS_SUBDIR);
    let mut tls_copies = Vec::new();
    if let Some(secret) = &args.etcd_tls_dir {
        for (_, file) in store::etcd::SECRET_FILES {
            if secret.join(file).is_file() {
                tls_copies.push((secret.join(file), tls_dir.join(file)));
            }
        }
    }
    let datastore = match &args.etcd_tls_dir {
        Some(secret) => store::etcd::with_tls_dir(&args.datastore, secret, &tls_dir),
        None => args.datastore.clone(),
    };
    // The same check the plugin and the agent make: a placeholder or a typo fails here,
    // in the install log, instead of in every ADD.
    store::open(&datastore).map_err(|source| InstallError::Datastore {
        what: format!("{:?}", args.datastore),
        source,
    })?;

    let mut warnings = Vec::new();
    let mut calyx = json!({
        "type": "calyx",
        "datastore": datastore,
        "nodeName": args.node_name,
        "requireAgent": true,
        "logFile": args.log_file,
        "logLevel": args.log_level,
    });
    if args.log_level.is_empty() {
        calyx.as_object_mut().unwrap().remove("logLevel");
    }
    let mut plugins = vec![calyx];
    if portmap_present {
        plugins
            .push(json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}));
    } else {
        warnings.push(format!(
            "no portmap plugin in {}: hostPort is not supported until the CNI reference \
             plugins are installed there (then restart this pod)",
            args.host.cni_bin_dir.display()
        ));
    }
    for name in host_files {
        let is_cni_config = [".conf", ".conflist", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if !is_cni_config || name == CONFLIST_NAME || OLD_CONFLIST_NAMES.contains(&name.as_str()) {
            continue;
        }
        let wins = name.as_str() < CONFLIST_NAME;
        warnings.push(format!(
            "another network's config {} in {}{}",
            name,
            args.host.cni_conf_dir.display(),
            if wins {
                ": it sorts before ours, so runtimes use IT, not Calyx; remove it"
            } else {
                " (runtimes use ours, which sorts first; remove it once it is unused)"
            }
        ));
    }
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": plugins,
    });
    Ok(InstallPlan {
        conflist,
        tls_copies,
        warnings,
    })
}

/// `path` under the host root (`/etc/cni/net.d` -> `/host/etc/cni/net.d`).
fn on_host(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Writes `contents` beside `dest` under a name runtimes ignore, then renames it over
/// `dest`: readers see the old file or the new one, never a part.
fn replace_file(dest: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(InstallError::Config(format!(
            "{}: not a file path",
            dest.display()
        )));
    };
    let name = name.to_string_lossy();
    let tmp = dir.join(format!(".{name}.calyx-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_error(format!("create {}", tmp.display())))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(file_error(format!("write {}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(file_error(format!("set the mode of {}", tmp.display())))?;
    // Closed before it takes the plugin's name: a runtime exec'ing a file that some
    // process still has open for writing gets ETXTBSY ("Text file busy"), as
    // make test-image's upgrade caught once in 143 calls.
    drop(file);
    std::fs::rename(&tmp, dest).map_err(file_error(format!("rename into {}", dest.display())))
}

pub fn install_cni(args: &InstallArgs) -> Result<()> {
    let bin_dir = on_host(&args.host.host_root, &args.host.cni_bin_dir);
    let conf_dir = on_host(&args.host.host_root, &args.host.cni_conf_dir);
    let mut host_files: Vec<String> = std::fs::read_dir(&conf_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    host_files.sort();
    // The configuration first: its mistakes are the likely ones.
    let plan = plan(args, &host_files, bin_dir.join("portmap").is_file())?;
    for (dir, host_dir) in [
        (&bin_dir, &args.host.cni_bin_dir),
        (&conf_dir, &args.host.cni_conf_dir),
    ] {
        if !dir.is_dir() {
            return Err(InstallError::Config(format!(
                "{} is not a directory: mount the host's {} there",
                dir.display(),
                host_dir.display()
            )));
        }
    }
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }

    let plugin = std::fs::read(&args.plugin).map_err(file_error(format!(
        "read the plugin {}",
        args.plugin.display()
    )))?;
    replace_file(&bin_dir.join("calyx"), &plugin, 0o755)?;
    tracing::info!(path = %args.host.cni_bin_dir.join("calyx").display(), bytes = plugin.len(), "plugin installed");

    if !plan.tls_copies.is_empty() {
        let tls_dir = conf_dir.join(TLS_SUBDIR);
        std::fs::create_dir_all(&tls_dir)
            .and_then(|()| {
                std::fs::set_permissions(&tls_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(file_error(format!("create {}", tls_dir.display())))?;
        for (source, dest) in &plan.tls_copies {
            let pem =
                std::fs::read(source).map_err(file_error(format!("read {}", source.display())))?;
            replace_file(&on_host(&args.host.host_root, dest), &pem, 0o400)?;
        }
        tracing::info!(dir = %args.host.cni_conf_dir.join(TLS_SUBDIR).display(), files = plan.tls_copies.len(), "etcd client certificates installed");
    }
    if let Some(dir) = args.log_file.parent() {
        let dir = on_host(&args.host.host_root, dir);
        std::fs::create_dir_all(&dir).map_err(file_error(format!("create {}", dir.display())))?;
    }

    let text = serde_json::to_string_pretty(&plan.conflist)? + "\n";
    // Renamed over from the same directory: containerd notices that (and an in-place
    // write), not a file moved in from elsewhere (e2e/runtimes/containerd-reload.sh).
    replace_file(&conf_dir.join(CONFLIST_NAME), text.as_bytes(), 0o644)?;
    for old in OLD_CONFLIST_NAMES {
        if std::fs::remove_file(conf_dir.join(old)).is_ok() {
            tracing::info!(file = old, "removed the conflist an earlier Calyx wrote");
        }
    }
    tracing::info!(path = %args.host.cni_conf_dir.join(CONFLIST_NAME).display(), node = %args.node_name, "conflist written");
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub host: HostDirs,
    /// The agent's state (and the embedded store, if used): emptied.
    #[arg(long, env = "CALYX_STATE_DIR", default_value = "/var/lib/calyx")]
    pub state_dir: PathBuf,
    #[arg(long, env = "CALYX_CNI_LOG_DIR", default_value = "/var/log/calyx")]
    pub log_dir: PathBuf,
    #[arg(long, env = "CALYX_VXLAN_DEVICE", default_value = "vxlan.calyx")]
    pub vxlan_device: String,
}

/// Removes a directory's contents, then the directory unless it is a mount point.
fn empty_and_remove(dir: &Path) -> Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(file_error(format!("read {}", dir.display()))(e)),
    };
    for entry in entries {
        let path = entry
            .map_err(file_error(format!("read {}", dir.display())))?
            .path();
        let removed = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(file_error(format!("remove {}", path.display())))?;
    }
    // A mounted directory (the pod's hostPath) cannot go; it is left empty.
    let _ = std::fs::remove_dir(dir);
    Ok(true)
}

/// `calyx-agent uninstall`: everything Calyx put on this node, except what running
/// pods use (their veths and routes). Files first, so no new pod is wired meanwhile;
/// safe to run twice. The DaemonSet must be gone first, or its agent puts it back.
pub async fn uninstall(args: &UninstallArgs) -> Result<()> {
    let conf_dir = on_host(&args.host.host_root, &args.host.cni_conf_dir);
    let bin_dir = on_host(&args.host.host_root, &args.host.cni_bin_dir);
    let mut files = vec![conf_dir.join(CONFLIST_NAME), bin_dir.join("calyx")];
    files.extend(OLD_CONFLIST_NAMES.iter().map(|n| conf_dir.join(n)));
    for file in files {
        match std::fs::remove_file(&file) {
            Ok(()) => tracing::info!(file = %file.display(), "removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_error(format!("remove {}", file.display()))(e)),
        }
    }
    if empty_and_remove(&conf_dir.join(TLS_SUBDIR))? {
        tracing::info!(dir = TLS_SUBDIR, "removed the etcd client certificates");
    }

    let nl = calyx_dataplane::Netlink::current()?;
    for what in crate::overlay::kernel::remove_overlay(&nl, &args.vxlan_device).await? {
        tracing::info!(%what, "removed");
    }
    let iptables = calyx_dataplane::firewall::iptables::IptablesCommand::host();
    tokio::task::block_in_place(|| crate::overlay::pool_rules::remove(&iptables))?;
    tokio::task::block_in_place(crate::proxy::cleanup_all);

    for dir in [&args.state_dir, &args.log_dir] {
        if empty_and_remove(&on_host(&args.host.host_root, dir))? {
            tracing::info!(dir = %dir.display(), "emptied");
        }
    }
    tracing::info!("Calyx is uninstalled from this node");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(datastore: &str) -> InstallArgs {
        InstallArgs {
            host: HostDirs {
                host_root: "/host".into(),
                cni_bin_dir: "/opt/cni/bin".into(),
                cni_conf_dir: "/etc/cni/net.d".into(),
            },
            plugin: "/usr/local/bin/calyx".into(),
            node_name: "node-1".into(),
            datastore: datastore.into(),
            etcd_tls_dir: None,
            log_file: "/var/log/calyx/cni.log".into(),
            log_level: "info".into(),
        }
    }

    #[test]
    fn the_conflist_names_the_node_waits_for_the_agent_and_no_pools() {
        let plan = plan(&args("etcd://10.0.0.10:2379"), &[], true).unwrap();
        let calyx = &plan.conflist["plugins"][0];
        assert_eq!(calyx["nodeName"], "node-1");
        assert_eq!(calyx["requireAgent"], true);
        assert_eq!(calyx["datastore"], "etcd://10.0.0.10:2379");
        assert!(
            calyx.get("ipam").is_none(),
            "pools come from the store only"
        );
        assert_eq!(plan.conflist["plugins"][1]["type"], "portmap");
        assert!(plan.warnings.is_empty(), "{:?}", plan.warnings);
    }

    /// What `sed` did to these: an & pasted the match back in, a | ended the command.
    #[test]
    fn urls_with_ampersands_and_bars_are_written_as_they_are() {
        let secret = tempfile::tempdir().unwrap();
        for (_, file) in store::etcd::SECRET_FILES {
            std::fs::write(secret.path().join(file), "pem").unwrap();
        }
        let mut a = args("etcds://e1:2379,e2:2379?prefix=/a|b&ca=/etc/own-ca.pem");
        a.etcd_tls_dir = Some(secret.path().to_path_buf());
        let plan = plan(&a, &[], true).unwrap();
        let url = plan.conflist["plugins"][0]["datastore"].as_str().unwrap();
        assert_eq!(
            url,
            "etcds://e1:2379,e2:2379?prefix=/a|b&ca=/etc/own-ca.pem\
             &cert=/etc/cni/net.d/calyx-tls/tls.crt&key=/etc/cni/net.d/calyx-tls/tls.key"
        );
        assert_eq!(plan.tls_copies.len(), 3);
        assert_eq!(
            plan.tls_copies[2].1,
            Path::new("/etc/cni/net.d/calyx-tls/tls.key")
        );
        // What is written parses back to the same URL.
        let text = serde_json::to_string_pretty(&plan.conflist).unwrap();
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["plugins"][0]["datastore"], url);
    }

    #[test]
    fn the_placeholder_and_bad_names_are_refused_before_anything_is_written() {
        let err = plan(&args("etcd://ETCD_HOST:2379"), &[], true).unwrap_err();
        assert!(format!("{err:#}").contains("placeholder"), "{err:#}");
        let err = plan(&args("etcd://"), &[], true).unwrap_err();
        assert!(format!("{err:#}").contains("datastore"), "{err:#}");
        let mut a = args("etcd://10.0.0.10:2379");
        a.node_name = "../x".into();
        assert!(plan(&a, &[], true)
            .unwrap_err()
            .to_string()
            .contains("node name"));
    }

    #[test]
    fn foreign_configs_and_a_missing_portmap_are_warned_about() {
        let files = [
            "00-multus.conf",
            "10-calico.conflist",
            "05-calyx.conflist",
            "10-calyx.conflist",
            "calico-kubeconfig",
        ]
        .map(String::from);
        let plan = plan(&args("etcd://10.0.0.10:2379"), &files, false).unwrap();
        assert_eq!(plan.conflist["plugins"].as_array().unwrap().len(), 1);
        let all = plan.warnings.join("\n");
        assert!(all.contains("portmap"), "{all}");
        assert!(
            all.contains("00-multus.conf in /etc/cni/net.d: it sorts before ours"),
            "{all}"
        );
        assert!(
            all.contains("10-calico.conflist in /etc/cni/net.d (runtimes use ours"),
            "{all}"
        );
        assert_eq!(plan.warnings.len(), 3, "{all}");
    }

    #[test]
    fn install_writes_whole_files_and_replaces_the_old_name() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["opt/cni/bin", "etc/cni/net.d"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("etc/cni/net.d/10-calyx.conflist"), "{}").unwrap();
        let plugin = root.path().join("calyx-in-image");
        std::fs::write(&plugin, "#!binary").unwrap();
        let secret = tempfile::tempdir().unwrap();
        std::fs::write(secret.path().join("tls.key"), "key").unwrap();
        std::fs::write(secret.path().join("tls.crt"), "crt").unwrap();
        let mut a = args("etcds://10.0.0.10:2379");
        a.host.host_root = root.path().to_path_buf();
        a.plugin = plugin;
        a.etcd_tls_dir = Some(secret.path().to_path_buf());
        install_cni(&a).unwrap();
        install_cni(&a).unwrap(); // twice: an init container restarts

        let net_d = root.path().join("etc/cni/net.d");
        let names: Vec<String> = std::fs::read_dir(&net_d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}: no temp files, no old conflist");
        let conf: Value =
            serde_json::from_slice(&std::fs::read(net_d.join(CONFLIST_NAME)).unwrap()).unwrap();
        assert_eq!(
            conf["plugins"][0]["datastore"],
            "etcds://10.0.0.10:2379?cert=/etc/cni/net.d/calyx-tls/tls.crt\
             &key=/etc/cni/net.d/calyx-tls/tls.key"
        );
        let key = net_d.join("calyx-tls/tls.key");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "key");
        assert_eq!(key.metadata().unwrap().permissions().mode() & 0o777, 0o400);
        let bin = root.path().join("opt/cni/bin/calyx");
        assert_eq!(bin.metadata().unwrap().permissions().mode() & 0o777, 0o755);
        assert!(root.path().join("var/log/calyx").is_dir());
    }
}
