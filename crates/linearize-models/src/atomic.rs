//! Atomic writes: a reader sees the old file/directory or the complete new one, never a part.
use anyhow::{Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary sibling, fsyncs it, then renames it into place.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_with(path, |file| file.write_all(bytes).map_err(Into::into))
}

/// Like [`write_file`], with the content produced by `fill` into the temporary file.
pub fn write_file_with(path: &Path, fill: impl FnOnce(&mut File) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        fill(&mut file).with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A directory built under a temporary name and renamed into place by [`AtomicDir::commit`];
/// dropped without commit, the partial directory is removed.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    pub fn new(dest: &Path) -> Result<Self> {
        let tmp = temp_sibling(dest);
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the directory's files until [`AtomicDir::commit`].
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Replaces `dest` (if it exists) with the finished directory.
    pub fn commit(mut self) -> Result<()> {
        for entry in fs::read_dir(&self.tmp)? {
            File::open(entry?.path())?.sync_all()?;
        }
        if self.dest.exists() {
            let old = self.dest.with_extension("old.tmp");
            fs::rename(&self.dest, &old)
                .with_context(|| format!("moving aside {}", self.dest.display()))?;
            fs::rename(&self.tmp, &self.dest)
                .with_context(|| format!("renaming into {}", self.dest.display()))?;
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        } else {
            fs::rename(&self.tmp, &self.dest)
                .with_context(|| format!("renaming into {}", self.dest.display()))?;
        }
        self.committed = true;
        sync_parent(&self.dest)
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing directory {}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_is_replaced_whole_and_no_temp_remains() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_file(&path, b"old").unwrap();
        write_file(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_fill_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_file(&path, b"old").unwrap();
        let err = write_file_with(&path, |_| anyhow::bail!("boom")).unwrap_err();
        assert!(format!("{err:#}").contains("boom"));
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn uncommitted_dir_leaves_nothing_and_commit_replaces() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        {
            let d = AtomicDir::new(&dest).unwrap();
            fs::write(d.path().join("x"), b"1").unwrap();
        }
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
        let d = AtomicDir::new(&dest).unwrap();
        fs::write(d.path().join("x"), b"2").unwrap();
        d.commit().unwrap();
        let d = AtomicDir::new(&dest).unwrap();
        fs::write(d.path().join("y"), b"3").unwrap();
        d.commit().unwrap();
        assert!(!dest.join("x").exists());
        assert_eq!(fs::read(dest.join("y")).unwrap(), b"3");
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }
}
