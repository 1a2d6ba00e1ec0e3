//! Multimodal Gemma 3 checkpoints (`Gemma3ForConditionalGeneration`, `model_type` `gemma3`) read
//! as their text model: the language model's tensors under the text model's names, the vision
//! tower and its projector left out. Everything downstream (conversion, training, evaluation,
//! export) then sees a gemma3_text model.
use crate::config::ModelConfig;
use crate::weights::Checkpoint;
use anyhow::{bail, Result};
use std::path::Path;

/// (stored prefix, the text model's prefix). transformers 4.57 and 5 save the language model
/// under `language_model.model.` (the original layout, which both convert on loading and back
/// on saving); some checkpoints hold it as transformers 4.52+ keeps it in memory, under
/// `model.language_model.` with the LM head at the top.
const TEXT_PREFIXES: [(&str, &str); 4] = [
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
];

/// The vision tower and the projector of image features into the text model, in both layouts.
const VISION_PREFIXES: [&str; 4] = [
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
];

/// Opens the checkpoint in `dir` under the tensor names of the model of `cfg`: as stored, or for
/// a multimodal config, as [`text_model`].
pub fn open_checkpoint(dir: &Path, cfg: &ModelConfig) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(dir)?;
    if cfg.multimodal {
        text_model(ckpt)
    } else {
        Ok(ckpt)
    }
}

/// The text model of a multimodal Gemma 3 checkpoint: its language model's tensors renamed to a
/// gemma3_text model's, the vision tensors left out (logged). A tensor of neither is an error.
pub fn text_model(ckpt: Checkpoint) -> Result<Checkpoint> {
    let (ckpt, skipped) = ckpt.renamed(
        "the language model of a multimodal gemma3 checkpoint, under `language_model.model.` \
         or `model.language_model.`",
        |name| {
            if let Some((stored, text)) = TEXT_PREFIXES.iter().find(|(p, _)| name.starts_with(p)) {
                return Ok(Some(format!("{text}{}", &name[stored.len()..])));
            }
            if VISION_PREFIXES.iter().any(|p| name.starts_with(p)) {
                return Ok(None);
            }
            bail!(
                "not a tensor of a multimodal gemma3 model: neither its language model's \
                 (language_model.model., model.language_model., lm_head.) nor its vision \
                 tower's (vision_tower., multi_modal_projector.)"
            )
        },
    )?;
    tracing::info!(
        "multimodal gemma3 checkpoint: skipped its {skipped} vision tower and projector tensors; \
         the model and its export are text-only (gemma3_text)"
    );
    Ok(ckpt)
}
