//! Paths that files we do not control name (a checkpoint's index, a corpus manifest): only
//! relative paths made of plain names are followed, so an entry cannot reach outside its
//! directory with `..`, an absolute path or a drive prefix.
use anyhow::{bail, Result};
use std::path::{Component, Path, PathBuf};

/// `base/entry`, or an error saying why `entry` is refused (the caller names the file and the
/// entry's place in it).
pub fn join_inside(base: &Path, entry: &str) -> Result<PathBuf> {
    let path = Path::new(entry);
    if entry.is_empty() {
        bail!("an empty path");
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => bail!("{entry:?} leaves its directory (`..`)"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("{entry:?} is absolute, expected a path relative to its directory")
            }
        }
    }
    Ok(base.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_join_and_others_are_refused() {
        let base = Path::new("/data/model");
        assert_eq!(
            join_inside(base, "shards/s1.safetensors").unwrap(),
            base.join("shards/s1.safetensors")
        );
        assert_eq!(join_inside(base, "./a").unwrap(), base.join("a"));
        for (bad, why) in [
            ("", "empty"),
            ("../x", "leaves"),
            ("a/../../x", "leaves"),
            ("/etc/passwd", "absolute"),
        ] {
            let e = join_inside(base, bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
