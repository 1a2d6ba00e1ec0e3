//! The run directory of a job: created with `recipe.resolved.yaml` on the first run, checked
//! against the recipe on every later one (a changed recipe refuses to resume), moved aside on
//! `--restart`.
use crate::recipe::{ensure_unchanged, LoadedRecipe};
use anyhow::{Context, Result};
use linearize_models::atomic;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const RESOLVED_RECIPE: &str = "recipe.resolved.yaml";

/// Whether the run directory held an earlier attempt of the same recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStart {
    Fresh,
    Existing,
}

/// Makes `run_dir` ready for `recipe`: a new directory gets the resolved recipe; an existing
/// one must hold the same resolved recipe (else the error lists the changed keys), unless
/// `restart`, which renames it to `<run>.restarted-<unix time>` and starts fresh.
pub fn prepare(run_dir: &Path, recipe: &LoadedRecipe, restart: bool) -> Result<RunStart> {
    let resolved_path = run_dir.join(RESOLVED_RECIPE);
    if resolved_path.exists() {
        if restart {
            let aside = aside_name(run_dir);
            std::fs::rename(run_dir, &aside).with_context(|| {
                format!(
                    "--restart: moving {} to {}",
                    run_dir.display(),
                    aside.display()
                )
            })?;
            tracing::warn!(old = %aside.display(), "--restart: the previous run was moved aside");
        } else {
            let old = std::fs::read_to_string(&resolved_path)
                .with_context(|| format!("reading {}", resolved_path.display()))?;
            ensure_unchanged(run_dir, &old, &recipe.resolved)?;
            return Ok(RunStart::Existing);
        }
    } else if run_dir.exists() && std::fs::read_dir(run_dir)?.next().is_some() {
        anyhow::bail!(
            "{} exists, is not empty and holds no {RESOLVED_RECIPE}: not a run directory of \
             linearize; choose another `name`/--output or remove it",
            run_dir.display()
        );
    }
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    atomic::write_file(&resolved_path, recipe.resolved.as_bytes())?;
    Ok(RunStart::Fresh)
}

fn aside_name(run_dir: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = run_dir
        .file_name()
        .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    run_dir.with_file_name(format!("{name}.restarted-{secs}"))
}
