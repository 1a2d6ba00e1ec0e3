//! The job's `eval` step: `report/` for the converted model against the original, and the
//! perplexity table of the exported model card.
use crate::recipe::{resolve_eval_paths, LoadedRecipe};
use anyhow::{Context, Result};
use linearize_eval::{run_report, EvalConfig};
use linearize_models::atomic;
use linearize_models::llama::Model;
use linearize_models::tokenizer::Tokenizer;
use linearize_train::convert::ConvertedLayers;
use linearize_train::export::{EvalRow, EvalTable};
use serde_json::Value;
use std::path::Path;

/// Writes `report/` (eval.json, eval.md, plots) comparing `student` with a fresh copy of the
/// original model, and with `window_only` enabled `report/window_only/` for the student with
/// its linear part switched off; a finished report is not computed again. Returns the card's
/// table.
pub fn evaluate(
    eval: &EvalConfig,
    student: &mut Model,
    converted: Option<&ConvertedLayers>,
    tokenizer: &Tokenizer,
    loaded: &LoadedRecipe,
    run_dir: &Path,
) -> Result<Option<EvalTable>> {
    let out = run_dir.join("report");
    let json = out.join("eval.json");
    let ablation = out.join(WINDOW_ONLY);
    let ablation_due = eval.window_only.enabled
        && !ablation.join("eval.json").exists()
        && !ablation.join(SKIPPED).exists();
    if json.exists() && !ablation_due {
        tracing::info!(report = %out.display(), "evaluation already done");
    } else {
        let eval = resolve_eval_paths(eval)?;
        let mut teacher = loaded.load_model(student.device(), student.kind())?;
        if !json.exists() {
            run_report(
                &mut teacher,
                student,
                tokenizer,
                &eval,
                &out,
                Some(&run_dir.join("metrics.jsonl")),
            )
            .context("evaluation")?;
        }
        if ablation_due {
            window_only(
                &mut teacher,
                student,
                converted,
                tokenizer,
                &eval,
                &ablation,
            )?;
        }
    }
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let table = perplexity_table(&report);
    if let Some(table) = &table {
        print!("{}", table.markdown());
    }
    println!("report: {}", out.join("eval.md").display());
    Ok(table)
}

/// The report's subdirectory of the linear-part ablation.
pub const WINDOW_ONLY: &str = "window_only";
/// In [`WINDOW_ONLY`] instead of a report: why the ablation could not run.
const SKIPPED: &str = "skipped.txt";

/// Perplexity, KL and agreement of `student` with its converted layers' linear part switched
/// off, into `out`; the student gets its own mixers back afterwards. A model whose layers have
/// no window part gets a note in `out/skipped.txt` instead.
fn window_only(
    teacher: &mut Model,
    student: &mut Model,
    converted: Option<&ConvertedLayers>,
    tokenizer: &Tokenizer,
    eval: &EvalConfig,
    out: &Path,
) -> Result<()> {
    let ablated = match converted.map(ConvertedLayers::window_only) {
        Some(Ok(ablated)) => ablated,
        Some(Err(e)) => return skip_window_only(out, &format!("{e:#}")),
        None => return skip_window_only(out, "no converted layer"),
    };
    tracing::info!("eval: the student with its linear part switched off");
    ablated.install(student)?;
    let result = run_report(
        teacher,
        student,
        tokenizer,
        &eval.perplexity_only(),
        out,
        None,
    );
    converted.expect("checked above").install(student)?;
    result.context("evaluation with the linear part switched off")?;
    Ok(())
}

fn skip_window_only(out: &Path, why: &str) -> Result<()> {
    tracing::warn!("eval: window_only skipped: {why}");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // Also the marker that keeps a resumed job from trying again.
    atomic::write_file(&out.join(SKIPPED), format!("{why}\n").as_bytes())
}

/// Perplexity of every evaluated text for both models, plus KL and top-1 agreement.
fn perplexity_table(report: &Value) -> Option<EvalTable> {
    let texts = report["perplexity"].as_array()?;
    let mut columns = Vec::new();
    let mut teacher = Vec::new();
    let mut student = Vec::new();
    for text in texts {
        let file = text["file"].as_str().unwrap_or("text");
        let name = Path::new(file)
            .file_name()
            .map_or(file.to_string(), |n| n.to_string_lossy().into_owned());
        let comparison = &text["comparison"];
        columns.push(format!("ppl {name}"));
        teacher.push(comparison["teacher"]["perplexity"].as_f64());
        student.push(comparison["student"]["perplexity"].as_f64());
        columns.push(format!("KL {name}"));
        teacher.push(Some(0.0));
        student.push(comparison["kl_teacher_student"].as_f64());
        columns.push(format!("top-1 agreement {name}"));
        teacher.push(Some(1.0));
        student.push(comparison["top1_agreement"].as_f64());
    }
    Some(EvalTable {
        columns,
        rows: vec![
            EvalRow {
                model: "original (softmax)".into(),
                values: teacher,
            },
            EvalRow {
                model: "converted".into(),
                values: student,
            },
        ],
    })
}
