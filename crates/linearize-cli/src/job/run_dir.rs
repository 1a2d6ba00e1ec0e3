//! The run directory of a job: created with `recipe.resolved.yaml` on the first run, checked
//! against the recipe on every later one (a changed recipe refuses to resume), moved aside on
//! `--restart`; held under an exclusive lock for the life of the process that runs it.
use crate::recipe::{ensure_unchanged, LoadedRecipe};
use anyhow::{bail, Context, Result};
use fs4::fs_std::FileExt;
use linearize_models::atomic;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const RESOLVED_RECIPE: &str = "recipe.resolved.yaml";
/// The lock file of a run directory; it holds the pid of the process that owns the run.
const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run directory, released when dropped (or when the process dies, so a
/// killed job never leaves the directory locked). Two processes writing one run directory would
/// prune each other's states and temporary files.
pub struct RunLock {
    file: File,
    dir: PathBuf,
}

impl RunLock {
    /// Creates `run_dir` if needed and locks it; fails at once if another process holds it.
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating run directory {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !file
            .try_lock_exclusive()
            .with_context(|| format!("locking {}", path.display()))?
        {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            bail!(
                "run directory {} in use by pid {}",
                run_dir.display(),
                if holder.is_empty() { "?" } else { holder }
            );
        }
        let record = |file: &mut File| {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()
        };
        record(&mut file).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            file,
            dir: run_dir.to_path_buf(),
        })
    }

    /// Removes what writers of this run left unfinished: `stages/*.partial` files. Only the
    /// holder of the lock may do this, as no other writer can be alive then.
    pub fn clean_partial_files(&self) -> Result<()> {
        let stages = self.dir.join("stages");
        let Ok(entries) = std::fs::read_dir(&stages) else {
            return Ok(());
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "partial") {
                tracing::warn!(file = %path.display(), "removing the leftover of an interrupted write");
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.file);
    }
}

/// Whether the run directory held an earlier attempt of the same recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStart {
    Fresh,
    Existing,
}

/// Makes `run_dir` ready for `recipe`: a new directory gets the resolved recipe; an existing
/// one must hold the same resolved recipe (else the error lists the changed keys), unless
/// `restart`, which renames it to `<run>.restarted-<unix time>` and starts fresh (taking `lock`
/// over to the new directory).
pub fn prepare(
    run_dir: &Path,
    recipe: &LoadedRecipe,
    restart: bool,
    lock: &mut RunLock,
) -> Result<RunStart> {
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
            *lock = RunLock::acquire(run_dir)?;
        } else {
            let old = std::fs::read_to_string(&resolved_path)
                .with_context(|| format!("reading {}", resolved_path.display()))?;
            ensure_unchanged(run_dir, &old, &recipe.resolved)?;
            return Ok(RunStart::Existing);
        }
    } else if std::fs::read_dir(run_dir)
        .with_context(|| format!("listing {}", run_dir.display()))?
        .any(|e| e.map_or(true, |e| e.file_name() != LOCK_FILE))
    {
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
