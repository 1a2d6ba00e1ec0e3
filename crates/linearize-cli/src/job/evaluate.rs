//! The job's `eval` step: `report/` for the converted model against the original, and the
//! perplexity table of the exported model card.
use crate::recipe::{resolve_eval_paths, LoadedRecipe};
use anyhow::{Context, Result};
use linearize_eval::{run_report, EvalConfig};
use linearize_models::llama::Model;
use linearize_models::tokenizer::Tokenizer;
use linearize_train::export::{EvalRow, EvalTable};
use serde_json::Value;
use std::path::Path;

/// Writes `report/` (eval.json, eval.md, plots) comparing `student` with a fresh copy of the
/// original model; a finished report is not computed again. Returns the card's table.
pub fn evaluate(
    eval: &EvalConfig,
    student: &mut Model,
    tokenizer: &Tokenizer,
    loaded: &LoadedRecipe,
    run_dir: &Path,
) -> Result<Option<EvalTable>> {
    let out = run_dir.join("report");
    let json = out.join("eval.json");
    if json.exists() {
        tracing::info!(report = %out.display(), "evaluation already done");
    } else {
        let eval = resolve_eval_paths(eval)?;
        let teacher = loaded.load_model(student.device(), student.kind())?;
        run_report(
            &teacher,
            student,
            tokenizer,
            &eval,
            &out,
            Some(&run_dir.join("metrics.jsonl")),
        )
        .context("evaluation")?;
    }
    let text =
        std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let table = perplexity_table(&report);
    if let Some(table) = &table {
        print_table(table);
    }
    println!("report: {}", out.join("eval.md").display());
    Ok(table)
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

fn print_table(table: &EvalTable) {
    println!("{:<20} {}", "model", table.columns.join(" | "));
    for row in &table.rows {
        let values: Vec<String> = row
            .values
            .iter()
            .map(|v| v.map_or_else(|| "-".into(), |v| format!("{v:.4}")))
            .collect();
        println!("{:<20} {}", row.model, values.join(" | "));
    }
}
