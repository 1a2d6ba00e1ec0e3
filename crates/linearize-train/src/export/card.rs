//! The `README.md` model card of an exported model: base model, attention per layer, LoRA,
//! training data and token budget, and the evaluation table when there is one.
use super::section::LinearizeSection;
use super::ExportInfo;
use linearize_attention::linearized::Method;
use linearize_models::markdown_table::MarkdownTable;
use std::fmt::Write as _;

/// `text_only`: the base model is multimodal (Gemma 3 with a vision tower) and this export is its
/// text model alone.
pub(crate) fn model_card(
    info: &ExportInfo,
    section: &LinearizeSection,
    dtype: &str,
    text_only: bool,
) -> String {
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
    if text_only {
        let _ = writeln!(
            out,
            "The base model is multimodal; this is its text model alone (`gemma3_text`): the \
             vision tower and the projector were dropped, so it takes text input only.\n"
        );
    }

    let mut table = MarkdownTable::new()
        .left("layers")
        .left("attention")
        .left("new parameters per layer");
    for (layers, name, params) in runs(section) {
        table.row([layers, format!("`{name}`"), params.to_string()]);
    }
    let _ = write!(out, "## Attention\n\n{table}");
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
        let _ = writeln!(out, "\n## Evaluation\n\n{}", eval.markdown());
    }
    let _ = writeln!(
        out,
        "\n## Use\n\n```sh\nlinearize generate --model <this directory> --chat --prompt \"Hello\"\n```\n\n\
         The `linearize` section of `config.json` names the attention of every layer; the \
         converted layers' feature maps and window factors are stored with the weights."
    );
    out.push_str(USE_ELSEWHERE);
    if section.lora.is_some() {
        out.push_str(USE_PEFT);
    }
    out.push_str(NOT_YET);
    out
}

const USE_ELSEWHERE: &str = r#"
### Hugging Face transformers

`config.json` has its own `model_type` (`linearize`, the decoder family in `base_model_type`)
and `architectures: ["LinearizeForCausalLM"]`; `configuration_linearize.py` and
`modeling_linearize.py` beside the weights run every layer's attention (prefill by the exact
quadratic form, `generate` by the recurrent state). A stock load without remote code fails
instead of running the softmax model the weights came from.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this directory>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this directory>")
```

Without remote code: `pip install <linearize repository>/python`, then `import linearize_hf`
registers the model type. Batches are one sequence each, or right-padded for scoring with
`use_cache=False`: padding before or inside a sequence is refused.

### lm-evaluation-harness

```sh
lm_eval --model hf --model_args pretrained=<this directory>,trust_remote_code=True,dtype=float32   --tasks hellaswag,arc_easy,piqa --batch_size 1
```
"#;

const USE_PEFT: &str = r#"
### PEFT

The run's `peft/` directory holds the LoRA adapters in PEFT's format (`peft/adapter/`) and the
converted model without them merged (`peft/base/`, feature maps and window factors included):

```python
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("peft/base", trust_remote_code=True)
model = PeftModel.from_pretrained(base, "peft/adapter")  # the logits of this directory's model
```
"#;

const NOT_YET: &str = r#"
### Not supported yet

vLLM, SGLang and llama.cpp (GGUF) cannot run this model: they have no kernels for its attention
(linear attention through learned feature maps mixed with a softmax window, Liger's gated
recurrence) and no decoding cache holding a recurrent state, and they do not load
`LinearizeForCausalLM`. Renaming the architecture to a stock one would run the original softmax
attention on these weights and silently give a different model.
"#;

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
