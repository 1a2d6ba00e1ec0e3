//! Resolving a source to its list of files (explicit file, directory walk, manifest, or the
//! files of a hub dataset).
use super::config::{SourceConfig, SourceKind};
use anyhow::{bail, ensure, Context, Result};
use linearize_models::hub_dataset::{self, Selection};
use linearize_models::relative_path::join_inside;
use linearize_models::source::{HubId, HubSettings};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// Name of the file list the offline text fetcher writes into its corpus directory.
pub const MANIFEST: &str = "manifest.json";

/// A file of a source, with what identifies its content version for the token cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
}

/// The parts of the text fetcher's manifest this reader needs (other keys are ignored).
#[derive(Deserialize)]
struct Manifest {
    /// One entry per document file, with its split (preferred: keeps document boundaries).
    #[serde(default)]
    documents: Vec<ManifestDocument>,
    /// Per split, its files or one record naming its concatenated file.
    #[serde(default)]
    splits: BTreeMap<String, SplitFiles>,
}

#[derive(Deserialize)]
struct ManifestDocument {
    file: PathBuf,
    split: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SplitFiles {
    List(Vec<PathBuf>),
    Record { file: PathBuf },
}

/// The files a source reads, in reading order; a hub dataset's are fetched into the Hugging
/// Face cache first.
pub fn list_files(source: &SourceConfig) -> Result<Vec<SourceFile>> {
    if let Some(hub) = &source.hub {
        let id = HubId::parse(hub)?;
        let paths = hub_dataset::fetch(&id, hub_selection(source), &HubSettings::from_env())?;
        return paths.iter().map(|p| describe(p)).collect();
    }
    let path = &source.path;
    let meta = fs::metadata(path)
        .with_context(|| format!("data source {}: cannot read it", path.display()))?;
    let paths = if meta.is_file() {
        ensure!(
            source.split.is_none(),
            "data source {}: `split` is given but the path is a file, not a directory with {MANIFEST}",
            path.display()
        );
        vec![path.clone()]
    } else if path.join(MANIFEST).is_file() {
        manifest_files(path, source.split.as_deref().unwrap_or("train"))?
    } else {
        ensure!(
            source.split.is_none(),
            "data source {}: `split` is given but the directory has no {MANIFEST}",
            path.display()
        );
        let extension = match source.kind {
            SourceKind::Text => "txt",
            SourceKind::Jsonl | SourceKind::Alpaca | SourceKind::Chat => "jsonl",
        };
        let mut found = Vec::new();
        walk(path, extension, &mut found)?;
        found.sort();
        ensure!(
            !found.is_empty(),
            "data source {}: no *.{extension} files in the directory",
            path.display()
        );
        found
    };
    paths.into_iter().map(|p| describe(&p)).collect()
}

/// The files of a hub dataset source as paths in its repository, without fetching them (for
/// `--dry-run`).
pub fn list_hub_files(source: &SourceConfig) -> Result<Vec<String>> {
    let hub = source
        .hub
        .as_deref()
        .with_context(|| format!("data source {}: not a hub dataset", source.describe()))?;
    hub_dataset::list(
        &HubId::parse(hub)?,
        hub_selection(source),
        &HubSettings::from_env(),
    )
}

fn hub_selection(source: &SourceConfig) -> Selection<'_> {
    Selection {
        split: source.split.as_deref(),
        within: source.path.to_str().filter(|p| !p.is_empty()),
    }
}

fn manifest_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let manifest_path = dir.join(MANIFEST);
    let text = fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let mut manifest: Manifest = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected `documents` [{{file, split}}, ...] or `splits` {{name: [files...]}}",
            manifest_path.display()
        )
    })?;
    let files: Vec<PathBuf> = if manifest.documents.is_empty() {
        match manifest.splits.remove(split) {
            Some(SplitFiles::List(files)) => files,
            Some(SplitFiles::Record { file }) => vec![file],
            None => Vec::new(),
        }
    } else {
        manifest
            .documents
            .iter()
            .filter(|d| d.split == split)
            .map(|d| d.file.clone())
            .collect()
    };
    if files.is_empty() {
        let mut known: Vec<&str> = manifest.splits.keys().map(String::as_str).collect();
        known.extend(manifest.documents.iter().map(|d| d.split.as_str()));
        known.sort_unstable();
        known.dedup();
        bail!(
            "{}: no files in split `{split}` (splits: {})",
            manifest_path.display(),
            known.join(", ")
        );
    }
    // The manifest is data, not trusted: its paths must stay inside its directory.
    files
        .iter()
        .map(|f| {
            join_inside(dir, &f.to_string_lossy())
                .with_context(|| format!("{}: split `{split}`", manifest_path.display()))
        })
        .collect()
}

/// Collects the `*.extension` files under `dir`, following symlinks but entering each directory
/// once (by its canonical path): a link back to an ancestor, or two links to one directory, would
/// otherwise make the walk endless or exponential.
fn walk(dir: &Path, extension: &str, found: &mut Vec<PathBuf>) -> Result<()> {
    let mut visited = HashSet::new();
    walk_once(dir, extension, found, &mut visited)
}

fn walk_once(
    dir: &Path,
    extension: &str,
    found: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
) -> Result<()> {
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    if !visited.insert(canonical.clone()) {
        tracing::warn!(
            "data: skipping {}: it is {}, already listed (a symlink loop or a second link)",
            dir.display(),
            canonical.display()
        );
        return Ok(());
    }
    let mut paths = fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<Vec<_>, _>>()
        })
        .with_context(|| format!("listing {}", dir.display()))?;
    // In name order, so that a directory reached by two names is listed under the same one
    // every time.
    paths.sort();
    for path in paths {
        if path.is_dir() {
            walk_once(&path, extension, found, visited)?;
        } else if path.extension().is_some_and(|e| e == extension) {
            found.push(path);
        }
    }
    Ok(())
}

fn describe(path: &Path) -> Result<SourceFile> {
    let meta = fs::metadata(path).with_context(|| format!("data file {}", path.display()))?;
    ensure!(
        meta.is_file(),
        "data file {}: not a regular file",
        path.display()
    );
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok(SourceFile {
        path: path.to_path_buf(),
        size: meta.len(),
        mtime_ns,
    })
}
