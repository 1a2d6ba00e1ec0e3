//! Parsing a GGUF file (versions 2 and 3, little-endian): header, metadata, tensor infos, and
//! memory-mapped tensor data.
use super::dequant::dequantize;
use super::ggml_type::GgmlType;
use super::value::Value;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// One tensor's entry in the file's tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the length of a row (the fastest-varying axis).
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    pub fn n_bytes(&self) -> u64 {
        self.n_elements() / self.ty.block_size() as u64 * self.ty.type_size() as u64
    }

    /// Row-major (PyTorch / safetensors) shape: the ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: parsed metadata and tensor table over a memory map of the whole file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

impl GgufFile {
    /// Opens and validates `path`: every tensor's data must lie inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len == 0 {
            bail!("{}: empty file, expected a GGUF model", path.display());
        }
        // SAFETY: the map is read-only; like every GGUF reader we assume the file is not
        // truncated or rewritten by another process while it is open.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping {}", path.display()))?;
        let (version, metadata, tensors, data_start) =
            parse(&mmap).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (possibly quantised) bytes of `tensor`.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> &[u8] {
        let start = self.data_start + tensor.offset as usize;
        &self.mmap[start..start + tensor.n_bytes() as usize]
    }

    /// `tensor` decoded to f32, in row-major order.
    pub fn dequantize(&self, tensor: &TensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; tensor.n_elements() as usize];
        dequantize(tensor.ty, self.tensor_data(tensor), &mut out)
            .with_context(|| format!("{}: decoding tensor {}", self.path.display(), tensor.name))?;
        Ok(out)
    }

    /// Hex SHA-256 of the whole file.
    pub fn sha256(&self) -> String {
        let digest = Sha256::digest(&self.mmap[..]);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(value) => convert(value).map(Some).ok_or_else(|| {
                anyhow!(
                    "{}: metadata key {key} holds a {} ({}), expected {expected}",
                    self.path.display(),
                    value.type_name(),
                    preview(value)
                )
            }),
        }
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| anyhow!("{}: missing metadata key {key}", self.path.display()))
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.get_u64(key)?;
        self.required(key, v)
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a float", Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        let v = self.get_str(key)?;
        self.required(key, v)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[Value]>> {
        self.typed(key, "an array", Value::as_array)
    }

    /// An array whose every element converts with `convert`.
    pub fn get_array_of<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.get_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).ok_or_else(|| {
                    anyhow!(
                        "{}: metadata key {key}[{i}] holds a {} ({}), expected {expected}",
                        self.path.display(),
                        item.type_name(),
                        preview(item)
                    )
                })
            })
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str> {
        self.require_str("general.architecture")
    }
}

fn preview(value: &Value) -> String {
    match value {
        Value::Array(items) => format!("{} items", items.len()),
        Value::String(s) if s.chars().count() > 40 => {
            format!("{:?}...", s.chars().take(40).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<TensorInfo>, usize);

fn parse(buf: &[u8]) -> Result<Parsed> {
    let mut cur = Cursor { buf, pos: 0 };
    let magic = cur.take(4, "the magic number")?;
    if magic != MAGIC {
        bail!(
            "not a GGUF file: starts with {:?}, expected {:?}",
            String::from_utf8_lossy(magic),
            String::from_utf8_lossy(MAGIC)
        );
    }
    let version = cur.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 (pre-August 2023) is not supported; re-convert with llama.cpp"),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            bail!(
                "big-endian GGUF (version {}) is not supported",
                v.swap_bytes()
            )
        }
        v => bail!("unsupported GGUF version {v} (supported: 2, 3)"),
    }
    let n_tensors = cur.u64("the tensor count")?;
    let n_kv = cur.u64("the metadata count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = cur.string(|| format!("the key of metadata entry {i}"))?;
        let ty = cur.u32(&format!("the type of metadata key {key}"))?;
        let value = cur.value(ty, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("metadata key {key} appears twice");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => bail!("general.alignment must be a power of two, found {v:?}"),
        },
    };

    let mut tensors = Vec::new();
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = cur.string(|| format!("the name of tensor {i}"))?;
        // A second tensor of one name would be written twice, or one of them silently dropped.
        if !names.insert(name.clone()) {
            bail!("tensor {name} appears twice in the tensor table");
        }
        let n_dims = cur.u32(&format!("the rank of tensor {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("tensor {name} has {n_dims} dimensions, expected 1 to {MAX_DIMS}");
        }
        let dims = (0..n_dims)
            .map(|_| cur.u64(&format!("the shape of tensor {name}")))
            .collect::<Result<Vec<_>>>()?;
        let type_id = cur.u32(&format!("the type of tensor {name}"))?;
        let ty = GgmlType::from_id(type_id)
            .ok_or_else(|| anyhow!("tensor {name} has unknown ggml type id {type_id}"))?;
        let offset = cur.u64(&format!("the data offset of tensor {name}"))?;
        if dims[0] % ty.block_size() as u64 != 0 {
            bail!(
                "tensor {name}: row length {} is not a multiple of the {ty} block size {}",
                dims[0],
                ty.block_size()
            );
        }
        if offset % alignment != 0 {
            bail!("tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}");
        }
        let n_elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if n_elements.is_none_or(|n| n.checked_mul(ty.type_size() as u64).is_none()) {
            bail!("tensor {name}: shape {dims:?} overflows");
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
        });
    }

    // Offsets and sizes come from the file: every sum is checked, as a wrapped one would pass
    // the bounds check and point the tensor at the header.
    let data_start = (cur.pos as u64).next_multiple_of(alignment);
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|start| start.checked_add(t.n_bytes()))
            .ok_or_else(|| {
                anyhow!(
                    "tensor {}: data offset {} plus its {} bytes overflows (the file has {file_len} bytes)",
                    t.name,
                    t.offset,
                    t.n_bytes()
                )
            })?;
        if end > file_len {
            bail!(
                "truncated: tensor {} ({} {:?}) ends at byte {end} but the file has {file_len} bytes",
                t.name,
                t.ty,
                t.dims
            );
        }
    }
    Ok((version, metadata, tensors, data_start as usize))
}

/// Reads little-endian values; every read names what it was reading when the file ends early.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            bail!(
                "truncated: file ends at byte {} while reading {what} ({n} bytes needed at byte {})",
                self.buf.len(),
                self.pos
            );
        }
        let bytes = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String> {
        let len = self.u64(&what())?;
        let bytes = self.take(len, &what())?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{} is not valid UTF-8", what()))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<Value> {
        let what = || format!("the value of metadata key {key}");
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(&what())?)),
            1 => Value::I8(i8::from_le_bytes(self.array(&what())?)),
            2 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("metadata key {key}: bool byte is {b}, expected 0 or 1"),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                let elem_ty = self.u32(&what())?;
                if elem_ty == 9 {
                    bail!("metadata key {key}: nested arrays are not supported");
                }
                let n = self.u64(&what())?;
                // Every element takes at least one byte: a count beyond the bytes left is a
                // damaged or truncated file, not a reason to reserve huge memory.
                let left = (self.buf.len() - self.pos) as u64;
                if n > left {
                    bail!(
                        "truncated: metadata key {key} claims {n} array items but only {left} bytes remain"
                    );
                }
                let items = (0..n)
                    .map(|_| self.value(elem_ty, key))
                    .collect::<Result<Vec<_>>>()?;
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
            other => bail!("metadata key {key} has unknown value type {other}"),
        })
    }
}
