//! A GGUF v3 file built byte by byte, independent of the reader under test (shared by the GGUF
//! test binaries).
#![allow(dead_code)] // Each test binary uses its own subset of these helpers.
use std::path::{Path, PathBuf};

/// GGUF metadata value types (gguf.md).
pub const U32: u32 = 4;
pub const I32: u32 = 5;
pub const F32: u32 = 6;
pub const BOOL: u32 = 7;
pub const STRING: u32 = 8;
pub const ARRAY: u32 = 9;

pub struct Writer {
    /// (key, value type, value bytes), written in this order.
    pub kv: Vec<(String, u32, Vec<u8>)>,
    /// (name, dims (innermost first, as GGUF stores them), ggml type id, data).
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    pub alignment: usize,
}

impl Writer {
    pub fn new() -> Self {
        Self {
            kv: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    pub fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    pub fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        self.kv.push((key.to_owned(), ty, value.to_vec()));
        self
    }

    pub fn kv_str(self, key: &str, value: &str) -> Self {
        let mut v = Vec::new();
        Self::string(&mut v, value);
        self.kv(key, STRING, &v)
    }

    pub fn kv_u32(self, key: &str, value: u32) -> Self {
        self.kv(key, U32, &value.to_le_bytes())
    }

    pub fn kv_f32(self, key: &str, value: f32) -> Self {
        self.kv(key, F32, &value.to_le_bytes())
    }

    pub fn kv_bool(self, key: &str, value: bool) -> Self {
        self.kv(key, BOOL, &[value as u8])
    }

    /// An array of `ty` values, each already encoded in `items`.
    pub fn kv_array(self, key: &str, ty: u32, items: &[Vec<u8>]) -> Self {
        let mut v = ty.to_le_bytes().to_vec();
        v.extend((items.len() as u64).to_le_bytes());
        for item in items {
            v.extend(item);
        }
        self.kv(key, ARRAY, &v)
    }

    pub fn kv_strings(self, key: &str, values: &[&str]) -> Self {
        let items: Vec<Vec<u8>> = values
            .iter()
            .map(|s| {
                let mut v = Vec::new();
                Self::string(&mut v, s);
                v
            })
            .collect();
        self.kv_array(key, STRING, &items)
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.to_owned(), dims.to_vec(), ty, data));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (key, ty, value) in &self.kv {
            Self::string(&mut out, key);
            out.extend(ty.to_le_bytes());
            out.extend(value);
        }
        let mut offset = 0usize;
        for (name, dims, ty, data) in &self.tensors {
            Self::string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset = (offset + data.len()).next_multiple_of(self.alignment);
        }
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().next_multiple_of(self.alignment), 0);
        }
        out
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}
