//! `SHA256SUMS` of a state directory, in the format `sha256sum -c` reads, so a user can check a
//! state by hand too.
use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::Path;

pub(super) const SUMS: &str = "SHA256SUMS";

/// Hashes every other file of `dir` and writes the list.
pub(super) fn write(dir: &Path) -> Result<()> {
    let mut sums = String::new();
    for name in file_names(dir)? {
        sums.push_str(&format!("{}  {name}\n", sha256_file(&dir.join(&name))?));
    }
    fs::write(dir.join(SUMS), sums).with_context(|| format!("writing {SUMS} in {}", dir.display()))
}

/// Checks that `dir` holds exactly the files its list names, each with its recorded hash.
pub(super) fn verify(dir: &Path) -> Result<()> {
    let sums = fs::read_to_string(dir.join(SUMS)).with_context(|| format!("reading {SUMS}"))?;
    let mut listed = BTreeSet::new();
    for (index, line) in sums.lines().enumerate() {
        let Some((expected, name)) = line.split_once("  ") else {
            bail!("{SUMS} line {} is not '<sha256>  <file>'", index + 1);
        };
        ensure!(
            !name.contains('/') && listed.insert(name.to_owned()),
            "{SUMS} line {} names '{name}' twice or outside the directory",
            index + 1
        );
        let actual = sha256_file(&dir.join(name))?;
        ensure!(actual == expected, "checksum mismatch for {name}");
    }
    let present: BTreeSet<String> = file_names(dir)?.into_iter().collect();
    if let Some(extra) = present.difference(&listed).next() {
        bail!("{extra} is not listed in {SUMS}");
    }
    Ok(())
}

/// Lowercase hex SHA-256 of a file's content.
pub(super) fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Names of the files of `dir` other than the list itself, sorted.
fn file_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != SUMS {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}
