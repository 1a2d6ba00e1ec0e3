//! `linearize compare RUN_DIR... [--out DIR]`: one table over finished runs of the recipe
//! runner (docs/RESULTS.md), from what each run directory already holds:
//! - `report/eval.json` (the job's evaluation against the teacher): perplexity, KL, top-1
//!   agreement on the first perplexity file (the headline: the held-out source), the perplexity
//!   ratio on the second (the in-domain test split), passkey and MQAR accuracy, decode speed and
//!   memory;
//!   speed comes from `<run>/speed/report/eval.json` instead when the run's own report has none
//!   (scripts/gpu/quality.sh measures speed there, one process at a time, because device memory
//!   is measured device-wide and concurrent runs would distort it);
//! - `metrics.jsonl`: tokens per stage, wall time of training, and the LoRA stage's validation
//!   perplexity against training tokens;
//! - `teacher_val.json` (written by the job): the teacher's perplexity on the same validation
//!   sequences, the denominator of the curves; without it the teacher's perplexity of the report
//!   is used and the plot says so;
//! - `timing.json` (`{"wall_s": ...}`, written by scripts/gpu/quality.sh): the whole job's
//!   wall time, training and evaluation, when present.
//!
//! Writes `results.md`, `results.json` and `ppl_ratio.png` into `--out`.
use crate::job::RESOLVED_RECIPE;
use anyhow::{bail, ensure, Context, Result};
use linearize_eval::plots::{write_png, Panel, Series};
use linearize_models::atomic;
use linearize_models::markdown_table::MarkdownTable;
use linearize_train::metrics::{read_metrics, MetricRecord, Split};
use serde::Serialize;
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Run directories (`checkpoints/<name>`), one row each, in this order.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where results.md, results.json and ppl_ratio.png go.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Context length (tokens) whose decode speed and memory the table shows; default: the
    /// longest one every run with speed numbers measured.
    #[arg(long)]
    pub context: Option<usize>,
}

/// The teacher's numbers (from the first run that has each).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct TeacherRow {
    /// File the perplexity was measured on (the headline: the first perplexity file).
    pub ppl_file: Option<String>,
    /// The second perplexity file, when the evaluation had one.
    pub second_ppl_file: Option<String>,
    pub ppl: Option<f64>,
    pub passkey: Option<f64>,
    pub mqar: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    pub decode_mib: Option<f64>,
    /// The decoding cache (KV cache or recurrent state) after the last decoded token.
    pub cache_mib: Option<f64>,
}

/// One run's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    pub run: String,
    pub dir: String,
    /// Attention of the converted layers (mixer names), e.g. `lolcats-sw64+hedgehog64`.
    pub method: String,
    pub layers: usize,
    pub softmax_layers: usize,
    /// `(stage, tokens)` in the order the stages ran.
    pub tokens: Vec<(String, u64)>,
    pub ppl: Option<f64>,
    pub ppl_ratio: Option<f64>,
    pub kl: Option<f64>,
    pub top1: Option<f64>,
    /// Perplexity ratio on the second perplexity file (the in-domain test split beside the
    /// held-out headline), when the evaluation had one.
    pub second_ppl_ratio: Option<f64>,
    pub passkey: Option<f64>,
    pub mqar: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    pub decode_mib: Option<f64>,
    /// The decoding cache (KV cache or recurrent state) after the last decoded token.
    pub cache_mib: Option<f64>,
    /// Whole job (timing.json) or training only (metrics.jsonl), see `wall_source`.
    pub wall_s: Option<f64>,
    pub wall_source: Option<String>,
    /// Validation perplexity / teacher perplexity during the LoRA stage.
    pub curve: Vec<CurvePoint>,
    /// What the curve is divided by.
    pub curve_reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Tokens of the LoRA stage so far.
    pub stage_tokens: u64,
    /// Tokens of every stage so far (stage 1 included).
    pub total_tokens: u64,
    pub ppl: f64,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub teacher: TeacherRow,
    /// Context of the speed columns.
    pub context: Option<usize>,
    pub runs: Vec<RunRow>,
}

pub fn run(args: Args) -> Result<()> {
    let comparison = compare(&args.runs, args.context)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let md = markdown(&comparison);
    atomic::write_file(&args.out.join("results.md"), md.as_bytes())?;
    let json = serde_json::to_string_pretty(&comparison)?;
    atomic::write_file(&args.out.join("results.json"), json.as_bytes())?;
    if let Some(panels) = ratio_panels(&comparison) {
        write_png(&args.out.join("ppl_ratio.png"), &panels, 3)?;
    }
    print!("{md}");
    println!(
        "written: {}",
        ["results.md", "results.json", "ppl_ratio.png"]
            .map(|f| args.out.join(f).display().to_string())
            .join(", ")
    );
    Ok(())
}

/// Reads every run; `context` picks the speed column (default: the longest common one).
pub fn compare(runs: &[PathBuf], context: Option<usize>) -> Result<Comparison> {
    let mut loaded = Vec::new();
    for dir in runs {
        loaded.push(RunFiles::read(dir).with_context(|| format!("run {}", dir.display()))?);
    }
    let context = match context {
        Some(c) => Some(c),
        None => common_context(&loaded),
    };
    let mut teacher = TeacherRow::default();
    let mut rows = Vec::new();
    for run in &loaded {
        let row = run.row(context)?;
        let first_text = &run.eval["perplexity"][0];
        let speed = run.speed_at(context, "teacher");
        fill(
            &mut teacher.ppl_file,
            first_text["file"].as_str().map(str::to_string),
        );
        fill(
            &mut teacher.second_ppl_file,
            run.eval["perplexity"][1]["file"]
                .as_str()
                .map(str::to_string),
        );
        fill(
            &mut teacher.ppl,
            first_text["comparison"]["teacher"]["perplexity"].as_f64(),
        );
        fill(
            &mut teacher.passkey,
            run.eval["passkey"]["teacher"]["accuracy"].as_f64(),
        );
        fill(
            &mut teacher.mqar,
            run.eval["mqar"]["teacher"]["accuracy"].as_f64(),
        );
        fill(&mut teacher.decode_tokens_per_s, speed.0);
        fill(&mut teacher.decode_mib, speed.1);
        fill(&mut teacher.cache_mib, speed.2);
        let ablation = run
            .window_only
            .as_ref()
            .map(|eval| window_only_row(&row, eval));
        rows.push(row);
        rows.extend(ablation);
    }
    Ok(Comparison {
        teacher,
        context,
        runs: rows,
    })
}

/// The reference row of `row`'s student with its linear part switched off (measured on the same
/// perplexity files; nothing else was measured).
fn window_only_row(row: &RunRow, eval: &Value) -> RunRow {
    let ratio = |text: &Value| {
        let c = &text["comparison"];
        c["student"]["perplexity"]
            .as_f64()
            .zip(c["teacher"]["perplexity"].as_f64())
            .map(|(s, t)| s / t)
    };
    let first = &eval["perplexity"][0];
    RunRow {
        run: format!("{} (linear part off)", row.run),
        method: format!("{}, window only", row.method),
        ppl: first["comparison"]["student"]["perplexity"].as_f64(),
        ppl_ratio: ratio(first),
        kl: first["comparison"]["kl_teacher_student"].as_f64(),
        top1: first["comparison"]["top1_agreement"].as_f64(),
        second_ppl_ratio: ratio(&eval["perplexity"][1]),
        passkey: None,
        mqar: None,
        decode_tokens_per_s: None,
        decode_mib: None,
        cache_mib: None,
        wall_s: None,
        wall_source: None,
        curve: Vec::new(),
        curve_reference: None,
        ..row.clone()
    }
}

fn fill<T>(slot: &mut Option<T>, value: Option<T>) {
    if slot.is_none() {
        *slot = value;
    }
}

/// What one run directory holds.
struct RunFiles {
    dir: PathBuf,
    name: String,
    eval: Value,
    /// Speed section from `speed/report/eval.json` when the report has none.
    speed: Value,
    metrics: Vec<MetricRecord>,
    teacher_val: Option<f64>,
    wall_s: Option<f64>,
    /// `report/window_only/eval.json`: the student with its linear part switched off.
    window_only: Option<Value>,
}

impl RunFiles {
    fn read(dir: &Path) -> Result<Self> {
        ensure!(
            dir.join(RESOLVED_RECIPE).is_file(),
            "{}: not a run directory (no {RESOLVED_RECIPE})",
            dir.display()
        );
        let recipe: Value = serde_yaml_ng::from_str(&read(&dir.join(RESOLVED_RECIPE))?)
            .with_context(|| format!("parsing {}", dir.join(RESOLVED_RECIPE).display()))?;
        let name = recipe["name"].as_str().map_or_else(
            || dir.file_name().unwrap_or_default().to_string_lossy().into(),
            str::to_string,
        );
        let eval_path = dir.join("report/eval.json");
        if !eval_path.is_file() {
            bail!(
                "{}: missing; the run has no evaluation (unfinished, or a recipe without `eval`)",
                eval_path.display()
            );
        }
        let eval = read_json(&eval_path)?;
        let speed = if eval["speed"].is_null() {
            let path = dir.join("speed/report/eval.json");
            if path.is_file() {
                read_json(&path)?["speed"].clone()
            } else {
                Value::Null
            }
        } else {
            eval["speed"].clone()
        };
        let metrics_path = dir.join("metrics.jsonl");
        let metrics = if metrics_path.is_file() {
            read_metrics(&metrics_path)?
        } else {
            Vec::new()
        };
        let teacher_val =
            optional_json(&dir.join("teacher_val.json"))?.and_then(|v| v["ppl"].as_f64());
        let wall_s = optional_json(&dir.join("timing.json"))?.and_then(|v| v["wall_s"].as_f64());
        let window_only = optional_json(&dir.join("report/window_only/eval.json"))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name,
            eval,
            speed,
            metrics,
            teacher_val,
            wall_s,
            window_only,
        })
    }

    /// Decode tokens/s, device MiB and cache MiB of `model` (`teacher` or `student`) at
    /// `context`.
    fn speed_at(
        &self,
        context: Option<usize>,
        model: &str,
    ) -> (Option<f64>, Option<f64>, Option<f64>) {
        let Some(context) = context else {
            return (None, None, None);
        };
        let point = self.speed[model]["points"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["context"].as_u64() == Some(context as u64));
        let mib = |p: &Value, key: &str| p[key].as_f64().map(|b| b / (1024.0 * 1024.0));
        match point {
            Some(p) => (
                p["decode_tokens_per_s"].as_f64(),
                mib(p, "decode_peak_bytes"),
                mib(p, "cache_bytes"),
            ),
            None => (None, None, None),
        }
    }

    fn contexts(&self) -> Vec<usize> {
        self.speed["student"]["points"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["context"].as_u64().map(|c| c as usize))
            .collect()
    }

    /// Tokens per stage in the order they ran (largest count logged per stage).
    fn stage_tokens(&self) -> Vec<(String, u64)> {
        let mut stages: Vec<(String, u64)> = Vec::new();
        for r in &self.metrics {
            match stages.iter_mut().find(|(s, _)| *s == r.stage) {
                Some((_, tokens)) => *tokens = (*tokens).max(r.tokens),
                None => stages.push((r.stage.clone(), r.tokens)),
            }
        }
        stages
    }

    fn row(&self, context: Option<usize>) -> Result<RunRow> {
        let student = &self.eval["student"];
        let teacher = &self.eval["teacher"];
        let attention: Vec<&str> = student["attention"]
            .as_array()
            .context("eval.json: no student.attention")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let teacher_attention: Vec<&str> = teacher["attention"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        // A layer is still softmax when its mixer is the teacher's.
        let softmax_layers = attention
            .iter()
            .enumerate()
            .filter(|(i, a)| teacher_attention.get(*i) == Some(*a))
            .count();
        let mut methods: Vec<&str> = Vec::new();
        for (i, a) in attention.iter().enumerate() {
            if teacher_attention.get(i) != Some(a) && !methods.contains(a) {
                methods.push(a);
            }
        }
        let text = &self.eval["perplexity"][0]["comparison"];
        let ppl = text["student"]["perplexity"].as_f64();
        let teacher_ppl = text["teacher"]["perplexity"].as_f64();
        let second = &self.eval["perplexity"][1]["comparison"];
        let second_ppl_ratio = second["student"]["perplexity"]
            .as_f64()
            .zip(second["teacher"]["perplexity"].as_f64())
            .map(|(s, t)| s / t);
        let (decode_tokens_per_s, decode_mib, cache_mib) = self.speed_at(context, "student");
        let tokens = self.stage_tokens();
        let (wall_s, wall_source) = match self.wall_s {
            Some(w) => (Some(w), Some("job".to_string())),
            None => match self.metrics.iter().map(|r| r.elapsed_s).reduce(f64::max) {
                Some(w) => (Some(w), Some("training".to_string())),
                None => (None, None),
            },
        };
        let (reference, reference_name) = match (self.teacher_val, teacher_ppl) {
            (Some(v), _) => (
                Some(v),
                Some("teacher ppl on the same validation sequences".to_string()),
            ),
            (None, Some(t)) => (
                Some(t),
                Some(format!(
                    "teacher ppl on {} (no teacher_val.json)",
                    file_label(self.eval["perplexity"][0]["file"].as_str().unwrap_or("?"))
                )),
            ),
            (None, None) => (None, None),
        };
        let curve = match reference {
            Some(reference) => self.lora_curve(&tokens, reference),
            None => Vec::new(),
        };
        Ok(RunRow {
            run: self.name.clone(),
            dir: self.dir.display().to_string(),
            method: if methods.is_empty() {
                "softmax (unconverted)".into()
            } else {
                methods.join(", ")
            },
            layers: attention.len(),
            softmax_layers,
            tokens,
            ppl,
            ppl_ratio: ppl.zip(teacher_ppl).map(|(s, t)| s / t),
            kl: text["kl_teacher_student"].as_f64(),
            top1: text["top1_agreement"].as_f64(),
            second_ppl_ratio,
            passkey: self.eval["passkey"]["student"]["accuracy"].as_f64(),
            mqar: self.eval["mqar"]["student"]["accuracy"].as_f64(),
            decode_tokens_per_s,
            decode_mib,
            cache_mib,
            wall_s,
            wall_source,
            curve_reference: (!curve.is_empty()).then_some(reference_name).flatten(),
            curve,
        })
    }

    /// Validation `ppl` records of the last stage that logs one (the LoRA stage), as ratios to
    /// `reference`, with the tokens of the stages before it added for the total.
    fn lora_curve(&self, tokens: &[(String, u64)], reference: f64) -> Vec<CurvePoint> {
        let Some(stage) = self
            .metrics
            .iter()
            .rev()
            .find(|r| r.split == Split::Val && r.values.contains_key("ppl"))
            .map(|r| r.stage.clone())
        else {
            return Vec::new();
        };
        let before: u64 = tokens
            .iter()
            .take_while(|(s, _)| *s != stage)
            .map(|(_, t)| t)
            .sum();
        self.metrics
            .iter()
            .filter(|r| r.stage == stage && r.split == Split::Val)
            .filter_map(|r| {
                let ppl = *r.values.get("ppl")?;
                ppl.is_finite().then(|| CurvePoint {
                    stage_tokens: r.tokens,
                    total_tokens: before + r.tokens,
                    ppl,
                    ratio: ppl / reference,
                })
            })
            .collect()
    }
}

/// The longest context every run with speed numbers measured.
fn common_context(runs: &[RunFiles]) -> Option<usize> {
    let mut common: Option<Vec<usize>> = None;
    for run in runs {
        let contexts = run.contexts();
        if contexts.is_empty() {
            continue;
        }
        common = Some(match common {
            None => contexts,
            Some(c) => c.into_iter().filter(|x| contexts.contains(x)).collect(),
        });
    }
    common?.into_iter().max()
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read(path)?).with_context(|| format!("parsing {}", path.display()))
}

fn optional_json(path: &Path) -> Result<Option<Value>> {
    path.is_file().then(|| read_json(path)).transpose()
}

fn file_label(file: &str) -> String {
    Path::new(file)
        .file_name()
        .map_or_else(|| file.to_string(), |n| n.to_string_lossy().into_owned())
}

/// 4000000 -> "4M", 1500000 -> "1.5M", 2560 -> "2.6k".
fn tokens_label(t: u64) -> String {
    let t = t as f64;
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if t >= 1e6 {
        format!("{}M", trim(format!("{:.2}", t / 1e6)))
    } else if t >= 1e3 {
        format!("{}k", trim(format!("{:.1}", t / 1e3)))
    } else {
        format!("{t}")
    }
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(
        || "–".into(),
        |v| {
            let s = format!("{v:.decimals$}");
            // A KL of -1e-9 (rounding) reads as 0, not -0.0000.
            match s.strip_prefix('-') {
                Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
                _ => s,
            }
        },
    )
}

fn markdown(c: &Comparison) -> String {
    let mut md = String::new();
    let w = &mut md;
    let t = &c.teacher;
    let file = t.ppl_file.as_deref().map_or("?".into(), file_label);
    // Column names say the context of the decode columns; the text says when none was measured.
    let speed = c
        .context
        .map_or("decode".to_string(), |n| format!("decode @ {n}"));
    let measured = if c.context.is_some() {
        ""
    } else {
        " (no speed was measured: those columns are empty)"
    };
    let second = t.second_ppl_file.as_deref().map(file_label);
    let _ = writeln!(w, "# Quality: converted models against the teacher\n");
    let _ = writeln!(
        w,
        "Headline on `{file}`: KL(teacher ‖ student) per token, top-1 agreement of the next-token \
         predictions and perplexity (ppl ratio = student / teacher, same windows){}; passkey and \
         MQAR: accuracy over all lengths/queries; {speed}{measured}: greedy decode tokens/s, the device \
         memory the decode adds (prefill cache included; 0 where the allocator had the memory \
         cached already) and the bytes of the decoding cache (KV cache or recurrent state) after \
         the last token. Tokens: per stage, stage 1 + LoRA.\n",
        second.as_deref().map_or(String::new(), |f| format!(
            "; beside it the ppl ratio on `{f}`, the second evaluation file"
        )),
    );
    let mut table = MarkdownTable::new()
        .left("run")
        .left("method")
        .right("softmax layers")
        .left("tokens")
        .right("KL")
        .right("top-1")
        .right("ppl")
        .right("ppl ratio");
    if let Some(f) = &second {
        table = table.right(format!("ppl ratio `{f}`"));
    }
    for name in [
        "passkey".to_string(),
        "MQAR".into(),
        format!("{speed} tok/s"),
        format!("{speed} MiB"),
        "cache MiB".into(),
        "wall".into(),
    ] {
        table = table.right(name);
    }
    // The second file's column, where there is one.
    let second_cell = |v: Option<f64>| second.as_ref().map(|_| num(v, 3));
    let layers = c.runs.first().map_or(0, |r| r.layers);
    let teacher_row = [
        "teacher".to_string(),
        "softmax".into(),
        layers.to_string(),
        "–".into(),
        "0".into(),
        "1.000".into(),
        num(t.ppl, 3),
        "1.000".into(),
    ];
    let teacher_rest = [
        num(t.passkey, 2),
        num(t.mqar, 2),
        num(t.decode_tokens_per_s, 1),
        num(t.decode_mib, 1),
        num(t.cache_mib, 1),
        "–".into(),
    ];
    table.row(
        teacher_row
            .into_iter()
            .chain(second_cell(Some(1.0)))
            .chain(teacher_rest),
    );
    for r in &c.runs {
        let tokens = if r.tokens.is_empty() {
            "0 (untrained)".to_string()
        } else {
            r.tokens
                .iter()
                .map(|(_, t)| tokens_label(*t))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let wall = r.wall_s.map_or("–".into(), |s| {
            let mark = if r.wall_source.as_deref() == Some("training") {
                " (training)"
            } else {
                ""
            };
            format!("{:.0} s{mark}", s)
        });
        let head = [
            r.run.clone(),
            r.method.clone(),
            r.softmax_layers.to_string(),
            tokens,
            num(r.kl, 4),
            num(r.top1, 3),
            num(r.ppl, 3),
            num(r.ppl_ratio, 3),
        ];
        let rest = [
            num(r.passkey, 2),
            num(r.mqar, 2),
            num(r.decode_tokens_per_s, 1),
            num(r.decode_mib, 1),
            num(r.cache_mib, 1),
            wall,
        ];
        table.row(
            head.into_iter()
                .chain(second_cell(r.second_ppl_ratio))
                .chain(rest),
        );
    }
    let _ = writeln!(w, "{table}");
    if c.runs.iter().any(|r| !r.curve.is_empty()) {
        let reference = c
            .runs
            .iter()
            .find_map(|r| r.curve_reference.clone())
            .unwrap_or_default();
        let _ = writeln!(
            w,
            "![Validation perplexity ratio against training tokens](ppl_ratio.png)\n\n\
             The curves: the LoRA stage's validation perplexity divided by the {reference}.\n"
        );
    }
    let _ = writeln!(w, "Run directories:\n");
    for r in &c.runs {
        let _ = writeln!(w, "- {}: `{}`", r.run, r.dir);
    }
    md
}

/// Curves above this ratio leave the close-up panel: on the log panels an untrained start (ratios
/// of thousands) flattens everything near 1, where the methods differ.
const CLOSE_UP_MAX_RATIO: f64 = 2.0;

/// Ratio against LoRA-stage tokens and against all training tokens, and a close-up of the
/// second on a linear axis.
fn ratio_panels(c: &Comparison) -> Option<Vec<Panel>> {
    let runs: Vec<&RunRow> = c.runs.iter().filter(|r| !r.curve.is_empty()).collect();
    if runs.is_empty() {
        return None;
    }
    let same_reference = runs
        .iter()
        .all(|r| r.curve_reference == runs[0].curve_reference);
    let y_label = if same_reference
        && runs[0]
            .curve_reference
            .as_deref()
            .is_some_and(|r| r.contains("same validation"))
    {
        "val ppl / teacher val ppl (validation split)".to_string()
    } else {
        "val ppl / teacher ppl (see results.md)".to_string()
    };
    let series = |x: fn(&CurvePoint) -> u64, max_ratio: f64| -> Vec<Series> {
        runs.iter()
            .map(|r| {
                Series::new(
                    r.run.clone(),
                    r.curve
                        .iter()
                        .filter(|p| p.ratio <= max_ratio)
                        .map(|p| (x(p) as f64, p.ratio))
                        .collect(),
                )
            })
            .collect()
    };
    Some(vec![
        Panel {
            title: "Perplexity ratio during LoRA".into(),
            x_label: "LoRA-stage training tokens".into(),
            y_label: y_label.clone(),
            series: series(|p| p.stage_tokens, f64::INFINITY),
            log_y: true,
            ..Panel::default()
        },
        Panel {
            title: "Perplexity ratio against all training tokens".into(),
            x_label: "training tokens, stage 1 + LoRA".into(),
            y_label: y_label.clone(),
            series: series(|p| p.total_tokens, f64::INFINITY),
            log_y: true,
            ..Panel::default()
        },
        Panel {
            title: format!("Close-up: ratios up to {CLOSE_UP_MAX_RATIO}"),
            x_label: "training tokens, stage 1 + LoRA".into(),
            y_label,
            series: series(|p| p.total_tokens, CLOSE_UP_MAX_RATIO),
            ..Panel::default()
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A run directory as the job leaves it, with only what compare reads.
    fn fake_run(
        root: &Path,
        name: &str,
        attention: &[&str],
        student_ppl: f64,
        metrics: &[Value],
        speed: bool,
    ) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("report")).unwrap();
        std::fs::write(dir.join(RESOLVED_RECIPE), format!("name: {name}\n")).unwrap();
        let point = |tps: f64, bytes: u64| {
            json!({"context": 4096, "prefill_tokens_per_s": 1000.0,
                   "decode_tokens_per_s": tps, "decode_peak_bytes": bytes,
                   "cache_bytes": bytes / 2})
        };
        let eval = json!({
            "teacher": {"attention": vec!["softmax"; 4]},
            "student": {"attention": attention},
            "perplexity": [{"file": "/cache/text/test.txt", "comparison": {
                "teacher": {"perplexity": 20.0},
                "student": {"perplexity": student_ppl},
                "kl_teacher_student": 0.125,
                "top1_agreement": 0.75
            }}],
            "passkey": {"teacher": {"accuracy": 1.0}, "student": {"accuracy": 0.5}},
            "mqar": {"teacher": {"accuracy": 0.9}, "student": {"accuracy": 0.25}},
            "speed": if speed {
                json!({"teacher": {"points": [point(100.0, 64 << 20)]},
                       "student": {"points": [point(150.0, 8 << 20)]}})
            } else {
                Value::Null
            },
        });
        std::fs::write(dir.join("report/eval.json"), eval.to_string()).unwrap();
        let lines: String = metrics.iter().map(|m| format!("{m}\n")).collect();
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
        dir
    }

    fn record(stage: &str, tokens: u64, split: &str, extra: Value) -> Value {
        let mut r = json!({"stage": stage, "step": tokens / 100, "tokens": tokens,
                           "split": split, "elapsed_s": tokens as f64 / 1000.0});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        r
    }

    #[test]
    fn table_of_synthetic_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let lolcats = fake_run(
            tmp.path(),
            "lolcats",
            &["lolcats-sw64+hedgehog64"; 4],
            25.0,
            &[
                record("attention_transfer", 0, "val", json!({"attn_mse": 0.1})),
                record(
                    "attention_transfer",
                    4000,
                    "train",
                    json!({"attn_mse": 0.05}),
                ),
                record("lora", 0, "val", json!({"ppl": 40.0})),
                record("lora", 2000, "val", json!({"ppl": 30.0})),
                record("lora", 4000, "val", json!({"ppl": 24.0})),
            ],
            true,
        );
        std::fs::write(
            lolcats.join("teacher_val.json"),
            json!({"ppl": 20.0, "lm_loss": 3.0}).to_string(),
        )
        .unwrap();
        std::fs::write(lolcats.join("timing.json"), r#"{"wall_s": 321.4}"#).unwrap();
        // The headline file first, the in-domain test split second; and the ablation with the
        // linear part switched off.
        let text = |file: &str, student: f64, kl: f64| {
            json!({"file": file, "comparison": {
                "teacher": {"perplexity": 20.0}, "student": {"perplexity": student},
                "kl_teacher_student": kl, "top1_agreement": 0.5}})
        };
        let eval_path = lolcats.join("report/eval.json");
        let mut eval: Value = read_json(&eval_path).unwrap();
        eval["perplexity"] = json!([
            text("/cache/text/heldout.txt", 25.0, 0.125),
            text("/cache/text/test.txt", 18.0, 0.1)
        ]);
        std::fs::write(&eval_path, eval.to_string()).unwrap();
        std::fs::create_dir_all(lolcats.join("report/window_only")).unwrap();
        std::fs::write(
            lolcats.join("report/window_only/eval.json"),
            json!({"perplexity": [
                text("/cache/text/heldout.txt", 40.0, 0.5),
                text("/cache/text/test.txt", 30.0, 0.4)
            ]})
            .to_string(),
        )
        .unwrap();
        let hybrid = fake_run(
            tmp.path(),
            "hybrid",
            &[
                "softmax",
                "lolcats-sw64+hedgehog64",
                "softmax",
                "lolcats-sw64+hedgehog64",
            ],
            22.0,
            &[
                record(
                    "attention_transfer",
                    4000,
                    "train",
                    json!({"attn_mse": 0.05}),
                ),
                record("lora", 4000, "val", json!({"ppl": 22.0})),
            ],
            false,
        );
        let untrained = fake_run(tmp.path(), "untrained", &["liger-sw64"; 4], 80.0, &[], true);

        let c = compare(&[lolcats, hybrid, untrained], None).unwrap();
        assert_eq!(c.context, Some(4096));
        assert_eq!(c.teacher.ppl, Some(20.0));
        assert_eq!(c.teacher.decode_tokens_per_s, Some(100.0));
        let [l, w, h, u] = &c.runs[..] else {
            panic!("four rows expected")
        };
        assert_eq!(
            c.teacher.second_ppl_file.as_deref(),
            Some("/cache/text/test.txt")
        );
        assert_eq!(l.second_ppl_ratio, Some(0.9));
        assert_eq!(w.run, "lolcats (linear part off)");
        assert_eq!(
            (w.ppl_ratio, w.kl, w.second_ppl_ratio),
            (Some(2.0), Some(0.5), Some(1.5))
        );
        assert_eq!((w.passkey, w.decode_tokens_per_s), (None, None));
        assert_eq!(h.second_ppl_ratio, None);
        assert_eq!(
            (l.method.as_str(), l.softmax_layers),
            ("lolcats-sw64+hedgehog64", 0)
        );
        assert_eq!(l.ppl_ratio, Some(1.25));
        assert_eq!(
            l.tokens,
            [
                ("attention_transfer".to_string(), 4000),
                ("lora".into(), 4000)
            ]
        );
        assert_eq!((l.decode_mib, l.cache_mib), (Some(8.0), Some(4.0)));
        assert_eq!(l.wall_s, Some(321.4));
        // Curve against the teacher's validation perplexity, tokens of stage 1 added.
        let ratios: Vec<(u64, u64, f64)> = l
            .curve
            .iter()
            .map(|p| (p.stage_tokens, p.total_tokens, p.ratio))
            .collect();
        assert_eq!(
            ratios,
            [(0, 4000, 2.0), (2000, 6000, 1.5), (4000, 8000, 1.2)]
        );
        assert_eq!(h.softmax_layers, 2);
        assert_eq!(h.decode_tokens_per_s, None);
        // Without teacher_val.json the report's teacher perplexity is the reference.
        assert_eq!(h.curve[0].ratio, 22.0 / 20.0);
        assert!(h.curve_reference.as_deref().unwrap().contains("test.txt"));
        assert_eq!(h.wall_s, Some(4.0));
        assert!(u.tokens.is_empty() && u.curve.is_empty());

        let md = markdown(&c);
        let line = |run: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| {run} |")))
                .unwrap_or_else(|| panic!("no row for {run} in\n{md}"))
                .to_string()
        };
        assert_eq!(
            line("teacher"),
            "| teacher | softmax | 4 | – | 0 | 1.000 | 20.000 | 1.000 | 1.000 | 1.00 | 0.90 | 100.0 | 64.0 | 32.0 | – |"
        );
        assert_eq!(
            line("lolcats"),
            "| lolcats | lolcats-sw64+hedgehog64 | 0 | 4k + 4k | 0.1250 | 0.500 | 25.000 | 1.250 | 0.900 | 0.50 | 0.25 | 150.0 | 8.0 | 4.0 | 321 s |"
        );
        assert_eq!(
            line("lolcats (linear part off)"),
            "| lolcats (linear part off) | lolcats-sw64+hedgehog64, window only | 0 | 4k + 4k | 0.5000 | 0.500 | 40.000 | 2.000 | 1.500 | – | – | – | – | – | – |"
        );
        assert_eq!(
            line("hybrid"),
            "| hybrid | lolcats-sw64+hedgehog64 | 2 | 4k + 4k | 0.1250 | 0.750 | 22.000 | 1.100 | – | 0.50 | 0.25 | – | – | – | 4 s (training) |"
        );
        assert!(line("untrained").contains("| 0 (untrained) | 0.1250 | 0.750 | 80.000 | 4.000 |"));
        assert!(md.contains("decode @ 4096 tok/s"));
        assert!(md.contains("Headline on `heldout.txt`") && md.contains("ppl ratio `test.txt`"));

        // The command writes the three files.
        let out = tmp.path().join("out");
        run(Args {
            runs: vec![
                tmp.path().join("lolcats"),
                tmp.path().join("hybrid"),
                tmp.path().join("untrained"),
            ],
            out: out.clone(),
            context: None,
        })
        .unwrap();
        for f in ["results.md", "results.json", "ppl_ratio.png"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        let json: Value = read_json(&out.join("results.json")).unwrap();
        assert_eq!(json["runs"][0]["ppl_ratio"], 1.25);
    }

    #[test]
    fn a_run_without_report_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(RESOLVED_RECIPE), "name: x\n").unwrap();
        let err = compare(&[tmp.path().to_path_buf()], None).unwrap_err();
        assert!(
            format!("{err:#}").contains("report/eval.json: missing"),
            "{err:#}"
        );
        let err = compare(&[tmp.path().join("nope")], None).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a run directory"),
            "{err:#}"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(num(Some(-0.000_000_1), 4), "0.0000");
        assert_eq!(num(Some(-0.25), 2), "-0.25");
        assert_eq!(num(None, 2), "–");
    }

    #[test]
    fn token_labels() {
        assert_eq!(tokens_label(4_000_000), "4M");
        assert_eq!(tokens_label(1_500_000), "1.5M");
        assert_eq!(tokens_label(2_560), "2.6k");
        assert_eq!(tokens_label(12), "12");
    }
}
