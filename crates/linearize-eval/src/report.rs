//! The whole evaluation of a converted model against its teacher, as one call: [`run_report`]
//! runs every enabled part of an [`EvalConfig`] on both models (same tokenizer, same inputs) and
//! writes `eval.json` (every section, `null` when not run, with the reason in `skipped`),
//! `eval.md` (tables, plots, generations side by side) and PNG plots into the output directory.
//!
//! Every part of the config is optional; the defaults are sized for a CPU. Parts that need
//! files (perplexity texts, multiple-choice tasks) are skipped while none are given. Relative
//! paths are taken from the working directory.
use crate::attention_error::{attention_error, converted_layers, AttentionErrorReport};
use crate::generations::{
    encode_prompt, recurrent_vs_full, side_by_side, DecodeCheck, DecodeCheckConfig,
    GenerationAgreement, GenerationPair, GenerationsConfig,
};
use crate::kl::{kl_report, KlReport};
use crate::multiple_choice::{score_task, McReport, McTask};
use crate::perplexity::WindowOptions;
use crate::plots::{write_png, Panel, Series};
use crate::recall::{
    mqar, mqar_samples, multikey, multikey_prompts, passkey, passkey_prompts, Interval, MqarConfig,
    MqarReport, MultiKeyConfig, MultiKeyReport, PasskeyConfig, PasskeyLength, PasskeyReport,
};
use crate::retrieval_heads::{retrieval_heads, RetrievalHeadsConfig, RetrievalHeadsReport};
use crate::speed::{self, SpeedConfig, SpeedReport};
use crate::training::{read_metrics, StageCurves, StageSummary};
use anyhow::{ensure, Context, Result};
use linearize_models::atomic;
use linearize_models::llama::Model;
use linearize_models::markdown_table::MarkdownTable;
use linearize_models::names::{device_name, dtype_name};
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What to evaluate; every section may be left out (defaults) or turned off (`enabled: false`).
/// A section written as `null` is refused: YAML reads it as an empty mapping, which would run
/// the section with its defaults where the writer most likely meant it off.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Seed of every generated input (recall probes, speed prompts).
    pub seed: u64,
    #[serde(deserialize_with = "section")]
    pub perplexity: PerplexityConfig,
    #[serde(deserialize_with = "section")]
    pub attention_error: AttentionErrorConfig,
    #[serde(deserialize_with = "section")]
    pub passkey: PasskeyConfig,
    #[serde(deserialize_with = "section")]
    pub multikey: MultiKeyConfig,
    #[serde(deserialize_with = "section")]
    pub mqar: MqarConfig,
    #[serde(deserialize_with = "section")]
    pub retrieval_heads: RetrievalHeadsConfig,
    #[serde(deserialize_with = "section")]
    pub multiple_choice: MultipleChoiceConfig,
    #[serde(deserialize_with = "section")]
    pub speed: SpeedConfig,
    #[serde(deserialize_with = "section")]
    pub generations: GenerationsConfig,
    #[serde(deserialize_with = "section")]
    pub decode_check: DecodeCheckConfig,
    /// The ablation of the converted layers' linear part, run by the recipe runner.
    #[serde(deserialize_with = "section")]
    pub window_only: WindowOnlyConfig,
}

/// One section of [`EvalConfig`], refusing `null` (see there).
fn section<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)?.ok_or_else(|| {
        serde::de::Error::custom(
            "a section cannot be null: leave it out for its defaults, or turn it off with `enabled: false`",
        )
    })
}

/// A second perplexity, KL and agreement measurement, with the converted layers' linear part
/// switched off (`LinearizedMixer::window_only`), into `report/window_only/`: how much the
/// student relies on its linear path rather than on its window alone. Off by default; skipped
/// with a note when a converted layer has no window part (`linear`, `liger_gla`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowOnlyConfig {
    pub enabled: bool,
}

impl EvalConfig {
    /// Only the perplexity section of `self` (same files and windows), every other one off.
    pub fn perplexity_only(&self) -> Self {
        let mut cfg = Self {
            seed: self.seed,
            perplexity: self.perplexity.clone(),
            ..Self::default()
        };
        cfg.attention_error.enabled = false;
        cfg.passkey.enabled = false;
        cfg.multikey.enabled = false;
        cfg.mqar.enabled = false;
        cfg.retrieval_heads.enabled = false;
        cfg.multiple_choice.enabled = false;
        cfg.speed.enabled = false;
        cfg.generations.enabled = false;
        cfg.decode_check.enabled = false;
        cfg
    }
}

/// Perplexity of both models, KL and top-1 agreement, by the protocol of docs/eval.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerplexityConfig {
    pub enabled: bool,
    /// Plain-text files, each scored on its own.
    pub files: Vec<PathBuf>,
    pub ctx: usize,
    /// Score only the first windows of each file; `null` scores all.
    pub max_windows: Option<usize>,
    pub batch_size: usize,
    /// Ranges of window positions that KL and agreement are reported by.
    pub position_buckets: usize,
}

impl Default for PerplexityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            files: Vec::new(),
            ctx: 256,
            max_windows: Some(16),
            batch_size: 1,
            position_buckets: 8,
        }
    }
}

/// Per-layer attention output error of the converted layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttentionErrorConfig {
    pub enabled: bool,
    /// Validation text; defaults to the first perplexity file.
    pub file: Option<PathBuf>,
    pub ctx: usize,
    pub max_windows: Option<usize>,
    pub batch_size: usize,
}

impl Default for AttentionErrorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            file: None,
            ctx: 256,
            max_windows: Some(4),
            batch_size: 1,
        }
    }
}

/// Multiple-choice tasks (format: [`crate::multiple_choice`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultipleChoiceConfig {
    pub enabled: bool,
    /// JSONL task files; the task is named after the file stem.
    pub tasks: Vec<PathBuf>,
    /// Score only the first questions of each task.
    pub limit: Option<usize>,
}

impl Default for MultipleChoiceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tasks: Vec::new(),
            limit: None,
        }
    }
}

/// A result for each model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair<T> {
    pub teacher: T,
    pub student: T,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub layers: usize,
    pub parameters: i64,
    pub dtype: String,
    pub device: String,
    pub max_context: i64,
    /// The attention of every layer, by mixer name.
    pub attention: Vec<String>,
}

impl ModelSummary {
    pub fn of(model: &Model) -> Self {
        Self {
            layers: model.num_layers(),
            parameters: model.num_parameters(),
            dtype: dtype_name(model.kind()),
            device: device_name(model.device()),
            max_context: model.config().max_position_embeddings,
            attention: (0..model.num_layers())
                .map(|i| model.mixer(i).name())
                .collect(),
        }
    }
}

/// Perplexity and KL on one text file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextEval {
    pub file: String,
    #[serde(flatten)]
    pub kl: KlReport,
}

/// Everything [`run_report`] measured; a section is `None` when it did not run, and `skipped`
/// says why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub teacher: ModelSummary,
    pub student: ModelSummary,
    pub converted_layers: Vec<usize>,
    pub config: EvalConfig,
    pub perplexity: Option<Vec<TextEval>>,
    pub attention_error: Option<AttentionErrorReport>,
    pub passkey: Option<Pair<PasskeyReport>>,
    pub multikey: Option<Pair<MultiKeyReport>>,
    pub mqar: Option<Pair<MqarReport>>,
    /// The teacher's heads by retrieval score.
    pub retrieval_heads: Option<RetrievalHeadsReport>,
    pub multiple_choice: Option<Vec<Pair<McReport>>>,
    pub speed: Option<Pair<SpeedReport>>,
    pub generations: Option<Vec<GenerationPair>>,
    /// How often the student's greedy answers agree with the teacher's.
    pub generation_agreement: Option<GenerationAgreement>,
    /// Recurrent decoding of the student against its full forward.
    pub decode_check: Option<DecodeCheck>,
    pub training: Option<Vec<StageSummary>>,
    /// PNG files written, relative to the output directory.
    pub plots: Vec<String>,
    /// Section -> why it did not run.
    pub skipped: BTreeMap<String, String>,
}

/// Runs every enabled part of `cfg` on the teacher and the converted `student` (both borrowed
/// mutably only to wrap their layers while their attention is measured, and come back
/// unchanged), and writes `eval.json`, `eval.md` and the plots to `out_dir`. `metrics_jsonl`
/// is the training run's metrics file, plotted as training curves when given and present.
pub fn run_report(
    teacher: &mut Model,
    student: &mut Model,
    tokenizer: &Tokenizer,
    cfg: &EvalConfig,
    out_dir: &Path,
    metrics_jsonl: Option<&Path>,
) -> Result<EvalReport> {
    validate(cfg)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("creating the report directory {}", out_dir.display()))?;
    let mut skipped = BTreeMap::new();
    let mut skip = |section: &str, why: &str| {
        tracing::info!("eval: {section} skipped: {why}");
        skipped.insert(section.to_string(), why.to_string());
    };
    let converted = converted_layers(teacher, student)?;
    let mut texts = TextCache::default();

    let heads = if cfg.retrieval_heads.enabled {
        tracing::info!("eval: retrieval heads of the teacher");
        Some(
            retrieval_heads(teacher, tokenizer, &cfg.retrieval_heads, cfg.seed)
                .context("retrieval heads")?,
        )
    } else {
        skip("retrieval_heads", "disabled");
        None
    };
    let teacher: &Model = teacher;

    let perplexity = if !cfg.perplexity.enabled {
        skip("perplexity", "disabled");
        None
    } else if cfg.perplexity.files.is_empty() {
        skip("perplexity", "no text files configured (perplexity.files)");
        None
    } else {
        let p = &cfg.perplexity;
        let options = WindowOptions {
            ctx: p.ctx,
            max_windows: p.max_windows,
            batch_size: p.batch_size,
        };
        let mut results = Vec::new();
        for file in &p.files {
            tracing::info!("eval: perplexity and KL on {}", file.display());
            let tokens = texts.tokens(tokenizer, file)?;
            let kl = kl_report(teacher, &*student, tokens, &options, p.position_buckets)
                .with_context(|| format!("perplexity of {}", file.display()))?;
            results.push(TextEval {
                file: file.display().to_string(),
                kl,
            });
        }
        Some(results)
    };

    let attention_file = cfg
        .attention_error
        .file
        .as_ref()
        .or(cfg.perplexity.files.first());
    let attention = match (cfg.attention_error.enabled, attention_file) {
        (false, _) => {
            skip("attention_error", "disabled");
            None
        }
        (true, None) => {
            skip(
                "attention_error",
                "no validation text (attention_error.file or perplexity.files)",
            );
            None
        }
        (true, Some(_)) if converted.is_empty() => {
            skip("attention_error", "the student has no converted layers");
            None
        }
        (true, Some(file)) => {
            tracing::info!("eval: per-layer attention error on {}", file.display());
            let a = &cfg.attention_error;
            let options = WindowOptions {
                ctx: a.ctx,
                max_windows: a.max_windows,
                batch_size: a.batch_size,
            };
            let tokens = texts.tokens(tokenizer, file)?;
            Some(
                attention_error(teacher, student, tokens, &options)
                    .with_context(|| format!("attention error on {}", file.display()))?,
            )
        }
    };
    let student: &Model = student;
    let max_context = teacher
        .config()
        .max_position_embeddings
        .min(student.config().max_position_embeddings) as usize;

    let passkey_result = if cfg.passkey.enabled {
        tracing::info!("eval: passkey retrieval");
        let prompts = passkey_prompts(tokenizer, &cfg.passkey, cfg.seed, Some(max_context))?;
        Some(Pair {
            teacher: passkey(teacher, tokenizer, &prompts).context("teacher passkey")?,
            student: passkey(student, tokenizer, &prompts).context("student passkey")?,
        })
    } else {
        skip("passkey", "disabled");
        None
    };

    let multikey_result = if cfg.multikey.enabled {
        tracing::info!("eval: multi-key needle");
        let prompts = multikey_prompts(tokenizer, &cfg.multikey, cfg.seed, Some(max_context))?;
        Some(Pair {
            teacher: multikey(teacher, tokenizer, &prompts).context("teacher multi-key")?,
            student: multikey(student, tokenizer, &prompts).context("student multi-key")?,
        })
    } else {
        skip("multikey", "disabled");
        None
    };

    let mqar_result = if cfg.mqar.enabled {
        tracing::info!("eval: multi-query associative recall");
        let samples = mqar_samples(tokenizer, &cfg.mqar, cfg.seed)?;
        Some(Pair {
            teacher: mqar(teacher, &samples).context("teacher MQAR")?,
            student: mqar(student, &samples).context("student MQAR")?,
        })
    } else {
        skip("mqar", "disabled");
        None
    };

    let mc = &cfg.multiple_choice;
    let multiple_choice = if !mc.enabled {
        skip("multiple_choice", "disabled");
        None
    } else if mc.tasks.is_empty() {
        skip(
            "multiple_choice",
            "no task files configured (multiple_choice.tasks)",
        );
        None
    } else {
        let mut results = Vec::new();
        for path in &mc.tasks {
            let task = McTask::load(path, mc.limit)?;
            tracing::info!("eval: task {} ({} questions)", task.name, task.docs.len());
            results.push(Pair {
                teacher: score_task(teacher, tokenizer, &task).context("teacher")?,
                student: score_task(student, tokenizer, &task).context("student")?,
            });
        }
        Some(results)
    };

    let speed_result = if cfg.speed.enabled {
        tracing::info!("eval: speed and memory");
        let vocab = teacher.config().vocab_size as usize;
        // The student first: on CUDA a later measurement cannot show less than an earlier peak
        // (see crate::speed).
        let s = speed::measure(student, vocab, &cfg.speed, cfg.seed).context("student speed")?;
        let t = speed::measure(teacher, vocab, &cfg.speed, cfg.seed).context("teacher speed")?;
        Some(Pair {
            teacher: t,
            student: s,
        })
    } else {
        skip("speed", "disabled");
        None
    };

    let has_prompts = !cfg.generations.prompts.is_empty() || cfg.generations.prompts_file.is_some();
    let generations = if cfg.generations.enabled && has_prompts {
        tracing::info!("eval: generations");
        Some(side_by_side(teacher, student, tokenizer, &cfg.generations)?)
    } else {
        skip("generations", "disabled or no prompts");
        None
    };

    let decode_check = if cfg.decode_check.enabled {
        tracing::info!("eval: recurrent decoding against the full forward");
        let prompt = encode_prompt(tokenizer, &cfg.decode_check.prompt, false)?;
        let check = recurrent_vs_full(student, &prompt, cfg.decode_check.new_tokens)?;
        if !check.agree {
            tracing::warn!(
                "recurrent decoding departs from the full forward at token {:?}",
                check.first_mismatch
            );
        }
        Some(check)
    } else {
        skip("decode_check", "disabled");
        None
    };

    let curves = match metrics_jsonl {
        Some(path) if path.is_file() => Some(read_metrics(path)?),
        Some(path) => {
            skip("training", &format!("{} does not exist", path.display()));
            None
        }
        None => {
            skip("training", "no metrics.jsonl given");
            None
        }
    };

    let mut report = EvalReport {
        teacher: ModelSummary::of(teacher),
        student: ModelSummary::of(student),
        converted_layers: converted,
        config: cfg.clone(),
        perplexity,
        attention_error: attention,
        passkey: passkey_result,
        multikey: multikey_result,
        mqar: mqar_result,
        retrieval_heads: heads,
        multiple_choice,
        speed: speed_result,
        generation_agreement: generations.as_deref().and_then(GenerationAgreement::of),
        generations,
        decode_check,
        training: curves
            .as_ref()
            .map(|stages| stages.iter().map(StageCurves::summary).collect()),
        plots: Vec::new(),
        skipped,
    };
    report.plots = write_plots(&report, curves.as_deref().unwrap_or_default(), out_dir)?;
    let json = serde_json::to_string_pretty(&report).context("serializing eval.json")?;
    atomic::write_file(&out_dir.join("eval.json"), json.as_bytes())?;
    atomic::write_file(&out_dir.join("eval.md"), markdown(&report).as_bytes())?;
    tracing::info!("eval: report written to {}", out_dir.display());
    Ok(report)
}

/// Each text file read and encoded once.
#[derive(Default)]
struct TextCache {
    tokens: BTreeMap<PathBuf, Vec<u32>>,
}

impl TextCache {
    fn tokens(&mut self, tokenizer: &Tokenizer, path: &Path) -> Result<&[u32]> {
        if !self.tokens.contains_key(path) {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading text {}", path.display()))?;
            let tokens = tokenizer
                .encode(&text, false)
                .with_context(|| format!("encoding {}", path.display()))?;
            self.tokens.insert(path.to_path_buf(), tokens);
        }
        Ok(&self.tokens[path])
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn write_plots(report: &EvalReport, curves: &[StageCurves], out_dir: &Path) -> Result<Vec<String>> {
    let mut written = Vec::new();
    let mut plot = |name: String, panels: Vec<Panel>, columns: usize| -> Result<()> {
        write_png(&out_dir.join(&name), &panels, columns)?;
        written.push(name);
        Ok(())
    };
    if let Some(texts) = &report.perplexity {
        let by_position = |value: fn(&crate::kl::PositionBucket) -> f64| {
            texts
                .iter()
                .map(|t| {
                    let points =
                        t.kl.by_position
                            .iter()
                            .map(|b| ((b.start + b.end - 1) as f64 / 2.0, value(b)))
                            .collect();
                    Series::new(file_label(&t.file), points)
                })
                .collect()
        };
        plot(
            "kl_by_position.png".into(),
            vec![
                Panel {
                    title: "KL(teacher || student) by position".into(),
                    x_label: "position in window".into(),
                    y_label: "mean KL (nats)".into(),
                    series: by_position(|b| b.kl),
                    ..Panel::default()
                },
                Panel {
                    title: "Top-1 agreement by position".into(),
                    x_label: "position in window".into(),
                    y_label: "agreement".into(),
                    series: by_position(|b| b.top1_agreement),
                    y_range: Some((0.0, 1.05)),
                    ..Panel::default()
                },
            ],
            2,
        )?;
    }
    if let Some(errors) = &report.attention_error {
        // Every layer labelled while the labels fit.
        let layer_ticks = (errors.layers.len() <= 32)
            .then(|| errors.layers.iter().map(|l| l.layer as f64).collect());
        let series = |name: &str, value: fn(&crate::attention_error::LayerError) -> f64| {
            vec![Series::new(
                name,
                errors
                    .layers
                    .iter()
                    .map(|l| (l.layer as f64, value(l)))
                    .collect(),
            )]
        };
        plot(
            "layer_error.png".into(),
            vec![
                Panel {
                    title: "Attention output error by layer (relative)".into(),
                    x_label: "layer".into(),
                    y_label: "||student - teacher|| / ||teacher||".into(),
                    series: series("relative error", |l| l.relative_error),
                    x_ticks: layer_ticks.clone(),
                    ..Panel::default()
                },
                Panel {
                    title: "Attention output error by layer (MSE)".into(),
                    x_label: "layer".into(),
                    y_label: "MSE".into(),
                    series: series("MSE", |l| l.mse),
                    log_y: true,
                    x_ticks: layer_ticks,
                    ..Panel::default()
                },
            ],
            2,
        )?;
    }
    let mut recall = Vec::new();
    let accuracy_panel = |title: &str, x_label: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: x_label.into(),
        y_label: "accuracy (95% Wilson interval)".into(),
        series,
        log_x: true,
        y_range: Some((0.0, 1.05)),
        ..Panel::default()
    };
    if let Some(p) = &report.passkey {
        recall.push(accuracy_panel(
            "Passkey retrieval",
            "context length (tokens)",
            vec![
                length_series("teacher", &p.teacher.by_length),
                length_series("student", &p.student.by_length),
            ],
        ));
        recall.push(accuracy_panel(
            "Passkey by needle depth",
            "context length (tokens)",
            depth_series(p),
        ));
    }
    if let Some(m) = &report.multikey {
        recall.push(accuracy_panel(
            "Multi-key needle (one of several asked)",
            "context length (tokens)",
            vec![
                length_series("teacher", &m.teacher.by_length),
                length_series("student", &m.student.by_length),
            ],
        ));
    }
    if let Some(m) = &report.mqar {
        let series = |name: &str, r: &MqarReport| {
            let intervals = r.by_distance.iter().map(|b| bounds(b.ci95)).collect();
            Series::new(name, mqar_points(r)).with_intervals(intervals)
        };
        recall.push(accuracy_panel(
            "MQAR accuracy by key-query distance",
            "distance (tokens)",
            vec![series("teacher", &m.teacher), series("student", &m.student)],
        ));
    }
    if !recall.is_empty() {
        plot("recall.png".into(), recall, 2)?;
    }
    if let Some(h) = &report.retrieval_heads {
        plot("retrieval_heads.png".into(), head_panels(h), 2)?;
    }
    if let Some(s) = &report.speed {
        let series = |value: fn(&speed::SpeedPoint) -> Option<f64>| {
            [("teacher", &s.teacher), ("student", &s.student)]
                .into_iter()
                .map(|(name, r)| {
                    let points = r
                        .points
                        .iter()
                        .filter_map(|p| Some((p.context as f64, value(p)?)))
                        .collect();
                    Series::new(name, points)
                })
                .collect()
        };
        let memory = match s.student.memory {
            speed::MemorySource::CpuPeakRss => "peak RSS added (MiB)",
            speed::MemorySource::CudaDeviceUsed => "device memory added (MiB)",
            speed::MemorySource::Unavailable => "not measured",
        };
        plot(
            "speed.png".into(),
            vec![
                Panel {
                    title: "Decode speed".into(),
                    x_label: "context length (tokens)".into(),
                    y_label: "tokens/s".into(),
                    series: series(|p| Some(p.decode_tokens_per_s)),
                    log_x: true,
                    ..Panel::default()
                },
                Panel {
                    title: "Decode memory".into(),
                    x_label: "context length (tokens)".into(),
                    y_label: memory.into(),
                    series: series(|p| Some(p.decode_peak_bytes? as f64 / MIB)),
                    log_x: true,
                    ..Panel::default()
                },
                Panel {
                    title: "Cache after decoding".into(),
                    x_label: "context length (tokens)".into(),
                    y_label: "KV cache / recurrent state (MiB)".into(),
                    series: series(|p| Some(p.cache_bytes? as f64 / MIB)),
                    log_x: true,
                    ..Panel::default()
                },
                Panel {
                    title: "Prefill speed".into(),
                    x_label: "context length (tokens)".into(),
                    y_label: "tokens/s".into(),
                    series: series(|p| Some(p.prefill_tokens_per_s)),
                    log_x: true,
                    ..Panel::default()
                },
            ],
            2,
        )?;
    }
    for stage in curves {
        let panels: Vec<Panel> = stage
            .names()
            .into_iter()
            .map(|name| Panel {
                title: format!("{}: {name}", stage.stage),
                x_label: "step".into(),
                y_label: name.clone(),
                series: stage
                    .curves
                    .iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|((_, split), points)| {
                        Series::new(
                            split.clone(),
                            points.iter().map(|&(s, v)| (s as f64, v)).collect(),
                        )
                    })
                    .collect(),
                log_y: true,
                ..Panel::default()
            })
            .collect();
        if !panels.is_empty() {
            plot(format!("training-{}.png", slug(&stage.stage)), panels, 2)?;
        }
    }
    Ok(written)
}

/// Every head's scores sorted (how few heads retrieve), and the best head of each layer.
fn head_panels(h: &RetrievalHeadsReport) -> Vec<Panel> {
    let sorted = |scores: &[Vec<f64>]| {
        let mut all: Vec<f64> = scores.iter().flatten().copied().collect();
        all.sort_by(|a, b| b.total_cmp(a));
        all.into_iter()
            .enumerate()
            .map(|(i, s)| ((i + 1) as f64, s))
            .collect()
    };
    let best = |scores: &[Vec<f64>]| {
        scores
            .iter()
            .enumerate()
            .map(|(layer, heads)| (layer as f64, heads.iter().copied().fold(0.0, f64::max)))
            .collect()
    };
    let layer_ticks =
        (h.scores.len() <= 32).then(|| (0..h.scores.len()).map(|l| l as f64).collect());
    vec![
        Panel {
            title: "Teacher heads by retrieval score".into(),
            x_label: "head rank".into(),
            y_label: "attention mass on the copied tokens".into(),
            series: vec![
                Series::new("mean", sorted(&h.scores)),
                Series::new("passkey", sorted(&h.passkey)),
                Series::new("MQAR", sorted(&h.mqar)),
            ],
            log_x: true,
            y_range: Some((0.0, 1.05)),
            ..Panel::default()
        },
        Panel {
            title: "Best head of each layer".into(),
            x_label: "layer".into(),
            y_label: "retrieval score".into(),
            series: vec![
                Series::new("mean", best(&h.scores)),
                Series::new("passkey", best(&h.passkey)),
                Series::new("MQAR", best(&h.mqar)),
            ],
            y_range: Some((0.0, 1.05)),
            x_ticks: layer_ticks,
            ..Panel::default()
        },
    ]
}

fn bounds(ci: Interval) -> (f64, f64) {
    (ci.low, ci.high)
}

/// Accuracy against prompt length, with intervals.
fn length_series(name: &str, by_length: &[PasskeyLength]) -> Series {
    Series::new(
        name,
        by_length
            .iter()
            .map(|b| (b.length as f64, b.accuracy))
            .collect(),
    )
    .with_intervals(by_length.iter().map(|b| bounds(b.ci95)).collect())
}

/// Passkey accuracy against length, one line per model and depth (no intervals: the lines would
/// hide each other).
fn depth_series(p: &Pair<PasskeyReport>) -> Vec<Series> {
    let mut series = Vec::new();
    for (name, r) in [("teacher", &p.teacher), ("student", &p.student)] {
        for &depth in &distinct_depths(r) {
            let points = r
                .by_depth
                .iter()
                .filter(|c| c.depth == depth)
                .map(|c| (c.length as f64, c.accuracy))
                .collect();
            series.push(Series::new(format!("{name}, depth {depth}"), points));
        }
    }
    series
}

/// The configured needle depths of a passkey report, in order.
fn distinct_depths(r: &PasskeyReport) -> Vec<f64> {
    let mut depths: Vec<f64> = Vec::new();
    for c in &r.by_depth {
        if !depths.contains(&c.depth) {
            depths.push(c.depth);
        }
    }
    depths
}

/// `accuracy [low, high] (correct/n)` for a table cell.
fn scored(accuracy: f64, ci: Interval, correct: usize, n: usize) -> String {
    format!(
        "{accuracy:.2} [{:.2}, {:.2}] ({correct}/{n})",
        ci.low, ci.high
    )
}

/// MQAR accuracy per distance bucket, each at the geometric middle of its distance range
/// rounded to a whole token: the log axis is ticked at these values, and a distance is a count
/// of tokens (unrounded, the ticks read like `22.627`).
fn mqar_points(r: &MqarReport) -> Vec<(f64, f64)> {
    r.by_distance
        .iter()
        .map(|b| {
            let middle = ((b.min_distance * b.max_distance) as f64).sqrt().round();
            (middle.max(1.0), b.accuracy)
        })
        .collect()
}

/// A file name's last component, for legends.
fn file_label(file: &str) -> String {
    Path::new(file)
        .file_name()
        .map_or_else(|| file.to_string(), |n| n.to_string_lossy().into_owned())
}

/// A recall table: accuracy of teacher and student per prompt length.
fn recall_by_length_table() -> MarkdownTable {
    MarkdownTable::new()
        .right("length")
        .right("teacher")
        .right("student")
}

/// `name` reduced to characters safe in a file name.
fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.1}", b as f64 / MIB))
}

fn markdown(r: &EvalReport) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail.
    let w = &mut md;
    let _ = writeln!(w, "# Evaluation: converted model vs teacher\n");
    let _ = writeln!(
        w,
        "Teacher: {} layers, {} parameters, {} on {}. Student: {} layers converted of {} ({}).\n",
        r.teacher.layers,
        r.teacher.parameters,
        r.teacher.dtype,
        r.teacher.device,
        r.converted_layers.len(),
        r.student.layers,
        distinct(&r.student.attention)
    );
    if let Some(texts) = &r.perplexity {
        let _ = writeln!(w, "## Perplexity and agreement\n");
        let mut table = MarkdownTable::new().left("text");
        for name in [
            "ctx",
            "windows",
            "tokens",
            "teacher ppl",
            "student ppl",
            "KL(t‖s)",
            "KL p99",
            "top-1 agreement",
        ] {
            table = table.right(name);
        }
        for t in texts {
            let c = &t.kl.comparison;
            table.row([
                file_label(&t.file),
                c.teacher.ctx.to_string(),
                c.teacher.windows.to_string(),
                c.teacher.scored_tokens.to_string(),
                format!("{:.3}", c.teacher.perplexity),
                format!("{:.3}", c.student.perplexity),
                format!("{:.4}", c.kl_teacher_student),
                format!("{:.4}", t.kl.kl_quantiles.p99),
                format!("{:.3}", c.top1_agreement),
            ]);
        }
        let _ = writeln!(w, "{table}\n![KL by position](kl_by_position.png)\n");
    }
    if let Some(a) = &r.attention_error {
        let _ = writeln!(
            w,
            "## Attention output error per converted layer\n\n{} windows of {} tokens; the \
             teacher's output flows on, so each error is the layer's own.\n",
            a.windows, a.ctx
        );
        let mut table = MarkdownTable::new()
            .right("layer")
            .left("method")
            .right("MSE")
            .right("relative error");
        for l in &a.layers {
            table.row([
                l.layer.to_string(),
                l.method.clone(),
                format!("{:.3e}", l.mse),
                format!("{:.4}", l.relative_error),
            ]);
        }
        let _ = writeln!(w, "{table}\n![Per-layer error](layer_error.png)\n");
    }
    let recall = r.passkey.is_some() || r.multikey.is_some() || r.mqar.is_some();
    if recall {
        let _ = writeln!(
            w,
            "## Recall\n\nEach cell: accuracy [95% Wilson interval] (right / n).\n"
        );
    }
    if let Some(p) = &r.passkey {
        let _ = writeln!(w, "Passkey retrieval (greedy answer contains the key):\n");
        let mut table = recall_by_length_table();
        for (t, s) in p.teacher.by_length.iter().zip(&p.student.by_length) {
            table.row([
                t.length.to_string(),
                scored(t.accuracy, t.ci95, t.correct, t.trials),
                scored(s.accuracy, s.ci95, s.correct, s.trials),
            ]);
        }
        let (t, s) = (&p.teacher, &p.student);
        table.row([
            "all".into(),
            scored(t.accuracy, t.ci95, t.correct, t.trials.len()),
            scored(s.accuracy, s.ci95, s.correct, s.trials.len()),
        ]);
        let _ = writeln!(w, "{table}");
        let depths = distinct_depths(&p.student);
        let _ = writeln!(
            w,
            "Passkey by needle depth (fraction of the filler before the needle), student \
             (teacher):\n"
        );
        let mut table = MarkdownTable::new().right("length");
        for d in &depths {
            table = table.right(format!("depth {d}"));
        }
        for b in &p.student.by_length {
            let cells = depths.iter().map(|&d| {
                let find = |r: &PasskeyReport| {
                    r.by_depth
                        .iter()
                        .find(|c| c.length == b.length && c.depth == d)
                        .cloned()
                };
                match (find(&p.student), find(&p.teacher)) {
                    (Some(s), Some(t)) => format!(
                        "{} ({:.2})",
                        scored(s.accuracy, s.ci95, s.correct, s.trials),
                        t.accuracy
                    ),
                    _ => "–".into(),
                }
            });
            table.row(std::iter::once(b.length.to_string()).chain(cells));
        }
        let _ = writeln!(w, "{table}");
    }
    if let Some(m) = &r.multikey {
        let keys = m.teacher.trials.first().map_or(0, |t| t.keys.len());
        let _ = writeln!(
            w,
            "Multi-key needle ({keys} named keys in the filler, one asked; \"other key\": the \
             answer was another needle's key):\n"
        );
        let mut table = recall_by_length_table();
        for (t, s) in m.teacher.by_length.iter().zip(&m.student.by_length) {
            table.row([
                t.length.to_string(),
                scored(t.accuracy, t.ci95, t.correct, t.trials),
                scored(s.accuracy, s.ci95, s.correct, s.trials),
            ]);
        }
        let (t, s) = (&m.teacher, &m.student);
        table.row([
            "all".into(),
            scored(t.accuracy, t.ci95, t.correct, t.trials.len()),
            scored(s.accuracy, s.ci95, s.correct, s.trials.len()),
        ]);
        let _ = writeln!(
            w,
            "{table}\nOther key: teacher {}, student {}.\n",
            t.other_key, s.other_key
        );
    }
    if let Some(m) = &r.mqar {
        let _ = writeln!(w, "Multi-query associative recall by key-query distance:\n");
        // Distance ranges are text ("64–127"), so this first column stays left-aligned.
        let mut table = MarkdownTable::new()
            .left("distance (tokens)")
            .right("teacher")
            .right("student");
        for (t, s) in m.teacher.by_distance.iter().zip(&m.student.by_distance) {
            table.row([
                format!("{}–{}", t.min_distance, t.max_distance - 1),
                scored(t.accuracy, t.ci95, t.correct, t.queries),
                scored(s.accuracy, s.ci95, s.correct, s.queries),
            ]);
        }
        let (t, s) = (&m.teacher, &m.student);
        table.row([
            "all".into(),
            scored(t.accuracy, t.ci95, t.correct, t.queries),
            scored(s.accuracy, s.ci95, s.correct, s.queries),
        ]);
        let _ = writeln!(w, "{table}");
    }
    if recall {
        let _ = writeln!(w, "![Recall](recall.png)\n");
    }
    if let Some(h) = &r.retrieval_heads {
        let heads: Vec<f64> = h.scores.iter().flatten().copied().collect();
        let above = |t: f64| heads.iter().filter(|&&s| s >= t).count();
        let _ = writeln!(
            w,
            "## Retrieval heads (teacher)\n\nPer head, the attention mass that the positions \
             producing a copied answer put on the copied tokens ({} passkey and {} MQAR answer \
             positions, teacher-forced); score = the mean of the two. Heads with score >= 0.5: \
             {} of {} ({:.1}%); >= 0.1: {}.\n",
            h.passkey_queries,
            h.mqar_queries,
            above(0.5),
            heads.len(),
            100.0 * above(0.5) as f64 / heads.len().max(1) as f64,
            above(0.1)
        );
        let mut table = MarkdownTable::new();
        for name in ["rank", "layer", "head", "score", "passkey", "MQAR"] {
            table = table.right(name);
        }
        for (i, s) in h.top.iter().enumerate() {
            table.row([
                (i + 1).to_string(),
                s.layer.to_string(),
                s.head.to_string(),
                format!("{:.3}", s.score),
                format!("{:.3}", s.passkey),
                format!("{:.3}", s.mqar),
            ]);
        }
        let _ = writeln!(w, "{table}\n![Retrieval heads](retrieval_heads.png)\n");
    }
    if let Some(tasks) = &r.multiple_choice {
        let _ = writeln!(w, "## Multiple choice\n");
        let mut table = MarkdownTable::new().left("task");
        for name in [
            "questions",
            "teacher acc",
            "student acc",
            "teacher acc_norm",
            "student acc_norm",
        ] {
            table = table.right(name);
        }
        let pm = |value: f64, stderr: f64| format!("{value:.3} ± {stderr:.3}");
        for p in tasks {
            table.row([
                p.teacher.task.clone(),
                p.teacher.docs.to_string(),
                pm(p.teacher.acc, p.teacher.acc_stderr),
                pm(p.student.acc, p.student.acc_stderr),
                pm(p.teacher.acc_norm, p.teacher.acc_norm_stderr),
                pm(p.student.acc_norm, p.student.acc_norm_stderr),
            ]);
        }
        let _ = writeln!(w, "{table}");
    }
    if let Some(s) = &r.speed {
        let _ = writeln!(
            w,
            "## Speed and memory\n\nOn {}, {} decoded tokens per length; memory: {}. \
             Cache: the bytes the model's decoding cache holds after the last token (the \
             teacher's KV cache, the student's recurrent states and window caches).\n",
            s.teacher.device,
            s.teacher.decode_tokens,
            s.teacher.memory.name()
        );
        let mut table = MarkdownTable::new();
        for name in [
            "context",
            "teacher prefill tok/s",
            "student prefill tok/s",
            "teacher decode tok/s",
            "student decode tok/s",
            "teacher decode MiB",
            "student decode MiB",
            "teacher cache MiB",
            "student cache MiB",
        ] {
            table = table.right(name);
        }
        for (t, st) in s.teacher.points.iter().zip(&s.student.points) {
            table.row([
                t.context.to_string(),
                format!("{:.0}", t.prefill_tokens_per_s),
                format!("{:.0}", st.prefill_tokens_per_s),
                format!("{:.1}", t.decode_tokens_per_s),
                format!("{:.1}", st.decode_tokens_per_s),
                mib(t.decode_peak_bytes),
                mib(st.decode_peak_bytes),
                mib(t.cache_bytes),
                mib(st.cache_bytes),
            ]);
        }
        let _ = write!(w, "{table}");
        if !s.teacher.skipped_lengths.is_empty() {
            let _ = writeln!(
                w,
                "\nLengths beyond the model's context, not measured: {:?}.",
                s.teacher.skipped_lengths
            );
        }
        let _ = writeln!(w, "\n![Speed and memory](speed.png)\n");
    }
    if let Some(c) = &r.decode_check {
        let _ =
            writeln!(
            w,
            "## Recurrent decoding\n\nThe student's {} greedy tokens decoded through its cache {} \
             the full-sequence forward{}.\n",
            c.recurrent.len(),
            if c.agree { "equal those of" } else { "differ from" },
            c.first_mismatch.map_or(String::new(), |i| format!(
                " from token {i}, where the full forward scores its own choice {:.3} above the \
                 cache's (a gap within the dtype's rounding step is a near-tie)",
                c.logit_gaps[i]
            ))
        );
    }
    if let Some(gens) = &r.generations {
        let _ = writeln!(w, "## Generations (greedy)\n");
        if let Some(a) = &r.generation_agreement {
            let _ = writeln!(
                w,
                "The student's answer equals the teacher's on {} of {} prompts ({:.0}%); its \
                 first sentence on {} ({:.0}%).\n",
                a.exact,
                a.prompts,
                100.0 * a.exact_rate,
                a.first_sentence,
                100.0 * a.first_sentence_rate
            );
        }
        for g in gens {
            let _ = writeln!(w, "**Prompt:** {}\n", g.prompt.trim());
            let mut table = MarkdownTable::new().left("teacher").left("student");
            table.row([g.teacher.as_str(), g.student.as_str()]);
            let _ = writeln!(w, "{table}");
            let _ = writeln!(w, "First {} generated tokens identical.\n", g.common_prefix);
        }
    }
    if let Some(stages) = &r.training {
        let _ = writeln!(w, "## Training\n");
        for s in stages {
            let last: Vec<String> = s
                .last
                .iter()
                .map(|(k, v)| format!("{k} = {v:.4}"))
                .collect();
            let _ = writeln!(
                w,
                "- **{}**: {} steps, {} tokens; last {}",
                s.stage,
                s.steps,
                s.tokens,
                last.join(", ")
            );
        }
        let _ = writeln!(w);
        for plot in r.plots.iter().filter(|p| p.starts_with("training-")) {
            let _ = writeln!(w, "![{plot}]({plot})\n");
        }
    }
    if !r.skipped.is_empty() {
        let _ = writeln!(w, "## Not run\n");
        for (section, why) in &r.skipped {
            let _ = writeln!(w, "- {section}: {why}");
        }
    }
    md
}

/// The distinct names in order of first appearance, joined.
fn distinct(names: &[String]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for n in names {
        if !seen.contains(&n.as_str()) {
            seen.push(n);
        }
    }
    seen.join(", ")
}

/// Checks the parts of `cfg` that need no model, so a recipe fails before loading anything.
pub fn validate(cfg: &EvalConfig) -> Result<()> {
    let p = &cfg.perplexity;
    ensure!(p.ctx >= 2, "perplexity.ctx must be at least 2");
    ensure!(
        p.batch_size >= 1,
        "perplexity.batch_size must be at least 1"
    );
    ensure!(
        p.position_buckets >= 1,
        "perplexity.position_buckets must be at least 1"
    );
    let a = &cfg.attention_error;
    ensure!(a.ctx >= 2, "attention_error.ctx must be at least 2");
    ensure!(
        a.batch_size >= 1,
        "attention_error.batch_size must be at least 1"
    );
    cfg.passkey.validate()?;
    cfg.multikey.validate()?;
    cfg.retrieval_heads.validate()?;
    ensure!(
        cfg.mqar.num_pairs >= 1 && cfg.mqar.trials >= 1,
        "mqar needs num_pairs and trials of at least 1"
    );
    ensure!(
        !cfg.speed.context_lengths.is_empty() && cfg.speed.decode_tokens >= 1,
        "speed needs context lengths and decode_tokens >= 1"
    );
    let files = [
        (p.enabled, p.files.iter().collect::<Vec<_>>()),
        (a.enabled, a.file.iter().collect()),
        (
            cfg.multiple_choice.enabled,
            cfg.multiple_choice.tasks.iter().collect(),
        ),
        (
            cfg.generations.enabled,
            cfg.generations.prompts_file.iter().collect(),
        ),
    ];
    for file in files.iter().filter(|f| f.0).flat_map(|f| &f.1) {
        ensure!(file.is_file(), "{} does not exist", file.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_null_section_is_refused_not_run_with_its_defaults() {
        let err = serde_json::from_str::<EvalConfig>(r#"{"passkey": null}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("enabled: false"), "{err}");
        let off: EvalConfig = serde_json::from_str(r#"{"passkey": {"enabled": false}}"#).unwrap();
        assert!(!off.passkey.enabled);
        assert_eq!(
            serde_json::from_str::<EvalConfig>("{}").unwrap(),
            EvalConfig::default()
        );
    }

    use super::*;
    use crate::recall::{wilson, DistanceBucket};

    #[test]
    fn mqar_distances_plot_at_whole_tokens() {
        let bucket = |min_distance, max_distance| DistanceBucket {
            min_distance,
            max_distance,
            queries: 4,
            correct: 2,
            accuracy: 0.5,
            ci95: wilson(2, 4),
        };
        let report = MqarReport {
            accuracy: 0.5,
            queries: 12,
            correct: 6,
            ci95: wilson(6, 12),
            max_tokens: 128,
            by_distance: vec![bucket(1, 2), bucket(16, 32), bucket(32, 64)],
        };
        let xs: Vec<f64> = mqar_points(&report).iter().map(|p| p.0).collect();
        // Geometric middles 1.41, 22.63, 45.25.
        assert_eq!(xs, [1.0, 23.0, 45.0]);
    }
}
