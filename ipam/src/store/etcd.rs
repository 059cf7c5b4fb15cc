//! The etcd backend: the same documents under a key prefix (default `/calyx/v1/`),
//! every write one transaction that compares each key's mod revision (or absence).
//!
//! URL: `etcd://host:2379[,host:2379...]` or, with TLS, `etcds://...` with the client
//! certificate, key and CA as query parameters: `?ca=/path&cert=/path&key=/path`.
//! `?prefix=/other/` changes the key prefix.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse,
    Identity, KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Expect, Found, Read, Store, StoreError, Versioned, WatchEvent, WatchReceiver, Write};

pub const DEFAULT_PREFIX: &str = "/calyx/v1/";
/// A CNI ADD must fail within 5 s when etcd is unreachable: connect and each request
/// give up well before that.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub tls: Option<TlsFiles>,
}

/// The host name the manifest's ConfigMap ships in its datastore URL.
pub const PLACEHOLDER_HOST: &str = "ETCD_HOST";

/// A Kubernetes TLS Secret mounted as a directory: the URL parameter each of its files
/// fills in.
pub const SECRET_FILES: [(&str, &str); 3] =
    [("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")];

/// `url` with the client certificate, key and CA of a mounted TLS Secret (`ca.crt`,
/// `tls.crt`, `tls.key` in `found_in`, each optional) added as query parameters, unless
/// the URL names its own. The paths written name `named_as` (where the reader finds
/// the copies; usually `found_in`). Only etcds:// URLs take them; any other URL is
/// returned as is.
pub fn with_tls_dir(url: &str, found_in: &std::path::Path, named_as: &std::path::Path) -> String {
    if !url.starts_with("etcds://") {
        return url.to_string();
    }
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let named: Vec<String> = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, _)| k.into_owned())
        .collect();
    // Paths stay readable in a conflist: everything but / . - _ and alphanumerics is
    // escaped (an & or + in a path would otherwise change the query).
    const PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'.')
        .remove(b'-')
        .remove(b'_');
    let added: Vec<String> = SECRET_FILES
        .iter()
        .filter(|(param, file)| !named.iter().any(|n| n == param) && found_in.join(file).is_file())
        .map(|(param, file)| {
            let path = named_as.join(file);
            let path = path.to_string_lossy();
            format!(
                "{param}={}",
                percent_encoding::utf8_percent_encode(&path, PATH)
            )
        })
        .collect();
    if added.is_empty() {
        return url.to_string();
    }
    let joiner = match url.contains('?') {
        false => "?",
        true if url.ends_with('?') || url.ends_with('&') => "",
        true => "&",
    };
    format!("{url}{joiner}{}", added.join("&"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl EtcdConfig {
    /// Parses `etcd[s]://host:port[,host:port...][/][?k=v&...]` by hand: a list of
    /// hosts is not a URL authority that URL parsers accept.
    pub fn from_url(original: &str) -> Result<EtcdConfig, StoreError> {
        let bad = |reason: String| StoreError::BadUrl {
            url: original.to_string(),
            reason,
        };
        let (scheme, rest) = original
            .split_once("://")
            .ok_or_else(|| bad("expected etcd://host:port".into()))?;
        let tls = match scheme {
            "etcd" => false,
            "etcds" => true,
            other => return Err(bad(format!("scheme {other:?} is not etcd or etcds"))),
        };
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = location.trim_end_matches('/');
        if authority.contains('/') {
            return Err(bad(
                "etcd URLs take no path; set the key prefix with ?prefix=".into(),
            ));
        }
        if authority.is_empty() {
            return Err(bad("no endpoints: use etcd://host:2379[,host:2379]".into()));
        }
        // The manifest ships this placeholder: nodes must not go Ready on it while
        // every ADD fails, so it is refused by name wherever a URL is read.
        if authority
            .split(',')
            .any(|hp| hp.starts_with(PLACEHOLDER_HOST))
        {
            return Err(bad(format!(
                "{PLACEHOLDER_HOST} is the manifest's placeholder: set the datastore \
                 (calyx-config) to your etcd endpoints, e.g. etcd://10.0.0.10:2379"
            )));
        }
        let scheme = if tls { "https" } else { "http" };
        let endpoints = authority
            .split(',')
            .map(|hp| {
                if hp.is_empty() || !hp.contains(':') {
                    Err(bad(format!("endpoint {hp:?} needs host:port")))
                } else {
                    Ok(format!("{scheme}://{hp}"))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut config = EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            tls: None,
        };
        let mut files = TlsFiles {
            ca: None,
            cert: None,
            key: None,
        };
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "prefix" => {
                    let mut p = v.to_string();
                    if !p.ends_with('/') {
                        p.push('/');
                    }
                    config.prefix = p;
                }
                "ca" => files.ca = Some(v.to_string()),
                "cert" => files.cert = Some(v.to_string()),
                "key" => files.key = Some(v.to_string()),
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (use prefix, ca, cert, key)"
                    )))
                }
            }
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err(bad("cert and key go together".into()));
        }
        if !tls && (files.ca.is_some() || files.cert.is_some()) {
            return Err(bad("ca/cert/key need etcds://".into()));
        }
        if tls {
            config.tls = Some(files);
        }
        Ok(config)
    }
}

/// Whether an error's chain holds a transport or I/O failure: the request did not
/// reach a working server, so the store is unavailable, not wrong.
fn caused_by_transport(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = cause {
        if err.is::<tonic::transport::Error>() || err.is::<std::io::Error>() {
            return true;
        }
        cause = err.source();
    }
    false
}

pub struct EtcdStore {
    config: EtcdConfig,
    client: tokio::sync::OnceCell<Client>,
}

impl EtcdStore {
    pub fn new(config: EtcdConfig) -> EtcdStore {
        EtcdStore {
            config,
            client: tokio::sync::OnceCell::new(),
        }
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            location: self.location(),
            reason: reason.to_string(),
        }
    }

    fn error(&self, err: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        match err {
            E::TransportError(_) | E::IoError(_) => self.unavailable(err),
            E::GRpcStatus(ref status) => match status.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled => self.unavailable(err),
                // A connection that breaks mid-request (etcd killed) comes back as
                // Unknown with the transport error as its source.
                tonic::Code::Unknown if caused_by_transport(status) => self.unavailable(err),
                _ => StoreError::Io {
                    location: self.location(),
                    reason: err.to_string(),
                },
            },
            other => StoreError::Io {
                location: self.location(),
                reason: other.to_string(),
            },
        }
    }

    /// Connects on first use, so that opening a store never blocks.
    async fn client(&self) -> Result<Client, StoreError> {
        self.client
            .get_or_try_init(|| async {
                let mut options = ConnectOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT);
                if let Some(files) = &self.config.tls {
                    let mut tls = TlsOptions::new();
                    if let Some(ca) = &files.ca {
                        let pem = std::fs::read(ca)
                            .map_err(|e| self.unavailable(format!("read ca {ca}: {e}")))?;
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
                        let c = std::fs::read(cert)
                            .map_err(|e| self.unavailable(format!("read cert {cert}: {e}")))?;
                        let k = std::fs::read(key)
                            .map_err(|e| self.unavailable(format!("read key {key}: {e}")))?;
                        tls = tls.identity(Identity::from_pem(c, k));
                    }
                    options = options.with_tls(tls);
                }
                let connect = Client::connect(&self.config.endpoints, Some(options));
                match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_millis(500), connect)
                    .await
                {
                    Ok(Ok(client)) => Ok(client),
                    Ok(Err(e)) => Err(self.error(e)),
                    Err(_) => Err(self.unavailable("connect timed out")),
                }
            })
            .await
            .cloned()
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.config.prefix)
    }

    fn strip<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(self.config.prefix.as_str()).unwrap_or(key)
    }

    /// Every key under `prefix`, as etcd answers (with the revision it read at).
    async fn get_prefix(&self, prefix: &str) -> Result<GetResponse, StoreError> {
        let mut kv = self.client().await?.kv_client();
        kv.get(self.full(prefix), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.error(e))
    }

    /// Key-value pairs as the store's (key, document) pairs, keys without the prefix.
    fn found(&self, kvs: &[KeyValue]) -> Result<Found, StoreError> {
        let mut out = Vec::with_capacity(kvs.len());
        for item in kvs {
            let key = self.text("(key)", item.key())?;
            let key = self.strip(&key).to_string();
            let value = self.text(&key, item.value())?;
            out.push((
                key,
                Versioned {
                    value,
                    revision: item.mod_revision() as u64,
                },
            ));
        }
        Ok(out)
    }

    fn text(&self, key: &str, bytes: &[u8]) -> Result<String, StoreError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| StoreError::Corrupt {
            location: self.location(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn location(&self) -> String {
        let hosts: Vec<&str> = self
            .config
            .endpoints
            .iter()
            .map(|e| e.split_once("://").map_or(e.as_str(), |(_, h)| h))
            .collect();
        let scheme = if self.config.tls.is_some() {
            "etcds"
        } else {
            "etcd"
        };
        format!("{scheme}://{}", hosts.join(","))
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let mut kv = self.client().await?.kv_client();
        let resp = kv
            .get(self.full(key), None)
            .await
            .map_err(|e| self.error(e))?;
        match resp.kvs().first() {
            Some(item) => Ok(Some(Versioned {
                value: self.text(key, item.value())?,
                revision: item.mod_revision() as u64,
            })),
            None => Ok(None),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.found(self.get_prefix(prefix).await?.kvs())
    }

    async fn list_and_watch(&self, prefix: &str) -> Result<(Found, WatchReceiver), StoreError> {
        let resp = self.get_prefix(prefix).await?;
        // The revision the listing was read at: the watch starts right after it.
        let revision = resp.header().map_or(0, |h| h.revision() as u64);
        let found = self.found(resp.kvs())?;
        Ok((found, self.watch(prefix, revision).await?))
    }

    async fn read(&self, reads: &[Read]) -> Result<Vec<Found>, StoreError> {
        let ops = reads
            .iter()
            .map(|read| match read {
                Read::Key(key) => TxnOp::get(self.full(key), None),
                Read::Prefix(prefix) => {
                    TxnOp::get(self.full(prefix), Some(GetOptions::new().with_prefix()))
                }
            })
            .collect::<Vec<_>>();
        let mut kv = self.client().await?.kv_client();
        let resp = kv
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| self.error(e))?;
        resp.op_responses()
            .iter()
            .map(|op| match op {
                TxnOpResponse::Get(found) => self.found(found.kvs()),
                other => Err(StoreError::Io {
                    location: self.location(),
                    reason: format!("read transaction answered {other:?}"),
                }),
            })
            .collect()
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<u64, StoreError> {
        let mut compares = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len());
        for write in &writes {
            let key = self.full(write.key());
            let expect = match write {
                Write::Put { expect, .. } | Write::Delete { expect, .. } => *expect,
            };
            compares.push(match expect {
                Expect::Absent => Compare::version(key.clone(), CompareOp::Equal, 0),
                Expect::Revision(r) => {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, r as i64)
                }
            });
            ops.push(match write {
                Write::Put { value, .. } => TxnOp::put(key, value.clone(), None),
                Write::Delete { .. } => TxnOp::delete(key, None),
            });
        }
        let mut kv = self.client().await?.kv_client();
        let resp = kv
            .txn(Txn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| self.error(e))?;
        if !resp.succeeded() {
            let key = writes
                .first()
                .map(|w| w.key().to_string())
                .unwrap_or_default();
            return Err(StoreError::Conflict { key });
        }
        Ok(resp.header().map_or(0, |h| h.revision() as u64))
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchReceiver, StoreError> {
        let mut watch = self.client().await?.watch_client();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after_revision as i64 + 1);
        let mut stream = watch
            .watch(self.full(prefix), Some(options))
            .await
            .map_err(|e| self.error(e))?;
        let (tx, rx) = mpsc::channel(1024);
        let global_prefix = self.config.prefix.clone();
        let location = self.location();
        tokio::spawn(async move {
            let _keep_watcher = watch;
            loop {
                let message = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable {
                                location: location.clone(),
                                reason: "watch stream ended".into(),
                            }))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable {
                                location: location.clone(),
                                reason: format!("watch: {e}"),
                            }))
                            .await;
                        return;
                    }
                };
                if message.canceled() || message.compact_revision() > 0 {
                    // Compacted past our revision (or cancelled): the consumer re-lists.
                    let reason = format!(
                        "watch cancelled (compacted at {}): {}",
                        message.compact_revision(),
                        message.cancel_reason()
                    );
                    let _ = tx
                        .send(Err(StoreError::Unavailable {
                            location: location.clone(),
                            reason,
                        }))
                        .await;
                    return;
                }
                for event in message.events() {
                    let Some(kv) = event.kv() else { continue };
                    let full_key = String::from_utf8_lossy(kv.key()).to_string();
                    let key = full_key
                        .strip_prefix(&global_prefix)
                        .unwrap_or(&full_key)
                        .to_string();
                    let item = match event.event_type() {
                        EventType::Put => WatchEvent::Put {
                            key,
                            value: Versioned {
                                value: String::from_utf8_lossy(kv.value()).to_string(),
                                revision: kv.mod_revision() as u64,
                            },
                        },
                        EventType::Delete => WatchEvent::Delete {
                            key,
                            revision: kv.mod_revision() as u64,
                        },
                    };
                    if tx.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let mut kv = self.client().await?.kv_client();
        kv.put(self.full("health/last-check"), b"ok".to_vec(), None)
            .await
            .map(|_| ())
            .map_err(|e| self.error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<EtcdConfig, StoreError> {
        EtcdConfig::from_url(url)
    }

    #[test]
    fn endpoints_tls_and_prefix_come_from_the_url() {
        let c = parse("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap();
        assert_eq!(
            c.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert!(c.tls.is_none());
        let c = parse("etcds://e:2379?ca=/ca.pem&cert=/c.pem&key=/k.pem&prefix=/x").unwrap();
        assert_eq!(c.endpoints, ["https://e:2379"]);
        assert_eq!(c.prefix, "/x/");
        assert_eq!(c.tls.unwrap().cert.as_deref(), Some("/c.pem"));
    }

    #[test]
    fn a_mounted_tls_secret_fills_in_the_files_the_url_does_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // No files mounted (the Secret is optional): the URL is left alone.
        assert_eq!(
            with_tls_dir("etcds://e:2379", dir.path(), dir.path()),
            "etcds://e:2379"
        );
        for file in ["ca.crt", "tls.crt", "tls.key"] {
            std::fs::write(dir.path().join(file), "pem").unwrap();
        }
        let url = with_tls_dir("etcds://e:2379", dir.path(), dir.path());
        assert_eq!(
            url,
            format!("etcds://e:2379?ca={d}/ca.crt&cert={d}/tls.crt&key={d}/tls.key")
        );
        let c = parse(&url).unwrap();
        assert_eq!(c.tls.unwrap().key, Some(format!("{d}/tls.key")));
        // The URL's own choices win; plain etcd:// and file:// take no certificates.
        let url = with_tls_dir(
            "etcds://e:2379?prefix=/p&ca=/own.pem",
            dir.path(),
            dir.path(),
        );
        let c = parse(&url).unwrap();
        assert_eq!(c.tls.unwrap().ca.as_deref(), Some("/own.pem"));
        assert_eq!(c.prefix, "/p/");
        assert_eq!(
            with_tls_dir("etcd://e:2379", dir.path(), dir.path()),
            "etcd://e:2379"
        );
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (url, says) in [
            ("etcd://e", "host:port"),
            ("etcd://ETCD_HOST:2379", "placeholder"),
            ("etcd://10.0.0.1:2379,ETCD_HOST:2379", "placeholder"),
            ("etcd://e:2379?ca=/x", "etcds"),
            ("etcds://e:2379?cert=/c", "together"),
            ("etcd://e:2379?colour=blue", "colour"),
            ("etcd://e:2379/some/path", "prefix"),
        ] {
            let err = parse(url).unwrap_err().to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }

    #[test]
    fn a_connection_broken_mid_request_is_unavailable_not_an_io_error() {
        let store = EtcdStore::new(parse("etcd://127.0.0.1:2379").unwrap());
        let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed");
        let status = tonic::Status::from_error(Box::new(broken));
        assert_eq!(status.code(), tonic::Code::Unknown);
        let err = store.error(etcd_client::Error::GRpcStatus(status));
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");

        let refused = tonic::Status::unknown("a server-side failure");
        let err = store.error(etcd_client::Error::GRpcStatus(refused));
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
    }
}
