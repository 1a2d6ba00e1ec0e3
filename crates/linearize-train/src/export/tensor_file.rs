//! Reading and writing one safetensors file with its string metadata (the models crate's
//! checkpoint reader covers model directories, not a lone `adapters.safetensors`).
use anyhow::{anyhow, bail, Context, Result};
use linearize_models::atomic;
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A tensor's bytes on the host, in the layout safetensors stores.
pub(crate) struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    /// `tensor` converted to `kind`, copied to the host.
    pub fn new(name: &str, tensor: &Tensor, kind: Kind) -> Result<Self> {
        let dtype = match kind {
            Kind::Float => Dtype::F32,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            other => bail!("tensor {name}: cannot export as {other:?} (f32, bf16 or f16)"),
        };
        let host = tch::no_grad(|| {
            tensor
                .f_detach()?
                .f_to_device(Device::Cpu)?
                .f_to_kind(kind)?
                .f_contiguous()
        })
        .with_context(|| format!("copying tensor {name} to the host"))?;
        let mut bytes = vec![0u8; host.numel() * kind.elt_size_in_bytes()];
        host.f_copy_data_u8(&mut bytes, host.numel())
            .with_context(|| format!("reading tensor {name}"))?;
        Ok(Self {
            dtype,
            shape: host.size().iter().map(|&d| d as usize).collect(),
            bytes,
        })
    }

    pub fn num_bytes(&self) -> usize {
        self.bytes.len()
    }
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes `tensors` with `metadata` to `path` atomically. Equal contents give equal bytes (a
/// checksum of an export identifies it): the data is in safetensors' order (by dtype, then
/// name) and the header's keys are sorted.
pub(crate) fn write(
    path: &Path,
    tensors: &[(String, HostTensor)],
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let mut names = BTreeSet::new();
    if let Some((name, _)) = tensors.iter().find(|(name, _)| !names.insert(name)) {
        bail!("{}: tensor {name} would be written twice", path.display());
    }
    let bytes = safetensors::tensor::serialize(
        tensors.iter().map(|(name, t)| (name.as_str(), t)),
        Some(metadata.into_iter().collect()),
    )
    .map_err(|e| anyhow!("serialising {}: {e}", path.display()))?;
    let (header, data) = sorted_header(&bytes)
        .with_context(|| format!("serialising {}: the header", path.display()))?;
    atomic::write_file_with(path, |file| {
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        file.write_all(data).map_err(Into::into)
    })
}

/// The header of serialised safetensors `bytes` with its keys (tensor names and
/// `__metadata__`'s) sorted, padded to 8 bytes as safetensors pads it, and the data after it.
/// safetensors takes the metadata as a `HashMap` and writes it in that map's order, which
/// changes from process to process.
fn sorted_header(bytes: &[u8]) -> Result<(Vec<u8>, &[u8])> {
    let len = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let (header, data) = bytes[8..].split_at(len);
    let mut header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header)?;
    if let Some(metadata) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> = serde_json::from_value(metadata.take())?;
        *metadata = serde_json::to_value(sorted)?;
    }
    let mut text = serde_json::to_vec(&header)?;
    text.resize(text.len().next_multiple_of(8), b' ');
    Ok((text, data))
}

/// A safetensors file read into memory: tensors by name (on the CPU, in their stored dtype) and
/// the string metadata.
pub(crate) struct TensorFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let invalid = |e| {
            anyhow!(
                "{} is not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
        let file = SafeTensors::deserialize(&bytes).map_err(invalid)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::BF16 => Kind::BFloat16,
                Dtype::F16 => Kind::Half,
                other => bail!(
                    "{}: tensor {name} has dtype {other:?}; expected F32, BF16 or F16",
                    path.display()
                ),
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
                .with_context(|| format!("{}: reading tensor {name}", path.display()))?;
            tensors.insert(name, tensor);
        }
        Ok(Self {
            path: path.to_owned(),
            tensors,
            metadata: header.metadata().clone().unwrap_or_default(),
        })
    }

    /// The metadata value `key`; the error names the file.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("{}: no `{key}` in the metadata", self.path.display()))
    }

    /// The metadata value `key` parsed as JSON; the error names the file and key.
    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_str(self.meta(key)?)
            .with_context(|| format!("{}: metadata `{key}`", self.path.display()))
    }

    /// Copies the stored tensors into `targets` (name, destination): every target must be
    /// present with its shape; tensors of the file that no target takes are reported by
    /// [`TensorFile::ensure_all_used`].
    pub fn fill(&self, targets: &[(String, Tensor)]) -> Result<()> {
        for (name, dst) in targets {
            let src = self.tensors.get(name).with_context(|| {
                format!(
                    "{}: missing tensor {name} (shape {:?})",
                    self.path.display(),
                    dst.size()
                )
            })?;
            if src.size() != dst.size() {
                bail!(
                    "{}: tensor {name} has shape {:?}, the model expects {:?}",
                    self.path.display(),
                    src.size(),
                    dst.size()
                );
            }
            tch::no_grad(|| dst.shallow_clone().f_copy_(src))
                .with_context(|| format!("{}: copying tensor {name}", self.path.display()))?;
        }
        Ok(())
    }

    /// Fails naming the first tensor that is not in `used`.
    pub fn ensure_all_used<'a>(&self, used: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let used: std::collections::BTreeSet<&str> = used.into_iter().collect();
        if let Some(name) = self.tensors.keys().find(|n| !used.contains(n.as_str())) {
            bail!(
                "{}: unexpected tensor {name}: the model has no such parameter",
                self.path.display()
            );
        }
        Ok(())
    }
}
