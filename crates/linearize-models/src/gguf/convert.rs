//! `import`: a llama-architecture GGUF file -> a transformers-layout model directory.
use super::hparams::LlamaHparams;
use super::reader::GgufFile;
use super::tensor_map::{unpermute_rows, MappedTensor, TensorMap};
use super::tokenizer;
use crate::atomic::AtomicDir;
use anyhow::{anyhow, bail, Context, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use safetensors::tensor::View;
use serde_json::json;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

/// Provenance file an import writes next to the model; its presence marks a directory that a
/// later import may replace.
pub const IMPORT_RECORD: &str = "import.json";
/// Bumped whenever the importer's output changes, so caches of older imports are redone.
pub const IMPORT_FORMAT_VERSION: u64 = 1;

/// The dtype imported weights are written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    #[default]
    F32,
    BF16,
    F16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::BF16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// transformers' `torch_dtype` spelling.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::BF16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::BF16 => safetensors::Dtype::BF16,
            Dtype::F16 => safetensors::Dtype::F16,
        }
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
        }
    }
}

impl FromStr for Dtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::BF16),
            "f16" | "float16" => Ok(Dtype::F16),
            other => bail!("dtype {other:?}: expected f32, bf16 or f16"),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an import wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub dtype: Dtype,
    pub tensors: usize,
    pub parameters: u64,
    /// Count of source tensors per ggml type, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}.
    pub source_types: BTreeMap<String, usize>,
    pub seconds: f64,
}

/// Converts the llama-architecture GGUF `file` into `out_dir`: config.json,
/// generation_config.json, model.safetensors (weights dequantised to `dtype`, Q/K rows in
/// transformers' RoPE order), tokenizer.json, tokenizer_config.json and import.json. The
/// directory appears complete or not at all; an existing one is replaced only if an earlier
/// import wrote it.
pub fn import(file: &Path, out_dir: &Path, dtype: Dtype) -> Result<ImportSummary> {
    let start = Instant::now();
    let gguf = GgufFile::open(file)?;
    let hp = LlamaHparams::from_gguf(&gguf)?;
    let map = TensorMap::new(&gguf, &hp)?;
    for t in &map.tensors {
        if !t.source.ty.can_dequantize() {
            bail!(
                "{}: tensor {} has type {}, which cannot be decoded (supported: {})",
                file.display(),
                t.source.name,
                t.source.ty,
                super::DEQUANTIZABLE
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let tok = tokenizer::convert(&gguf)?;
    let n_tokens = tok.tokenizer.get_vocab_size(true);
    if n_tokens > hp.vocab_size {
        bail!(
            "{}: the vocabulary has {n_tokens} tokens but the embedding only {} rows",
            file.display(),
            hp.vocab_size
        );
    }
    check_replaceable(out_dir)?;

    let mut source_types = BTreeMap::new();
    for t in gguf.tensors() {
        *source_types.entry(t.ty.name().to_owned()).or_insert(0) += 1;
    }
    tracing::info!(
        "importing {} ({} tensors: {}) into {} as {dtype}",
        file.display(),
        gguf.tensors().len(),
        source_types
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        out_dir.display()
    );

    let dir = AtomicDir::new(out_dir)?;
    let write_json = |name: &str, value: &serde_json::Value| -> Result<()> {
        let text = serde_json::to_string_pretty(value)? + "\n";
        std::fs::write(dir.path().join(name), text).with_context(|| format!("writing {name}"))
    };
    write_json(
        "config.json",
        &hp.config_json(&tok, map.tied, map.attention_bias, dtype),
    )?;
    write_json(
        "generation_config.json",
        &LlamaHparams::generation_config_json(&tok),
    )?;
    write_json(
        "tokenizer_config.json",
        &tok.tokenizer_config(hp.context_length),
    )?;
    std::fs::write(dir.path().join("tokenizer.json"), tok.tokenizer_json()?)
        .context("writing tokenizer.json")?;
    write_safetensors(
        &gguf,
        &map.tensors,
        dtype,
        &dir.path().join("model.safetensors"),
    )?;
    write_json(
        IMPORT_RECORD,
        &json!({
            "format_version": IMPORT_FORMAT_VERSION,
            "source": {
                "file": file.file_name().map(|n| n.to_string_lossy()),
                "bytes": std::fs::metadata(file)?.len(),
                "sha256": gguf.sha256(),
                "gguf_version": gguf.version(),
                "tensor_types": source_types,
            },
            "architecture": gguf.architecture()?,
            "dtype": dtype.name(),
        }),
    )?;
    dir.commit()?;

    let summary = ImportSummary {
        out_dir: out_dir.to_path_buf(),
        dtype,
        tensors: map.tensors.len(),
        parameters: map.tensors.iter().map(|t| t.source.n_elements()).sum(),
        source_types,
        seconds: start.elapsed().as_secs_f64(),
    };
    tracing::debug!(
        "imported {} tensors ({:.1}M parameters) in {:.1}s",
        summary.tensors,
        summary.parameters as f64 / 1e6,
        summary.seconds
    );
    Ok(summary)
}

/// Never replace a directory an import did not write (a typo'd `--out .` must not wipe a
/// checkout).
fn check_replaceable(out_dir: &Path) -> Result<()> {
    if !out_dir.exists() {
        return Ok(());
    }
    let empty = std::fs::read_dir(out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .next()
        .is_none();
    if !empty && !out_dir.join(IMPORT_RECORD).is_file() {
        bail!(
            "refusing to replace {}: it exists and holds no {IMPORT_RECORD} from an earlier import",
            out_dir.display()
        );
    }
    Ok(())
}

fn write_safetensors(
    gguf: &GgufFile,
    tensors: &[MappedTensor],
    dtype: Dtype,
    path: &Path,
) -> Result<()> {
    let failure = RefCell::new(None);
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            LazyTensor {
                gguf,
                tensor: t,
                dtype,
                failure: &failure,
            },
        )
    });
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let written = safetensors::serialize_to_file(views, Some(metadata), path);
    if let Some(err) = failure.into_inner() {
        return Err(err);
    }
    written.map_err(|e| anyhow!("writing {}: {e}", path.display()))
}

/// A tensor decoded only when the safetensors writer asks for its bytes, so at most one
/// tensor's f32 values are in memory at a time.
struct LazyTensor<'a> {
    gguf: &'a GgufFile,
    tensor: &'a MappedTensor<'a>,
    dtype: Dtype,
    /// `View::data` cannot fail; the first error lands here and the file is discarded.
    failure: &'a RefCell<Option<anyhow::Error>>,
}

impl LazyTensor<'_> {
    fn bytes(&self) -> Result<Vec<u8>> {
        let t = self.tensor;
        let mut values = self.gguf.dequantize(t.source)?;
        if let Some(n_head) = t.unpermute_heads {
            let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
            values = unpermute_rows(&values, n_head, row_len);
        }
        if t.minus_one {
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        Ok(match self.dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::BF16 => {
                let mut out = vec![bf16::ZERO; values.len()];
                out.convert_from_f32_slice(&values);
                out.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            Dtype::F16 => {
                let mut out = vec![f16::ZERO; values.len()];
                out.convert_from_f32_slice(&values);
                if let Some(i) =
                    (0..values.len()).find(|&i| out[i].is_infinite() && values[i].is_finite())
                {
                    bail!(
                        "tensor {} holds {} at index {i}, beyond f16's range; import as bf16 or f32",
                        t.source.name,
                        values[i]
                    );
                }
                out.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        })
    }
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.tensor.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        if self.failure.borrow().is_some() {
            return Cow::Owned(Vec::new());
        }
        match self.bytes() {
            Ok(bytes) => Cow::Owned(bytes),
            Err(err) => {
                *self.failure.borrow_mut() = Some(err);
                Cow::Owned(Vec::new())
            }
        }
    }

    fn data_len(&self) -> usize {
        self.tensor.shape.iter().product::<usize>() * self.dtype.size()
    }
}
