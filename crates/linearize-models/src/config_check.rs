//! config.json's sizes checked against a checkpoint's headers before a model is built: a wrong
//! `num_hidden_layers` or `vocab_size` must be an error naming the key, not an allocation of
//! what the config claims (tens of GB, or a panic inside libtorch).
use crate::config::ModelConfig;
use crate::llama::parameter_shapes;
use crate::weights::{self, Checkpoint, ExtraTensorPolicy};
use anyhow::{bail, Result};
use std::collections::BTreeSet;

/// Fails unless `ckpt` holds the tensors of the model of `cfg`, with their shapes: first the
/// layer count and the sizes each config key sets, each named, then every tensor.
pub fn check_config(cfg: &ModelConfig, ckpt: &Checkpoint, extra: ExtraTensorPolicy) -> Result<()> {
    let layers: BTreeSet<u64> = ckpt
        .names()
        .filter_map(|n| n.strip_prefix("model.layers.")?.split_once('.'))
        .filter_map(|(i, _)| i.parse().ok())
        .collect();
    // Where the keys are in the file: a multimodal model's are its text model's.
    let at = if cfg.multimodal { "text_config." } else { "" };
    if layers.len() as i64 != cfg.num_hidden_layers {
        bail!(
            "config.json: {at}num_hidden_layers = {}, but the checkpoint ({}) holds {} layers",
            cfg.num_hidden_layers,
            describe(ckpt),
            layers.len()
        );
    }
    let q_rows = product(cfg.num_attention_heads, cfg.head_dim, "num_attention_heads")?;
    let kv_rows = product(cfg.num_key_value_heads, cfg.head_dim, "num_key_value_heads")?;
    // (tensor, dimension, its size by the config, the config keys that set it)
    let sizes = [
        ("model.embed_tokens.weight", 0, cfg.vocab_size, "vocab_size"),
        (
            "model.embed_tokens.weight",
            1,
            cfg.hidden_size,
            "hidden_size",
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            0,
            q_rows,
            "num_attention_heads x head_dim",
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            0,
            kv_rows,
            "num_key_value_heads x head_dim",
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            0,
            cfg.intermediate_size,
            "intermediate_size",
        ),
    ];
    for (tensor, dim, size, keys) in sizes {
        let Some(info) = ckpt.info(tensor) else {
            continue; // reported as missing below
        };
        if info.shape.get(dim) != Some(&size) {
            bail!(
                "config.json: {at}{keys} = {size}, but {tensor} in {} has shape {:?}",
                ckpt.file_of(tensor)
                    .map_or_else(String::new, |p| p.display().to_string()),
                info.shape
            );
        }
    }
    // Every size is now one the checkpoint's tensors have: the shapes to expect are as small as
    // the checkpoint.
    weights::check(ckpt, &parameter_shapes(cfg), extra)
}

fn product(heads: i64, head_dim: i64, key: &str) -> Result<i64> {
    match heads.checked_mul(head_dim) {
        Some(rows) => Ok(rows),
        None => bail!("config.json: {key} = {heads} x head_dim = {head_dim} overflows"),
    }
}

fn describe(ckpt: &Checkpoint) -> String {
    match ckpt.files() {
        [one] => one.display().to_string(),
        many => format!("{} files", many.len()),
    }
}
