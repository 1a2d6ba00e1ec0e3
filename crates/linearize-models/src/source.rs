//! Where a model comes from: a local Hugging Face-layout directory, or a hub id
//! `org/name[@revision]` fetched with hf-hub into the standard HF cache (so the Python tools and
//! this one share downloads).
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const CONFIG: &str = "config.json";
const SINGLE_WEIGHTS: &str = "model.safetensors";
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
        if revision.is_empty()
            || revision.chars().any(char::is_whitespace)
            || revision.contains("..")
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

    /// The repository of this id at its revision, as hf-hub names it.
    pub(crate) fn repo(&self, kind: RepoType) -> Repo {
        Repo::with_revision(self.repo.clone(), kind, self.revision.clone())
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
    let snapshot = snapshot_dir(id, settings)?;
    if !snapshot.join(CONFIG).is_file() {
        bail!("{}: no {CONFIG}", snapshot.display());
    }
    Ok(snapshot)
}

/// The snapshot directory the cache's ref for `id` points to (which may be incomplete).
fn snapshot_dir(id: &HubId, settings: &HubSettings) -> Result<PathBuf> {
    snapshot_dir_of(id, RepoType::Model, settings)
}

/// The snapshot directory the cache's ref for the `kind` repository `id` points to.
pub(crate) fn snapshot_dir_of(
    id: &HubId,
    kind: RepoType,
    settings: &HubSettings,
) -> Result<PathBuf> {
    let repo_dir = settings.cache_dir.join(id.repo(kind).folder_name());
    let ref_path = repo_dir.join("refs").join(&id.revision);
    let commit = if ref_path.is_file() {
        std::fs::read_to_string(&ref_path)
            .with_context(|| format!("reading {}", ref_path.display()))?
            .trim()
            .to_string()
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
    let snapshot = snapshot_dir(id, settings)?;
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
    Ok(parsed.weight_map.into_values().collect())
}

#[derive(Deserialize)]
pub(crate) struct RepoInfo {
    pub sha: String,
    pub siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
}

/// What [`download`] fetches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Files {
    /// config.json, the tokenizer and generation files, and the safetensors weights.
    All,
    /// All but the weights.
    ConfigOnly,
}

fn download(id: &HubId, settings: &HubSettings, what: Files) -> Result<PathBuf> {
    let api = hub_api(settings)?;
    let named = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision.clone(),
    ));
    let info = match repo_info(&named, id, settings) {
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
    let files: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    if !files.contains(CONFIG) {
        bail!("{id}: the repository has no config.json, so it is not a transformers model");
    }
    // Every file comes from the commit the metadata named, so a push during the download
    // cannot mix two versions in one snapshot.
    let pinned = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        info.sha.clone(),
    ));
    let fetch = |file: &str| -> Result<PathBuf> {
        tracing::info!("fetching {file} of {id}");
        pinned.get(file).map_err(|err| match err {
            ApiError::RequestError(e) if matches!(*e, ureq::Error::Transport(_)) => {
                anyhow::anyhow!(unreachable_message(id, settings, &one_line(&e.to_string())))
            }
            err => anyhow::anyhow!("{id}: downloading {file}: {}", one_line(&err.to_string())),
        })
    };
    let config = fetch(CONFIG)?;
    let snapshot = config
        .parent()
        .context("hf-hub returned a file without a parent directory")?
        .to_path_buf();
    for file in OPTIONAL_FILES.into_iter().filter(|f| files.contains(f)) {
        fetch(file)?;
    }
    if what == Files::ConfigOnly {
        // The ref below is still recorded, so that the config is found offline; a run that
        // needs the weights sees the snapshot as incomplete (`cached_snapshot`) and fetches them.
    } else if files.contains(WEIGHTS_INDEX) {
        let index = fetch(WEIGHTS_INDEX)?;
        for shard in shard_names(&index)? {
            fetch(&shard)?;
        }
    } else if files.contains(SINGLE_WEIGHTS) {
        fetch(SINGLE_WEIGHTS)?;
    } else {
        bail!("{id}: the repository has no safetensors weights ({SINGLE_WEIGHTS} or {WEIGHTS_INDEX}); only safetensors checkpoints are supported");
    }
    // So that the named revision (e.g. `main`) resolves offline to this snapshot.
    Cache::new(settings.cache_dir.clone())
        .repo(Repo::with_revision(
            id.repo.clone(),
            RepoType::Model,
            id.revision.clone(),
        ))
        .create_ref(&info.sha)
        .with_context(|| {
            format!(
                "recording {id} -> {} in {}",
                info.sha,
                settings.cache_dir.display()
            )
        })?;
    Ok(snapshot)
}

pub(crate) enum InfoError {
    Unreachable(String),
    Other(anyhow::Error),
}

/// The repository's commit and file list, within the settings' timeout.
pub(crate) fn repo_info(
    repo: &ApiRepo,
    id: &HubId,
    settings: &HubSettings,
) -> Result<RepoInfo, InfoError> {
    let response = repo.info_request().timeout(settings.timeout).call();
    let response = match response {
        Ok(response) => response,
        Err(ureq::Error::Transport(transport)) => {
            return Err(InfoError::Unreachable(one_line(&transport.to_string())))
        }
        Err(ureq::Error::Status(code, _)) => {
            return Err(InfoError::Other(match code {
                401 | 403 => anyhow::anyhow!(
                "the hub refused access to {} (HTTP {code}): the repository may be gated or private; \
                     accept its terms on the hub and set HF_TOKEN",
                id
            ),
                404 => anyhow::anyhow!("{} was not found on the hub ({})", id, settings.endpoint),
                _ => anyhow::anyhow!("the hub answered HTTP {code} for {}", id),
            }))
        }
    };
    serde_json::from_reader(response.into_reader()).map_err(|err| {
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

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(crate) fn hub_api(settings: &HubSettings) -> Result<Api> {
    ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(std::io::stderr().is_terminal())
        .build()
        .context("setting up the Hugging Face hub client")
}
