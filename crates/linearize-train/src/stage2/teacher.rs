//! The teacher's final hidden states for the KL loss (its logits are made from them chunk by
//! chunk, [`super::loss::ChunkedLoss`]), computed on the fly in the student's own model: the
//! converted layers get their softmax attention back and the adapters are taken out for one
//! no-grad forward pass, then both are put back. Swapping inside the one model shares every
//! frozen weight between teacher and student; keeping a second teacher model would double the
//! weights in memory to compute the same numbers. The swaps are pointer moves, not copies.
use crate::convert::ConvertedLayers;
use crate::lora::LoraAdapters;
use anyhow::Result;
use linearize_models::llama::Model;
use linearize_models::mixer::SoftmaxMixer;
use tch::Tensor;

/// The original model's final hidden states (b, L, hidden) for `ids` (b, L), without autograd:
/// kept instead of its logits (b, L, V) f32, which for a large vocabulary are many times larger.
/// The model is left with its converted mixers and the adapters (`train` mode) installed, also
/// on error.
pub(super) fn teacher_hidden(
    model: &mut Model,
    converted: &ConvertedLayers,
    lora: &LoraAdapters,
    train: bool,
    ids: &Tensor,
) -> Result<Tensor> {
    let swapped = converted.indices().into_iter().try_for_each(|layer| {
        let window = model.config().layer_window(layer);
        model
            .set_mixer(layer, Box::new(SoftmaxMixer::new(window)))
            .map(drop)
    });
    lora.detach(model);
    let hidden = swapped.and_then(|()| tch::no_grad(|| model.hidden_states(ids, None)));
    let restored = converted
        .install(model)
        .and_then(|()| lora.attach(model, train));
    let hidden = hidden?;
    restored?;
    Ok(hidden)
}
