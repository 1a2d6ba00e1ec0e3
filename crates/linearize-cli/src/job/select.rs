//! The recipe's measured selections (`conversion.softmax_heads`, `conversion.softmax_layers_by`
//! and `softmax_by_error`): made once, by rank 0, into `<run>/selection.json`, which every rank
//! then reads; a resumed run reuses what the file holds instead of measuring again (see
//! linearize_train::selection).
use anyhow::{bail, Context, Result};
use linearize_dist::ProcessGroup;
use linearize_eval::retrieval_heads::{retrieval_heads, RetrievalHeadsConfig};
use linearize_models::llama::Model;
use linearize_models::tokenizer::Tokenizer;
use linearize_train::convert::{ConversionConfig, ConvertedLayers};
use linearize_train::data::PackedSequences;
use linearize_train::selection::{
    head_kl_drops, layer_kl_drops, top_heads, top_kv_groups, top_layers, HeadChoice, HeadScore,
    HeadScoring, HeadUnit, KlProbe, LayerChoice, LayerScore, LayerScoring, Selection,
};
use std::path::Path;

/// The teacher's retrieval score of every head, [layer][head], when the recipe chooses heads by
/// retrieval and the run has not chosen them yet. Runs on the unconverted model (the probes
/// need the teacher's own hidden states), on rank 0.
pub(super) fn retrieval_scores(
    model: &mut Model,
    tokenizer: &Tokenizer,
    conversion: &ConversionConfig,
    seed: u64,
    run_dir: &Path,
    group: &ProcessGroup,
) -> Result<Option<Vec<Vec<f64>>>> {
    let Some(selector) = &conversion.softmax_heads else {
        return Ok(None);
    };
    if selector.by != HeadScoring::Retrieval
        || !group.is_main()
        || Selection::read(run_dir)?.softmax_heads.is_some()
    {
        return Ok(None);
    }
    tracing::info!("scoring the teacher's heads on retrieval probes (conversion.softmax_heads)");
    let report = retrieval_heads(model, tokenizer, &RetrievalHeadsConfig::default(), seed)
        .context("conversion.softmax_heads: scoring the teacher's retrieval heads")?;
    Ok(Some(report.scores))
}

/// Makes the retrieval-chosen heads softmax heads: chosen now from `scores` among the converted
/// layers' heads, or read back from `selection.json`.
pub(super) fn heads_by_retrieval(
    model: &mut Model,
    converted: &mut ConvertedLayers,
    conversion: &ConversionConfig,
    scores: Option<Vec<Vec<f64>>>,
    run_dir: &Path,
    group: &ProcessGroup,
) -> Result<()> {
    match &conversion.softmax_heads {
        Some(s) if s.by == HeadScoring::Retrieval => {}
        _ => return Ok(()),
    }
    choose_heads(
        model,
        converted,
        conversion,
        run_dir,
        group,
        |_, converted| {
            let scores = scores.context("rank 0 has no retrieval scores to choose heads by")?;
            Ok(converted_head_scores(converted, |layer, head| {
                scores[layer][head]
            }))
        },
    )
}

/// After attention transfer: the layers given back to softmax, then the heads chosen by KL.
#[allow(clippy::too_many_arguments)]
pub(super) fn after_stage1(
    model: &mut Model,
    converted: &mut ConvertedLayers,
    conversion: &ConversionConfig,
    mse: impl FnOnce() -> Result<Vec<(usize, f64)>>,
    val: Option<&PackedSequences>,
    eval_batch_size: usize,
    run_dir: &Path,
    group: &ProcessGroup,
) -> Result<()> {
    if let Some(selector) = conversion.layer_selector() {
        let key = match conversion.softmax_by_error {
            Some(_) => "softmax_by_error",
            None => "softmax_layers_by",
        };
        let choice = agreed(
            run_dir,
            group,
            |s| s.softmax_layers,
            |selection| {
                let scores = match selector.by {
                    LayerScoring::Mse => mse()?
                        .into_iter()
                        .map(|(layer, score)| LayerScore { layer, score })
                        .collect(),
                    LayerScoring::Kl => {
                        let val = needs_val(val, key)?;
                        let probe = KlProbe::new(
                            model,
                            converted,
                            val,
                            selector.kl_batches(),
                            eval_batch_size,
                        )?;
                        let (base, scores) = layer_kl_drops(model, converted, &probe)?;
                        tracing::info!(
                            kl = base,
                            "KL of the converted model before choosing layers"
                        );
                        scores
                    }
                };
                let chosen = top_layers(&scores, selector.count)
                    .with_context(|| format!("conversion.{key}"))?;
                selection.softmax_layers = Some(LayerChoice {
                    by: selector.by,
                    count: selector.count,
                    scores,
                    chosen,
                });
                Ok(())
            },
        )?;
        choice.check(&selector)?;
        tracing::info!(layers = ?choice.chosen, by = ?choice.by, "layers chosen to go back to softmax");
        converted.revert_to_softmax(model, &choice.chosen)?;
    }
    match &conversion.softmax_heads {
        Some(s) if s.by == HeadScoring::Kl => {}
        _ => return Ok(()),
    }
    choose_heads(
        model,
        converted,
        conversion,
        run_dir,
        group,
        |model, converted| {
            let selector = conversion
                .softmax_heads
                .as_ref()
                .context("no head selector")?;
            let val = needs_val(val, "softmax_heads")?;
            let probe = KlProbe::new(
                model,
                converted,
                val,
                selector.kl_batches(),
                eval_batch_size,
            )?;
            let (base, scores) = head_kl_drops(model, converted, &probe)?;
            tracing::info!(kl = base, "KL of the converted model before choosing heads");
            Ok(scores)
        },
    )
}

fn needs_val<'a>(val: Option<&'a PackedSequences>, key: &str) -> Result<&'a PackedSequences> {
    match val {
        Some(val) if !val.is_empty() => Ok(val),
        _ => bail!(
            "conversion.{key}: `by: kl` measures KL on validation sequences, and the data has none \
             (give data.val_sources or a validation split)"
        ),
    }
}

/// The score of every query head of the converted layers that is not softmax already.
fn converted_head_scores(
    converted: &ConvertedLayers,
    score: impl Fn(usize, usize) -> f64,
) -> Vec<HeadScore> {
    converted
        .head_candidates()
        .into_iter()
        .map(|(layer, head)| HeadScore {
            layer,
            head,
            score: score(layer, head),
        })
        .collect()
}

/// The heads `conversion.softmax_heads` asks for, scored by `measure` and chosen unless the run
/// chose them already, made softmax heads.
fn choose_heads(
    model: &mut Model,
    converted: &mut ConvertedLayers,
    conversion: &ConversionConfig,
    run_dir: &Path,
    group: &ProcessGroup,
    measure: impl FnOnce(&mut Model, &ConvertedLayers) -> Result<Vec<HeadScore>>,
) -> Result<()> {
    let selector = conversion
        .softmax_heads
        .as_ref()
        .context("no head selector")?;
    let cfg = model.config();
    // Query heads per key/value head.
    let per_kv = (cfg.num_attention_heads / cfg.num_key_value_heads) as usize;
    let unit = selector.unit();
    let (per_layer, candidates) = match unit {
        HeadUnit::QueryHeads => (
            cfg.num_attention_heads as usize,
            converted.head_candidates().len(),
        ),
        HeadUnit::KvHeads => {
            let mut groups: Vec<(usize, usize)> = converted
                .head_candidates()
                .into_iter()
                .map(|(layer, head)| (layer, head / per_kv))
                .collect();
            groups.dedup();
            (cfg.num_key_value_heads as usize, groups.len())
        }
    };
    let total = model.num_layers() * per_layer;
    let total_kv = model.num_layers() * cfg.num_key_value_heads as usize;
    let count = selector.count_of(total, candidates)?;
    let choice = agreed(
        run_dir,
        group,
        |s| s.softmax_heads,
        |selection| {
            let scores = measure(model, converted)?;
            let chosen = match unit {
                HeadUnit::QueryHeads => top_heads(&scores, count),
                HeadUnit::KvHeads => top_kv_groups(&scores, count, per_kv),
            }
            .context("conversion.softmax_heads")?;
            selection.softmax_heads = Some(HeadChoice {
                by: selector.by,
                unit,
                count,
                scores,
                chosen,
            });
            Ok(())
        },
    )?;
    choice.check(selector.by, unit, count)?;
    let query_heads: usize = choice.chosen.values().map(Vec::len).sum();
    let kv_heads = choice.kv_heads(per_kv);
    tracing::info!(
        "{query_heads} query heads keep softmax ({count} {unit:?} by {:?}), their KV cache holds \
         {kv_heads} of the teacher's {total_kv} key/value heads ({:.1}%); layer.head (score): {}",
        choice.by,
        100.0 * kv_heads as f64 / total_kv as f64,
        choice.describe()
    );
    converted.set_softmax_heads(model, &choice.chosen)
}

/// One part of `selection.json`, as every rank uses it: rank 0 makes it (`make` fills it into
/// the selection) and writes the file when the run has not made it yet; the others wait for
/// rank 0 and read the file (the run directory is on a filesystem every rank sees).
fn agreed<T>(
    run_dir: &Path,
    group: &ProcessGroup,
    part: impl Fn(Selection) -> Option<T>,
    make: impl FnOnce(&mut Selection) -> Result<()>,
) -> Result<T> {
    if group.is_main() {
        let mut selection = Selection::read(run_dir)?;
        if part(selection.clone()).is_none() {
            make(&mut selection)?;
            selection.write(run_dir)?;
        }
    }
    group.barrier("waiting for rank 0 to write selection.json")?;
    let path = Selection::path(run_dir);
    part(Selection::read(run_dir)?)
        .with_context(|| format!("{}: rank 0 wrote no such selection", path.display()))
}
