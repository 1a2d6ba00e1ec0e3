//! LoRA adapters on a model's projections (stage 2): which projections get one, creating and
//! installing them, and their tensors by name for states and `adapters.safetensors`.
//!
//! ```yaml
//! lora: {rank: 8, alpha: 16, dropout: 0.0, targets: [q_proj, k_proj, v_proj, o_proj]}
//! ```
//! Every decoder layer's targeted projections get one. The adapter of `model.layers.3.self_attn.
//! q_proj` has the tensors `model.layers.3.self_attn.q_proj.lora_A.weight` (r, in) and
//! `...lora_B.weight` (out, r), in f32 whatever the model dtype (they are small, and the
//! optimizer then needs no master copy).
use anyhow::{bail, ensure, Context, Result};
use linearize_attention::lora::{LoraConfig, LoraLinear};
use linearize_models::linear::LinearAdapter;
use linearize_models::llama::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{nn, Kind, Tensor};

/// The projections of a decoder layer that may carry an adapter.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The recipe's `lora` section (defaults: r = 8, alpha = 16, q/k/v/o).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default = "default_rank")]
    pub rank: i64,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input, in training only.
    #[serde(default)]
    pub dropout: f64,
    /// Projection names out of [`LORA_TARGETS`].
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
}

fn default_rank() -> i64 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj"]
        .map(String::from)
        .to_vec()
}

impl Default for LoraSettings {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl LoraSettings {
    /// Checks rank, dropout and targets; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.config().validate()?;
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "lora.alpha must be > 0, got {}",
            self.alpha
        );
        ensure!(!self.targets.is_empty(), "lora.targets must not be empty");
        for (i, target) in self.targets.iter().enumerate() {
            ensure!(
                LORA_TARGETS.contains(&target.as_str()),
                "lora.targets: unknown projection `{target}` (expected some of {})",
                LORA_TARGETS.join(", ")
            );
            ensure!(
                !self.targets[..i].contains(target),
                "lora.targets: `{target}` is listed twice"
            );
        }
        Ok(())
    }

    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
        }
    }

    fn targets_module(&self, module: &str) -> bool {
        module.starts_with("model.layers.")
            && module
                .rsplit('.')
                .next()
                .is_some_and(|proj| self.targets.iter().any(|t| t == proj))
    }
}

/// The adapter as installed in a [`linearize_models::linear::Linear`]: shares the tensors of
/// one [`LoraLinear`]; `train` switches its dropout on.
struct InstalledLora {
    lora: LoraLinear,
    train: bool,
}

impl LinearAdapter for InstalledLora {
    fn delta(&self, x: &Tensor) -> Tensor {
        self.lora.delta(x, self.train)
    }

    fn add_delta(&self, x: &Tensor, y: Tensor) -> Tensor {
        self.lora.add_delta(x, &y, self.train)
    }

    fn weight_delta(&self) -> Option<Tensor> {
        Some(self.lora.delta_weight())
    }
}

fn share(lora: &LoraLinear) -> LoraLinear {
    LoraLinear {
        a: lora.a.shallow_clone(),
        b: lora.b.shallow_clone(),
        scaling: lora.scaling,
        dropout: lora.dropout,
    }
}

/// The LoRA adapters of a model, by module name (sorted).
pub struct LoraAdapters {
    settings: LoraSettings,
    modules: BTreeMap<String, LoraLinear>,
}

impl LoraAdapters {
    /// Creates adapters for the targeted projections of every decoder layer of `model` (A drawn
    /// from torch's generator seeded with `seed`, B zero) and installs them in inference mode.
    pub fn install(model: &mut Model, settings: &LoraSettings, seed: u64) -> Result<Self> {
        settings.validate()?;
        let mut vs = nn::VarStore::new(model.device());
        vs.set_kind(Kind::Float);
        tch::manual_seed(seed as i64);
        let mut modules = BTreeMap::new();
        for (name, linear) in model.linears_mut() {
            if !settings.targets_module(&name) {
                continue;
            }
            let path = name.split('.').fold(vs.root(), |path, part| path.sub(part));
            let lora =
                LoraLinear::new(&path, linear.in_dim(), linear.out_dim(), &settings.config())
                    .with_context(|| format!("LoRA adapter of {name}"))?;
            modules.insert(name, lora);
        }
        ensure!(
            !modules.is_empty(),
            "lora.targets {:?} match no projection of the model",
            settings.targets
        );
        let adapters = Self {
            settings: settings.clone(),
            modules,
        };
        adapters.attach(model, false)?;
        Ok(adapters)
    }

    /// (Re)installs the adapters in `model`; `train` switches their dropout on.
    pub fn attach(&self, model: &mut Model, train: bool) -> Result<()> {
        let mut found = 0;
        for (name, linear) in model.linears_mut() {
            if let Some(lora) = self.modules.get(&name) {
                linear.set_adapter(Box::new(InstalledLora {
                    lora: share(lora),
                    train,
                }));
                found += 1;
            }
        }
        if found != self.modules.len() {
            bail!(
                "the model has {found} of the {} projections the adapters were made for",
                self.modules.len()
            );
        }
        Ok(())
    }

    /// Takes the adapters out of `model` (it then computes the base projections).
    pub fn detach(&self, model: &mut Model) {
        for (name, linear) in model.linears_mut() {
            if self.modules.contains_key(&name) {
                linear.take_adapter();
            }
        }
    }

    pub fn settings(&self) -> &LoraSettings {
        &self.settings
    }

    /// Number of adapted projections.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// `<module>.lora_A.weight` and `<module>.lora_B.weight` of every adapter, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self
            .modules
            .iter()
            .flat_map(|(module, lora)| {
                [
                    (format!("{module}.lora_A.weight"), lora.a.shallow_clone()),
                    (format!("{module}.lora_B.weight"), lora.b.shallow_clone()),
                ]
            })
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// `scaling · B A` (out, in) in f32 of the adapter on `module`, if it has one.
    pub fn weight_delta(&self, module: &str) -> Option<Tensor> {
        self.modules.get(module).map(LoraLinear::delta_weight)
    }
}
