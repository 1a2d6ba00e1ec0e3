//! Dataset repositories on the hub (`{kind: alpaca, hub: yahma/alpaca-cleaned}`): their data
//! files (JSON, JSONL, Parquet) of one split, listed from the repository's metadata and fetched,
//! verified as model files are (crate::source), into the Hugging Face cache beside models
//! (`datasets--org--name`), so that a later run, or one under `HF_HUB_OFFLINE=1`, reads them
//! from there.
use crate::http;
use crate::source::{
    fetch_file, record_ref, repo_info, snapshot_dir, HubId, HubSettings, InfoError, RepoInfo,
    RepoKind,
};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// File extensions read as data.
pub const DATA_EXTENSIONS: [&str; 3] = ["jsonl", "json", "parquet"];

/// Split names of the hub's file-naming convention (`train.jsonl`, `data/test-00000-of-00001.parquet`,
/// `validation/part.json`): a repository none of whose files names one holds a single `train` split.
const KNOWN_SPLITS: [&str; 6] = ["train", "validation", "valid", "val", "test", "dev"];

/// Which files of the repository a source reads.
#[derive(Clone, Copy, Debug)]
pub struct Selection<'a> {
    /// The split (default `train`), matched against file and folder names.
    pub split: Option<&'a str>,
    /// A file or folder of the repository, read instead of a split's files.
    pub within: Option<&'a str>,
}

/// The data files of `id` the selection names, as paths in the repository, without fetching
/// any data (what `--dry-run` shows). Offline, or with the hub unreachable, they come from the
/// cache's snapshot.
pub fn list(id: &HubId, selection: Selection, settings: &HubSettings) -> Result<Vec<String>> {
    match remote_info(id, settings)? {
        Some(info) => select(id, &file_names(&info), selection),
        None => Ok(cached(id, selection, settings)?.0),
    }
}

fn file_names(info: &RepoInfo) -> Vec<String> {
    info.siblings.iter().map(|s| s.rfilename.clone()).collect()
}

/// The selected data files of `id` in the Hugging Face cache, downloaded if needed, in
/// repository path order.
pub fn fetch(id: &HubId, selection: Selection, settings: &HubSettings) -> Result<Vec<PathBuf>> {
    let Some(info) = remote_info(id, settings)? else {
        let (names, snapshot) = cached(id, selection, settings)?;
        return Ok(names.iter().map(|name| snapshot.join(name)).collect());
    };
    if !http::is_lower_hex(&info.sha, 40) {
        bail!(
            "dataset {id}: the hub named commit {:?}, expected 40 hex digits; refused",
            info.sha
        );
    }
    let names = select(id, &file_names(&info), selection)?;
    let agent = http::agent(settings.timeout);
    let mut paths = Vec::with_capacity(names.len());
    for name in &names {
        let sibling = info
            .siblings
            .iter()
            .find(|s| &s.rfilename == name)
            .context("a selected file is among the listed ones")?;
        // Every file comes from the commit the metadata named, checked against its listed size
        // (and SHA-256 for LFS files), as for models.
        let path = fetch_file(&agent, id, RepoKind::Dataset, settings, &info.sha, sibling)
            .map_err(|err| match err.downcast::<ureq::Transport>() {
                Ok(transport) => anyhow!(unreachable(
                    id,
                    settings,
                    &http::one_line(&transport.to_string())
                )),
                Err(err) => anyhow!(
                    "dataset {id}: downloading {name}: {}",
                    http::one_line(&format!("{err:#}"))
                ),
            })?;
        paths.push(path);
    }
    record_ref(id, RepoKind::Dataset, settings, &info.sha)
        .with_context(|| format!("dataset {id}"))?;
    Ok(paths)
}

/// The repository's commit and files (with sizes and hashes) from the hub; `None` where the
/// cache must do (offline, or the hub unreachable).
fn remote_info(id: &HubId, settings: &HubSettings) -> Result<Option<RepoInfo>> {
    if settings.offline {
        return Ok(None);
    }
    let agent = http::agent(settings.timeout);
    match repo_info(&agent, id, RepoKind::Dataset, settings) {
        Ok(info) => Ok(Some(info)),
        Err(InfoError::Unreachable(reason)) => {
            tracing::warn!("the Hugging Face hub is unreachable ({reason}); looking for the dataset {id} in the cache");
            Ok(None)
        }
        Err(InfoError::Other(err)) => Err(err.context(format!("dataset {id}"))),
    }
}

/// The selection's files in the cached snapshot of `id`, and the snapshot directory.
fn cached(
    id: &HubId,
    selection: Selection,
    settings: &HubSettings,
) -> Result<(Vec<String>, PathBuf)> {
    let snapshot = snapshot_dir(id, RepoKind::Dataset, settings).map_err(|e| {
        anyhow!(
            "dataset {e:#}{}",
            if settings.offline {
                " and HF_HUB_OFFLINE is set, so nothing is downloaded"
            } else {
                ""
            }
        )
    })?;
    let mut files = Vec::new();
    walk(&snapshot, &snapshot, &mut files)?;
    Ok((select(id, &files, selection)?, snapshot))
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.is_dir() {
            walk(root, &path, files)?;
        } else if let Ok(relative) = path.strip_prefix(root) {
            files.extend(relative.to_str().map(str::to_owned));
        }
    }
    Ok(())
}

/// The data files of `files` (repository paths) that `selection` names, sorted.
fn select(id: &HubId, files: &[String], selection: Selection) -> Result<Vec<String>> {
    let mut data: Vec<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| {
            Path::new(f)
                .extension()
                .is_some_and(|e| DATA_EXTENSIONS.iter().any(|d| e == *d))
        })
        .collect();
    data.sort_unstable();
    let listing = || {
        let shown: Vec<&str> = data.iter().copied().take(8).collect();
        let more = data.len().saturating_sub(shown.len());
        format!(
            "its data files: {}{}",
            if shown.is_empty() {
                "none".to_string()
            } else {
                shown.join(", ")
            },
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    };
    let chosen: Vec<&str> = if let Some(within) = selection.within {
        let within = within.trim_matches('/');
        let chosen: Vec<&str> = data
            .iter()
            .copied()
            .filter(|f| *f == within || f.starts_with(&format!("{within}/")))
            .collect();
        if chosen.is_empty() {
            bail!(
                "dataset {id}: no {} file at or under `{within}` ({})",
                DATA_EXTENSIONS.join("/"),
                listing()
            );
        }
        chosen
    } else {
        let split = selection.split.unwrap_or("train");
        let chosen: Vec<&str> = data
            .iter()
            .copied()
            .filter(|f| names_split(f, split))
            .collect();
        let unsplit = !data
            .iter()
            .any(|f| KNOWN_SPLITS.iter().any(|s| names_split(f, s)));
        match (chosen.is_empty(), unsplit && split == "train") {
            (false, _) => chosen,
            (true, true) if !data.is_empty() => data.clone(),
            _ => bail!(
                "dataset {id}: no data files for split `{split}` (give `split` or `path`; {})",
                listing()
            ),
        }
    };
    Ok(chosen.into_iter().map(str::to_owned).collect())
}

/// Whether a repository path names `split`: a folder called so, or a file name that is the
/// split or starts with it followed by `-`, `_` or `.` (`train-00000-of-00002.parquet`).
fn names_split(file: &str, split: &str) -> bool {
    file.split('/').any(|part| {
        part == split
            || part
                .strip_prefix(split)
                .is_some_and(|rest| rest.starts_with(['-', '_', '.']))
    })
}

fn unreachable(id: &HubId, settings: &HubSettings, reason: &str) -> String {
    format!(
        "could not reach the Hugging Face hub at {} to fetch the dataset {id} ({reason}); \
         download its files and give their local `path` instead",
        settings.endpoint
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> HubId {
        HubId::parse("org/data").unwrap()
    }

    fn pick(files: &[&str], split: Option<&str>, within: Option<&str>) -> Result<Vec<String>> {
        let files: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        select(&id(), &files, Selection { split, within })
    }

    #[test]
    fn splits_follow_the_hubs_file_names() {
        let files = [
            "README.md",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "trainer_notes.json",
        ];
        assert_eq!(
            pick(&files, None, None).unwrap(),
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ]
        );
        assert_eq!(
            pick(&files, Some("test"), None).unwrap(),
            ["data/test-00000-of-00001.parquet"]
        );
        let err = pick(&files, Some("validation"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/data") && err.contains("`validation`") && err.contains("data/test-"),
            "{err}"
        );
        // One file that names no split is the train split.
        assert_eq!(
            pick(&["alpaca_data_cleaned.json", "README.md"], None, None).unwrap(),
            ["alpaca_data_cleaned.json"]
        );
        assert_eq!(
            pick(&files, None, Some("trainer_notes.json")).unwrap(),
            ["trainer_notes.json"]
        );
        let err = pick(&files, None, Some("other")).unwrap_err().to_string();
        assert!(err.contains("`other`"), "{err}");
    }
}
