//! The merged model's weights as Hugging Face safetensors: one `model.safetensors`, or shards
//! `model-00001-of-0000N.safetensors` of at most `max_shard_bytes` each (a larger tensor gets a
//! shard of its own) with `model.safetensors.index.json`.
use super::tensor_file::{self, HostTensor};
use anyhow::{ensure, Result};
use linearize_models::atomic;
use linearize_models::weights::{INDEX_FILE, SINGLE_FILE};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// A tensor to write: its name and a function producing its value (so a shard's tensors are
/// materialised only while that shard is written).
pub(crate) struct Entry<'a> {
    pub name: String,
    pub shape: Vec<i64>,
    pub value: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

/// Groups `entries` (in order) into shards of at most `max_bytes` in `kind`.
fn plan(entries: &[Entry], kind: Kind, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, entry) in entries.iter().enumerate() {
        let bytes = entry.shape.iter().product::<i64>() as u64 * kind.elt_size_in_bytes() as u64;
        match shards.last_mut() {
            Some(shard) if size + bytes <= max_bytes => {
                shard.push(i);
                size += bytes;
            }
            _ => {
                shards.push(vec![i]);
                size = bytes;
            }
        }
    }
    shards
}

/// Writes `entries` in `kind` into `dir`. Returns the number of files written (1 when unsharded).
pub(crate) fn write_shards(
    dir: &Path,
    entries: &[Entry],
    kind: Kind,
    max_bytes: u64,
) -> Result<usize> {
    ensure!(max_bytes > 0, "max_shard_bytes must be > 0");
    ensure!(!entries.is_empty(), "no tensors to export");
    let shards = plan(entries, kind, max_bytes);
    let metadata = || BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (index, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", index + 1)
        };
        let tensors = shard
            .iter()
            .map(|&i| {
                // The directory is built under a temporary name: a stop leaves nothing behind.
                linearize_models::stop::check()?;
                let entry = &entries[i];
                let host = HostTensor::new(&entry.name, &(entry.value)()?, kind)?;
                total_size += host.num_bytes();
                weight_map.insert(entry.name.clone(), file.clone());
                Ok((entry.name.clone(), host))
            })
            .collect::<Result<Vec<_>>>()?;
        tensor_file::write(&dir.join(&file), &tensors, metadata())?;
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
        atomic::write_file(
            &dir.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    }
    Ok(count)
}
