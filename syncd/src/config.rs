//! Configuration: `/etc/syncd/syncd.toml` for the node, and one file per
//! synced directory in `dirs.d/` beside it.
//!
//! Each file is one serde struct with `deny_unknown_fields` (a typo is an
//! error, not a silently ignored key), parsed and validated once. Every
//! error names the file and, where it comes from a key, the line:
//! `/etc/syncd/dirs.d/www.toml:3: path "srv/www" must be absolute`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::bandwidth::Priority;

/// Where `syncd run` and `syncd check-config` look by default.
pub const DEFAULT_CONFIG: &str = "/etc/syncd/syncd.toml";
/// The drop-in directory of per-directory files, beside the node file.
pub const DIRS_D: &str = "dirs.d";

mod limits;
use limits::section_line;
pub use limits::{LimitsSection, MAX_SERVE_STREAMS, MAX_SPREAD_WINDOW, MIN_CAP, ServeSection};

use crate::wire::LABEL_KEYS;
const MAX_PEERS: usize = 1024;
const MAX_IGNORE: usize = 1024;
use crate::wire::MAX_ID_LEN;

/// A configuration error: which file, which line (when known), what.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// `syncd.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub node: NodeSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Bandwidth caps for everything this node uploads and downloads.
    #[serde(default)]
    pub limits: LimitsSection,
    /// How much this node serves at once, and origin protection.
    #[serde(default)]
    pub serve: ServeSection,
    /// Mutual TLS under the fleet CA (`ca`, `cert`, `key`: PEM files,
    /// relative to this file's directory). Absent: the peer port is plain
    /// and unauthenticated.
    pub tls: Option<crate::tls::TlsFiles>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// This node's name in the fleet, unique: letters, digits, `.`, `_`, `-`.
    pub id: Spanned<String>,
    /// Address the peer service listens on, e.g. `0.0.0.0:7400`.
    pub listen: Spanned<String>,
    /// Address peers should dial to reach this node (`host:port`), e.g.
    /// `10.0.0.1:7400`. Required when `listen` is a wildcard address
    /// (`0.0.0.0`, `[::]`): peers cannot dial a wildcard. Defaults to
    /// `listen` otherwise.
    pub advertise: Option<Spanned<String>>,
    /// Where the index and transient files live. Must not be inside a
    /// synced directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: Spanned<PathBuf>,
    /// Bootstrap peers (`host:port`); the rest of the fleet is learned by
    /// gossip.
    #[serde(default = "spanned_default")]
    pub peers: Spanned<Vec<String>>,
    /// Topology: any of `region`, `zone`, `rack`. Nearer peers are
    /// preferred (a weight, never a filter).
    #[serde(default = "spanned_default")]
    pub labels: Spanned<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Unix socket `syncctl` talks to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            socket: default_socket(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus `/metrics` address; absent disables the endpoint.
    pub listen: Option<Spanned<String>>,
}

/// An absent key: empty value, span 0..0 (line 1; no key to point at).
fn spanned_default<T: Default>() -> Spanned<T> {
    Spanned::new(0..0, T::default())
}

fn default_state_dir() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from("/var/lib/syncd"))
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/syncd/syncd.sock")
}

/// What a node does with a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Publishes; ignores remote changes.
    Source,
    /// Only receives; local edits are reported.
    Replica,
    /// Any node may publish (not implemented yet; rejected by validation).
    TwoWay,
}

/// One file of `dirs.d/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirFile {
    /// Fleet-wide id of the directory: letters, digits, `.`, `_`, `-`.
    pub id: Spanned<String>,
    /// Absolute path of the synced root on this node.
    pub path: Spanned<PathBuf>,
    pub mode: Spanned<Mode>,
    /// Glob patterns of paths neither published nor touched.
    #[serde(default = "spanned_default")]
    pub ignore: Spanned<Vec<String>>,
    /// Full rescan interval, the safety net under the watcher.
    #[serde(default = "default_rescan", with = "humantime_serde")]
    pub rescan_interval: Duration,
    /// Command (argv, no shell) run after a new version is fully in place
    /// on this node, e.g. `["systemctl", "reload", "nginx"]`.
    #[serde(default = "spanned_default")]
    pub on_synced: Spanned<Vec<String>>,
    /// The hook is killed after this long.
    #[serde(default = "default_hook_timeout", with = "humantime_serde")]
    pub on_synced_timeout: Duration,
    /// Files larger than this are not published (sources) and versions
    /// with larger files are refused (replicas), e.g. `"1TiB"`.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: Spanned<Size>,
    /// Most entries (files, directories, symlinks) a version may have.
    #[serde(default = "default_max_entries")]
    pub max_entries: Spanned<u64>,
    /// Space left free on the directory's file system: a version whose new
    /// bytes would eat into it is refused, e.g. `"1GiB"`.
    #[serde(default = "default_min_free_space")]
    pub min_free_space: Spanned<Size>,
    /// Publish and apply set-user-id / set-group-id bits on files. Off by
    /// default: otherwise whoever publishes the directory can create setuid
    /// programs on every replica.
    #[serde(default)]
    pub allow_setid: bool,
    /// `"high"`, `"normal"` (the default) or `"low"`: while a transfer of
    /// a higher class runs on this node, lower ones trickle. Changeable at
    /// run time with `syncctl priority`.
    #[serde(default)]
    pub priority: Priority,
    /// The nodes that may publish this directory, e.g. `["web-01"]`:
    /// replicas take only versions signed by one of them. Empty: any node
    /// with a fleet certificate. Needs `[tls]` in `syncd.toml`.
    #[serde(default = "spanned_default")]
    pub publishers: Spanned<Vec<String>>,
    /// Bandwidth caps for this directory's transfers (`[limits]` at the
    /// end of the file).
    #[serde(default)]
    pub limits: LimitsSection,
}

/// A byte size with a binary unit: `"512"`, `"64KiB"`, `"1.5GiB"`, `"1TiB"`
/// (also `KB`/`MB`/`GB`/`TB` for powers of 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Size, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("size {text:?} does not start with a number"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "PiB" => 1 << 50,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "size {text:?} has unknown unit {other:?} (use B, KiB, MiB, GiB, TiB)"
                ));
            }
        };
        let v = n * mult as f64;
        if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
            return Err(format!("size {text:?} is out of range"));
        }
        Ok(Size(v as u64))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn default_max_file_size() -> Spanned<Size> {
    Spanned::new(0..0, Size(1 << 40))
}

fn default_max_entries() -> Spanned<u64> {
    Spanned::new(0..0, 4_000_000)
}

fn default_min_free_space() -> Spanned<Size> {
    Spanned::new(0..0, Size(256 << 20))
}

/// A rescan more often than this is a configuration mistake (`"0s"` made
/// thousands of full scans a second); the watcher covers quick changes.
pub const MIN_RESCAN: Duration = Duration::from_secs(10);

fn default_hook_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Most arguments of an `on_synced` command.
const MAX_HOOK_ARGS: usize = 64;

fn default_rescan() -> Duration {
    Duration::from_secs(3600)
}

/// The validated whole: the node and its directories.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub node: NodeFile,
    pub listen: SocketAddr,
    /// What peers dial: `[node] advertise`, or `listen` when that is not a
    /// wildcard.
    pub advertise: String,
    pub metrics_listen: Option<SocketAddr>,
    /// Directories by id, each with the file it came from.
    pub dirs: BTreeMap<String, (PathBuf, DirFile)>,
}

fn line_of(text: &str, span: std::ops::Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message already says "at line L, column C" with a snippet.
        message: e.to_string().trim_end().to_string(),
    })
}

/// Ids become RocksDB keys, metric labels and file names: keep them plain.
/// Most publishers one directory may name.
const MAX_PUBLISHERS: usize = 64;

/// `publishers`: node ids, signed versions (so `[tls]`), and a source
/// among its own publishers.
fn check_publishers(d: &DirFile, node_id: &str, tls: bool) -> Result<(), String> {
    let p = d.publishers.get_ref();
    if p.is_empty() {
        return Ok(());
    }
    if p.len() > MAX_PUBLISHERS {
        return Err(format!("more than {MAX_PUBLISHERS} publishers"));
    }
    for id in p {
        check_id("publisher", id)?;
    }
    if !tls {
        return Err("publishers needs [tls] in syncd.toml: versions are signed with the node's certificate key".into());
    }
    if *d.mode.get_ref() == Mode::Source && !p.iter().any(|x| x == node_id) {
        return Err(format!(
            "this node ({node_id:?}) is a source of {:?} but not among its publishers {p:?}; replicas would refuse its versions",
            d.id.get_ref()
        ));
    }
    Ok(())
}

fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("{what} must be 1..={MAX_ID_LEN} characters"));
    }
    if !crate::wire::is_id(id) {
        return Err(format!(
            "{what} {id:?} may only contain letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl Config {
    /// Loads `syncd.toml` and every `*.toml` in the `dirs.d/` beside it, and
    /// validates everything. The first error wins.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = read(file)?;
        let mut node: NodeFile = parse(file, &text)?;
        let invalid = |span: std::ops::Range<usize>, message: String| ConfigError::Invalid {
            path: file.to_path_buf(),
            line: line_of(&text, span),
            message,
        };
        let n = &node.node;
        check_id("node id", n.id.get_ref()).map_err(|m| invalid(n.id.span(), m))?;
        let listen: SocketAddr = n.listen.get_ref().parse().map_err(|e| {
            invalid(
                n.listen.span(),
                format!(
                    "listen {:?} is not an address:port ({e})",
                    n.listen.get_ref()
                ),
            )
        })?;
        let advertise = match &n.advertise {
            Some(a) => {
                let text = a.get_ref();
                let ok = text.len() <= 256
                    && text.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                    });
                let wildcard = text
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| a.ip().is_unspecified());
                if !ok || wildcard {
                    return Err(invalid(
                        a.span(),
                        format!(
                            "advertise {text:?} must be the host:port peers dial to reach this node"
                        ),
                    ));
                }
                text.clone()
            }
            None if listen.ip().is_unspecified() => {
                return Err(invalid(
                    n.listen.span(),
                    format!(
                        "listen {:?} is a wildcard address, which peers cannot dial; set \
                         advertise = \"<this node's address>:{}\" in [node]",
                        n.listen.get_ref(),
                        listen.port()
                    ),
                ));
            }
            None => listen.to_string(),
        };
        if !n.state_dir.get_ref().is_absolute() {
            return Err(invalid(
                n.state_dir.span(),
                format!("state_dir {:?} must be absolute", n.state_dir.get_ref()),
            ));
        }
        if n.peers.get_ref().len() > MAX_PEERS {
            return Err(invalid(
                n.peers.span(),
                format!("more than {MAX_PEERS} bootstrap peers"),
            ));
        }
        for p in n.peers.get_ref() {
            let ok = p
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(invalid(
                    n.peers.span(),
                    format!("peer {p:?} is not host:port"),
                ));
            }
        }
        for (k, v) in n.labels.get_ref() {
            if !LABEL_KEYS.contains(&k.as_str()) {
                return Err(invalid(
                    n.labels.span(),
                    format!("unknown label {k:?}; labels are {}", LABEL_KEYS.join(", ")),
                ));
            }
            check_id(&format!("label {k}"), v).map_err(|m| invalid(n.labels.span(), m))?;
        }
        let metrics_listen = match &node.metrics.listen {
            None => None,
            Some(l) => Some(l.get_ref().parse().map_err(|e| {
                invalid(
                    l.span(),
                    format!(
                        "metrics listen {:?} is not an address:port ({e})",
                        l.get_ref()
                    ),
                )
            })?),
        };
        node.limits.check(file, &text)?;
        node.serve.check(file, &text)?;
        if let Some(t) = &mut node.tls {
            let base = file.parent().unwrap_or(Path::new("."));
            for p in [&mut t.ca, &mut t.cert, &mut t.key] {
                *p = base.join(&*p);
            }
            crate::tls::check(t, node.node.id.get_ref()).map_err(|e| ConfigError::Invalid {
                path: file.to_path_buf(),
                line: section_line(&text, "tls", "cert"),
                message: format!("[tls]: {e}"),
            })?;
        }
        let dirs = load_dirs(
            file,
            n.state_dir.get_ref(),
            n.id.get_ref(),
            node.tls.is_some(),
        )?;
        Ok(Config {
            file: file.to_path_buf(),
            listen,
            advertise,
            metrics_listen,
            dirs,
            node,
        })
    }
}

/// Loads `dirs.d/*.toml` beside `file`, sorted by file name.
fn load_dirs(
    file: &Path,
    state_dir: &Path,
    node_id: &str,
    tls: bool,
) -> Result<BTreeMap<String, (PathBuf, DirFile)>, ConfigError> {
    let dir = file.parent().unwrap_or(Path::new(".")).join(DIRS_D);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|source| ConfigError::Read {
                path: dir.clone(),
                source,
            })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    let mut out: BTreeMap<String, (PathBuf, DirFile)> = BTreeMap::new();
    // Canonical path → (configured path, file).
    let mut paths: HashMap<PathBuf, (PathBuf, PathBuf)> = HashMap::new();
    let mut canonical_state: Option<PathBuf> = None;
    for path in files {
        let text = read(&path)?;
        let d: DirFile = parse(&path, &text)?;
        let invalid = |span: std::ops::Range<usize>, message: String| ConfigError::Invalid {
            path: path.clone(),
            line: line_of(&text, span),
            message,
        };
        check_id("directory id", d.id.get_ref()).map_err(|m| invalid(d.id.span(), m))?;
        let root = d.path.get_ref();
        if !root.is_absolute() {
            return Err(invalid(
                d.path.span(),
                format!("path {root:?} must be absolute"),
            ));
        }
        if root
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(invalid(
                d.path.span(),
                format!("path {root:?} contains '..'"),
            ));
        }
        if *d.mode.get_ref() == Mode::TwoWay {
            return Err(invalid(
                d.mode.span(),
                "mode \"two-way\" is not supported yet; use \"source\" or \"replica\"".into(),
            ));
        }
        if d.ignore.get_ref().len() > MAX_IGNORE {
            return Err(invalid(
                d.ignore.span(),
                format!("more than {MAX_IGNORE} ignore patterns"),
            ));
        }
        if let Some(p) = d
            .ignore
            .get_ref()
            .iter()
            .find(|p| p.is_empty() || p.contains('\0'))
        {
            return Err(invalid(
                d.ignore.span(),
                format!("ignore pattern {p:?} is empty or has NUL"),
            ));
        }
        chunk_store::ignore::Ignore::new(d.ignore.get_ref())
            .map_err(|e| invalid(d.ignore.span(), e.to_string()))?;
        let hook = d.on_synced.get_ref();
        if !hook.is_empty()
            && (hook[0].is_empty()
                || hook.len() > MAX_HOOK_ARGS
                || hook.iter().any(|a| a.contains('\0')))
        {
            return Err(invalid(
                d.on_synced.span(),
                format!(
                    "on_synced must name a program and have at most {MAX_HOOK_ARGS} arguments without NUL"
                ),
            ));
        }
        if d.rescan_interval < MIN_RESCAN {
            return Err(ConfigError::Invalid {
                path: path.clone(),
                line: key_line(&text, "rescan_interval"),
                message: format!(
                    "rescan_interval {} is below the minimum of {}",
                    humantime::format_duration(d.rescan_interval),
                    humantime::format_duration(MIN_RESCAN)
                ),
            });
        }
        if d.max_file_size.get_ref().0 == 0 || *d.max_entries.get_ref() == 0 {
            return Err(invalid(
                d.max_file_size.span(),
                "max_file_size and max_entries must be more than 0".into(),
            ));
        }
        d.limits.check(&path, &text)?;
        check_publishers(&d, node_id, tls).map_err(|m| invalid(d.publishers.span(), m))?;
        if d.on_synced_timeout.is_zero() {
            return Err(invalid(
                d.on_synced.span(),
                "on_synced_timeout must be more than 0".into(),
            ));
        }
        // Overlaps are checked on canonical paths: a synced path that is a
        // symlink into the state directory, or one directory under two
        // ids through different spellings, must not pass a lexical check.
        let canonical = canonical_path(root);
        let state_canonical = canonical_state.get_or_insert_with(|| canonical_path(state_dir));
        if state_canonical.starts_with(&canonical) || canonical.starts_with(&*state_canonical) {
            return Err(invalid(
                d.path.span(),
                format!(
                    "path {root:?} ({}) overlaps state_dir {state_dir:?}; the index would sync itself",
                    canonical.display()
                ),
            ));
        }
        for (other, (other_path, other_file)) in &paths {
            if canonical.starts_with(other) || other.starts_with(&canonical) {
                return Err(invalid(
                    d.path.span(),
                    format!(
                        "path {root:?} overlaps {other_path:?} of {} (both are {} or nested)",
                        other_file.display(),
                        canonical.display()
                    ),
                ));
            }
        }
        if let Some((prev, _)) = out.get(d.id.get_ref()) {
            return Err(invalid(
                d.id.span(),
                format!(
                    "directory id {:?} is already defined in {}",
                    d.id.get_ref(),
                    prev.display()
                ),
            ));
        }
        paths.insert(canonical, (root.clone(), path.clone()));
        out.insert(d.id.get_ref().clone(), (path, d));
    }
    Ok(out)
}

/// The line of `key` in a file, for keys read without a span.
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(1, |i| i + 1)
}

/// `path` with symlinks resolved, as far as it exists: the longest existing
/// ancestor canonicalized, the rest appended (a directory may be created
/// after the configuration is written).
fn canonical_path(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            let mut out = c;
            out.extend(rest.iter().rev());
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests;
