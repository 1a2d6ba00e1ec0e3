//! Where a model comes from: a local Hugging Face-layout directory, or a hub id
//! `org/name[@revision]` fetched into the standard HF cache (so the Python tools and this one
//! share downloads), every file checked against the hub's listed size and SHA-256.
use crate::relative_path::join_inside;
use crate::{atomic, http};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const CONFIG: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
/// The repository metadata is a few kB per file; a hub sending more is refused.
const METADATA_LIMIT: u64 = 64 << 20;
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// Fetched when the repository has them.
const OPTIONAL_FILES: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// A parsed model source string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub(HubId),
}

/// A model repository on the hub at a revision (branch, tag or commit; default `main`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

impl fmt::Display for HubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)
    }
}

impl HubId {
    /// Parses `org/name[@revision]` with the hub's naming rules.
    pub fn parse(s: &str) -> Result<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (s, "main"),
        };
        // The revision names a file under the cache's refs/: only a plain relative path.
        if revision.is_empty()
            || revision.chars().any(char::is_whitespace)
            || revision.contains("..")
            || join_inside(Path::new("refs"), revision).is_err()
        {
            bail!("hub id {s:?}: invalid revision {revision:?}");
        }
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 {
            bail!("hub id {s:?}: expected org/name[@revision]");
        }
        for part in parts {
            check_name_part(s, part)?;
        }
        Ok(Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The cache folder name huggingface_hub uses: `models--org--name`, `datasets--org--name`.
    pub(crate) fn cache_folder(&self, kind: RepoKind) -> String {
        format!("{}--{}", kind.plural(), self.repo.replace('/', "--"))
    }
}

/// The kinds of hub repository linearize reads: models, and datasets (data sources by hub id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// The name in API paths and cache folders: `models`, `datasets`.
    fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// The prefix of download URLs: models have none, datasets `datasets/`.
    fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

fn check_name_part(id: &str, part: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if part.is_empty() || part.len() > 96 {
        bail!("hub id {id:?}: org and name must each have 1 to 96 characters");
    }
    if !part.chars().all(allowed) {
        bail!("hub id {id:?}: {part:?} may only contain letters, digits, '-', '_' and '.'");
    }
    if part.starts_with(['-', '.'])
        || part.ends_with(['-', '.'])
        || part.contains("--")
        || part.contains("..")
    {
        bail!("hub id {id:?}: {part:?} may not start or end with '-' or '.', nor contain '--' or '..'");
    }
    Ok(())
}

impl ModelSource {
    /// An existing directory is local; something that looks like a path but does not exist is
    /// an error naming it; anything else must be a hub id.
    pub fn parse(source: &str) -> Result<Self> {
        if source.trim().is_empty() {
            bail!("empty model source: expected a local model directory or a hub id org/name[@revision]");
        }
        let path = Path::new(source);
        if path.is_dir() {
            let dir = path
                .canonicalize()
                .with_context(|| format!("resolving {source}"))?;
            return Ok(Self::Local(dir));
        }
        if path.exists() {
            bail!(
                "{source} is a file, not a model directory (expected a directory with config.json)"
            );
        }
        let looks_like_path =
            source.starts_with(['/', '.', '~']) || source.contains('\\') || source.ends_with('/');
        if looks_like_path {
            bail!("model directory {source} does not exist");
        }
        HubId::parse(source)
            .map(Self::Hub)
            .with_context(|| format!("{source} is not an existing directory, nor a valid hub id"))
    }
}

/// How to reach the hub and where its cache is, from the environment variables huggingface_hub
/// reads.
#[derive(Clone, Debug)]
pub struct HubSettings {
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// Use only the cache, never the network.
    pub offline: bool,
    /// Limit for the repository metadata request that precedes downloads; a hub that does not
    /// answer within it counts as unreachable.
    pub timeout: Duration,
}

impl HubSettings {
    /// From the process environment: `HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`
    /// (else the token file `huggingface-cli login` writes), `HF_HUB_OFFLINE`,
    /// `HF_HUB_ETAG_TIMEOUT` (seconds, default 10).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Like [`HubSettings::from_env`], reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|home| Path::new(&home).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").map(|t| t.trim().to_string()).or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        });
        let timeout = var("HF_HUB_ETAG_TIMEOUT")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .map_or(Duration::from_secs(10), Duration::from_secs_f64);
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        Self {
            cache_dir,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline,
            timeout,
        }
    }
}

/// A directory with the Hugging Face layout (config.json, tokenizer files, safetensors weights)
/// for `source`: the directory itself if local, else the hub snapshot in the HF cache,
/// downloaded if needed. Settings come from the environment ([`HubSettings::from_env`]).
pub fn resolve(source: &str) -> Result<PathBuf> {
    resolve_with(source, &HubSettings::from_env())
}

/// [`resolve`] with explicit hub settings.
pub fn resolve_with(source: &str, settings: &HubSettings) -> Result<PathBuf> {
    match ModelSource::parse(source)? {
        ModelSource::Local(dir) => Ok(dir),
        ModelSource::Hub(id) if settings.offline => cached_snapshot(&id, settings).map_err(|err| {
            anyhow::anyhow!(
                "{err}; HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to download \
                 {id}, or pass a local model directory"
            )
        }),
        ModelSource::Hub(id) => download(&id, settings, Files::All),
    }
}

/// A directory with `source`'s config.json and, where the repository has them, its tokenizer
/// files, but no weights: what `--dry-run` plans from. Local directories are taken as they are;
/// a hub model comes from the cache when its config is there (weights or not), else only these
/// small files are downloaded.
pub fn resolve_config_with(source: &str, settings: &HubSettings) -> Result<PathBuf> {
    match ModelSource::parse(source)? {
        ModelSource::Local(dir) => Ok(dir),
        ModelSource::Hub(id) => {
            if let Ok(dir) = cached_config(&id, settings) {
                return Ok(dir);
            }
            if settings.offline {
                bail!(
                    "{id}: its config.json is not in the Hugging Face cache at {} and \
                     HF_HUB_OFFLINE is set",
                    settings.cache_dir.display()
                );
            }
            download(&id, settings, Files::ConfigOnly)
        }
    }
}

/// The snapshot directory of `id` in the cache if it holds config.json (weights or not).
fn cached_config(id: &HubId, settings: &HubSettings) -> Result<PathBuf> {
    let snapshot = snapshot_dir(id, RepoKind::Model, settings)?;
    if !snapshot.join(CONFIG).is_file() {
        bail!("{}: no {CONFIG}", snapshot.display());
    }
    Ok(snapshot)
}

/// The snapshot directory the cache's ref for `id` points to (which may be incomplete).
pub(crate) fn snapshot_dir(id: &HubId, kind: RepoKind, settings: &HubSettings) -> Result<PathBuf> {
    let repo_dir = settings.cache_dir.join(id.cache_folder(kind));
    let ref_path = repo_dir.join("refs").join(&id.revision);
    let commit = if ref_path.is_file() {
        let commit = std::fs::read_to_string(&ref_path)
            .with_context(|| format!("reading {}", ref_path.display()))?
            .trim()
            .to_string();
        if !http::is_lower_hex(&commit, 40) {
            bail!(
                "{}: expected a commit hash of 40 hex digits, found {commit:?}",
                ref_path.display()
            );
        }
        commit
    } else if repo_dir.join("snapshots").join(&id.revision).is_dir() {
        id.revision.clone()
    } else {
        bail!(
            "{id} is not in the Hugging Face cache at {}",
            settings.cache_dir.display()
        );
    };
    Ok(repo_dir.join("snapshots").join(&commit))
}

/// The snapshot directory of `id` in the cache, if it is there complete.
pub fn cached_snapshot(id: &HubId, settings: &HubSettings) -> Result<PathBuf> {
    let snapshot = snapshot_dir(id, RepoKind::Model, settings)?;
    for file in required_files(&snapshot)? {
        if !snapshot.join(&file).is_file() {
            bail!(
                "the cached snapshot {} of {id} is incomplete: {file} is missing",
                snapshot.display()
            );
        }
    }
    Ok(snapshot)
}

/// config.json and the weights a snapshot directory needs (the shards listed by its index).
fn required_files(snapshot: &Path) -> Result<Vec<String>> {
    let index = snapshot.join(WEIGHTS_INDEX);
    let mut files = vec![CONFIG.to_string()];
    if index.is_file() {
        files.extend(shard_names(&index)?);
    } else {
        files.push(SINGLE_WEIGHTS.to_string());
    }
    Ok(files)
}

#[derive(Deserialize)]
struct WeightsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The distinct shard files a safetensors index refers to.
fn shard_names(index: &Path) -> Result<BTreeSet<String>> {
    let text =
        std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let parsed: WeightsIndex = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a safetensors index with a weight_map",
            index.display()
        )
    })?;
    let names: BTreeSet<String> = parsed.weight_map.into_values().collect();
    for name in &names {
        join_inside(Path::new(""), name)
            .with_context(|| format!("{}: weight_map entry", index.display()))?;
    }
    Ok(names)
}

/// The repository metadata `GET /api/models/{repo}/revision/{rev}?blobs=true` answers: the
/// commit the revision points to and every file with its size, and for LFS files their SHA-256.
#[derive(Deserialize)]
pub(crate) struct RepoInfo {
    pub(crate) sha: String,
    pub(crate) siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
pub(crate) struct Sibling {
    pub(crate) rfilename: String,
    /// The git blob id (40 hex digits): the cache's name for a file stored in git.
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// What [`download`] fetches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Files {
    /// config.json, the tokenizer and generation files, and the safetensors weights.
    All,
    /// All but the weights.
    ConfigOnly,
}

/// Fetches `id`'s files into the cache with huggingface_hub's layout (`blobs/<hash>`,
/// `snapshots/<commit>/<file>` linking to it, `refs/<revision>`). Every path comes from values
/// checked here: the commit must be 40 hex digits, a blob's name its SHA-256 or git blob id, and
/// a file name a plain relative path; nothing the server sends in headers is used. Each file is
/// checked against the size the metadata lists, and LFS files (the weights) against their
/// SHA-256, before it is linked into the snapshot.
fn download(id: &HubId, settings: &HubSettings, what: Files) -> Result<PathBuf> {
    let agent = http::agent(settings.timeout);
    let info = match repo_info(&agent, id, RepoKind::Model, settings) {
        Ok(info) => info,
        Err(InfoError::Unreachable(reason)) => {
            if let Ok(dir) = cached_snapshot(id, settings) {
                tracing::warn!(
                    "the Hugging Face hub is unreachable ({reason}); using the cached {}",
                    dir.display()
                );
                return Ok(dir);
            }
            bail!("{}", unreachable_message(id, settings, &reason));
        }
        Err(InfoError::Other(err)) => return Err(err),
    };
    if !http::is_lower_hex(&info.sha, 40) {
        bail!(
            "{id}: the hub named commit {:?}, expected 40 hex digits; refused",
            info.sha
        );
    }
    let files: BTreeMap<&str, &Sibling> = info
        .siblings
        .iter()
        .map(|s| (s.rfilename.as_str(), s))
        .collect();
    if !files.contains_key(CONFIG) {
        bail!("{id}: the repository has no config.json, so it is not a transformers model");
    }
    let snapshot = settings
        .cache_dir
        .join(id.cache_folder(RepoKind::Model))
        .join("snapshots")
        .join(&info.sha);
    // Every file comes from the commit the metadata named, so a push during the download
    // cannot mix two versions in one snapshot.
    let fetch = |file: &str| -> Result<PathBuf> {
        let sibling = files.get(file).with_context(|| {
            format!(
                "{id}: {file} is not among the repository's files at {}",
                info.sha
            )
        })?;
        fetch_file(&agent, id, RepoKind::Model, settings, &info.sha, sibling).map_err(|err| {
            match err.downcast::<ureq::Transport>() {
                Ok(transport) => anyhow::anyhow!(unreachable_message(
                    id,
                    settings,
                    &http::one_line(&transport.to_string())
                )),
                Err(err) => anyhow::anyhow!("{id}: {}", http::one_line(&format!("{err:#}"))),
            }
        })
    };
    fetch(CONFIG)?;
    for file in OPTIONAL_FILES.into_iter().filter(|f| files.contains_key(f)) {
        fetch(file)?;
    }
    if what == Files::ConfigOnly {
        // The ref below is still recorded, so that the config is found offline; a run that
        // needs the weights sees the snapshot as incomplete (`cached_snapshot`) and fetches them.
    } else if files.contains_key(WEIGHTS_INDEX) {
        let index = fetch(WEIGHTS_INDEX)?;
        for shard in shard_names(&index)? {
            fetch(&shard)?;
        }
    } else if files.contains_key(SINGLE_WEIGHTS) {
        fetch(SINGLE_WEIGHTS)?;
    } else {
        bail!("{id}: the repository has no safetensors weights ({SINGLE_WEIGHTS} or {WEIGHTS_INDEX}); only safetensors checkpoints are supported");
    }
    record_ref(id, RepoKind::Model, settings, &info.sha)?;
    Ok(snapshot)
}

/// Points the cache's ref for `id`'s revision (e.g. `main`) at `commit`, so that the revision
/// resolves offline to that snapshot.
pub(crate) fn record_ref(
    id: &HubId,
    kind: RepoKind,
    settings: &HubSettings,
    commit: &str,
) -> Result<()> {
    let repo_dir = settings.cache_dir.join(id.cache_folder(kind));
    let ref_path = join_inside(&repo_dir.join("refs"), &id.revision)?;
    if let Some(parent) = ref_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    atomic::write_file(&ref_path, commit.as_bytes()).with_context(|| {
        format!(
            "recording {id} -> {commit} in {}",
            settings.cache_dir.display()
        )
    })
}

/// One file of the snapshot `commit`: reused if its link is there (links are made only to
/// verified blobs), else downloaded, verified, stored as a blob and linked.
pub(crate) fn fetch_file(
    agent: &ureq::Agent,
    id: &HubId,
    kind: RepoKind,
    settings: &HubSettings,
    commit: &str,
    file: &Sibling,
) -> Result<PathBuf> {
    let repo_dir = settings.cache_dir.join(id.cache_folder(kind));
    let name = file.rfilename.as_str();
    let snapshot = repo_dir.join("snapshots").join(commit);
    let link = join_inside(&snapshot, name).with_context(|| format!("file name {name:?}"))?;
    if link.is_file() {
        return Ok(link);
    }
    let (blob, expected) = match &file.lfs {
        Some(lfs) => {
            if !http::is_sha256_hex(&lfs.sha256) {
                bail!(
                    "{name}: the hub listed SHA-256 {:?}, expected 64 hex digits",
                    lfs.sha256
                );
            }
            let expected = http::Expected {
                size: Some(lfs.size),
                sha256: Some(&lfs.sha256),
            };
            (lfs.sha256.as_str(), expected)
        }
        None => {
            let blob = file
                .blob_id
                .as_deref()
                .filter(|b| http::is_lower_hex(b, 40))
                .with_context(|| {
                    format!("{name}: the hub listed no blob id of 40 hex digits for it")
                })?;
            let size = file
                .size
                .with_context(|| format!("{name}: the hub listed no size for it"))?;
            let expected = http::Expected {
                size: Some(size),
                sha256: None,
            };
            (blob, expected)
        }
    };
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let blob_path = blobs.join(blob);
    if !blob_path.is_file() {
        tracing::info!("fetching {name} of {id}");
        let url = format!(
            "{}/{}{}/resolve/{commit}/{name}",
            settings.endpoint,
            kind.url_prefix(),
            id.repo
        );
        let mut request = agent.get(&url);
        if let Some(token) = &settings.token {
            request = request.set("authorization", &format!("Bearer {token}"));
        }
        http::download_verified(request, &blob_path, name, expected)?;
    }
    let parent = link.parent().context("a snapshot file has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // Relative, as huggingface_hub links: `../../blobs/<hash>` plus one `..` per subdirectory.
    let depth = Path::new(name).components().count() + 1;
    let target = Path::new(&"../".repeat(depth)).join("blobs").join(blob);
    let tmp_link = link.with_extension("link-partial");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&target, &tmp_link)
        .and_then(|()| std::fs::rename(&tmp_link, &link))
        .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    Ok(link)
}

pub(crate) enum InfoError {
    Unreachable(String),
    Other(anyhow::Error),
}

/// The repository's commit and file list with sizes and hashes, within the settings' timeout.
pub(crate) fn repo_info(
    agent: &ureq::Agent,
    id: &HubId,
    kind: RepoKind,
    settings: &HubSettings,
) -> Result<RepoInfo, InfoError> {
    let url = format!(
        "{}/api/{}/{}/revision/{}?blobs=true",
        settings.endpoint,
        kind.plural(),
        id.repo,
        id.revision
    );
    let mut request = agent.get(&url).timeout(settings.timeout);
    if let Some(token) = &settings.token {
        request = request.set("authorization", &format!("Bearer {token}"));
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Transport(transport)) => {
            return Err(InfoError::Unreachable(http::one_line(
                &transport.to_string(),
            )))
        }
        Err(ureq::Error::Status(code, _)) => {
            return Err(InfoError::Other(match code {
                401 | 403 => anyhow::anyhow!(
                "the hub refused access to {} (HTTP {code}): the model may be gated or private; \
                     accept its terms on the hub and set HF_TOKEN",
                id
            ),
                404 => anyhow::anyhow!("{} was not found on the hub ({})", id, settings.endpoint),
                _ => anyhow::anyhow!("the hub answered HTTP {code} for {}", id),
            }))
        }
    };
    serde_json::from_reader(response.into_reader().take(METADATA_LIMIT)).map_err(|err| {
        InfoError::Other(anyhow::anyhow!(
            "{}: unexpected repository metadata from the hub: {err}",
            id
        ))
    })
}

fn unreachable_message(id: &HubId, settings: &HubSettings, reason: &str) -> String {
    format!(
        "could not reach the Hugging Face hub at {} to fetch {id} ({reason}), and it is not in the \
         cache at {}; pass a local model directory instead (one with config.json, tokenizer.json \
         and *.safetensors)",
        settings.endpoint,
        settings.cache_dir.display()
    )
}
