//! The `README.md` model card of an exported model: base model, attention per layer, LoRA,
//! training data and token budget, and the evaluation table when there is one.
use super::section::LinearizeSection;
use super::{EvalTable, ExportInfo};
use linearize_attention::linearized::Method;
use std::fmt::Write as _;

pub(crate) fn model_card(info: &ExportInfo, section: &LinearizeSection, dtype: &str) -> String {
    let mut out = String::new();
    let converted = section
        .layers
        .iter()
        .filter(|l| l.method != Method::Softmax)
        .count();
    let mut methods: Vec<&str> = section.layers.iter().map(|l| l.method.as_str()).collect();
    methods.sort_unstable();
    methods.dedup();
    let _ = writeln!(
        out,
        "---\nbase_model: {}\nlibrary_name: linearize",
        info.base_model
    );
    let _ = writeln!(out, "tags:\n- linearize\n- linear-attention");
    for method in &methods {
        let _ = writeln!(out, "- {method}");
    }
    let _ = writeln!(out, "---\n\n# {} (linearized)\n", info.base_model);
    let revision = section
        .base_revision
        .as_deref()
        .map(|r| format!(" at revision `{r}`"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "`{}`{revision} with {converted} of its {} attention layers replaced by linear or hybrid \
         attention, converted with linearize {} (recipe hash `{}`). Weights are {dtype}.\n",
        info.base_model,
        section.layers.len(),
        section.tool_version,
        section.recipe_hash
    );

    let _ = writeln!(
        out,
        "## Attention\n\n| layers | attention | new parameters per layer |"
    );
    let _ = writeln!(out, "|---|---|---|");
    for (layers, name, params) in runs(section) {
        let _ = writeln!(out, "| {layers} | `{name}` | {params} |");
    }
    if let Some(lora) = &section.lora {
        let _ = writeln!(
            out,
            "\nLoRA (rank {}, alpha {}, on {}) was trained after attention transfer and is merged \
             into the weights.",
            lora.rank,
            lora.alpha,
            lora.targets.join(", ")
        );
    }

    let _ = writeln!(out, "\n## Training\n\n- Data: {}", info.data);
    for (stage, tokens) in &info.tokens {
        let _ = writeln!(out, "- {stage}: {tokens} tokens");
    }
    if let Some(eval) = &info.eval {
        let _ = writeln!(out, "\n## Evaluation\n\n{}", eval_table(eval));
    }
    let _ = writeln!(
        out,
        "\n## Use\n\n```sh\nlinearize generate --model <this directory> --chat --prompt \"Hello\"\n```\n\n\
         The `linearize` section of `config.json` names the attention of every layer; the \
         converted layers' feature maps and window factors are stored with the weights."
    );
    out
}

/// Consecutive layers with the same attention, as `(layers, name, new parameters)`.
fn runs(section: &LinearizeSection) -> Vec<(String, String, usize)> {
    let mut out: Vec<(usize, usize, String, usize)> = Vec::new();
    for l in &section.layers {
        match out.last_mut() {
            Some((_, last, name, params))
                if *name == l.name && *params == l.new_parameters && *last + 1 == l.layer =>
            {
                *last = l.layer;
            }
            _ => out.push((l.layer, l.layer, l.name.clone(), l.new_parameters)),
        }
    }
    out.into_iter()
        .map(|(first, last, name, params)| {
            let layers = if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            };
            (layers, name, params)
        })
        .collect()
}

fn eval_table(eval: &EvalTable) -> String {
    let mut out = format!("| model | {} |\n|---|", eval.columns.join(" | "));
    out.push_str(&"---|".repeat(eval.columns.len()));
    out.push('\n');
    for row in &eval.rows {
        let cells: Vec<String> = row
            .values
            .iter()
            .map(|v| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}")))
            .collect();
        let _ = writeln!(out, "| {} | {} |", row.model, cells.join(" | "));
    }
    out
}
