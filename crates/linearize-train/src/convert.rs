//! The recipe's `conversion` section and the conversion itself: which layers get which attention,
//! the new (student) parameters in their own `VarStore`, the teacher weights frozen.
//!
//! ```yaml
//! conversion:
//!   attention: {method: lolcats, feature_map: {kind: hedgehog, feature_dim: 64}}
//!   layers: all              # or global, local (by the model's layer types), or [0, 1, 2, ...]
//!   softmax_layers: [0, 15]  # with `layers: all`: every layer but these
//!   overrides:               # per-layer attention instead of `attention`
//!     31: {method: sliding_window, window_size: 128}
//!   softmax_layers_by: {count: 2, by: kl}          # after stage 1 (see crate::selection)
//!   softmax_heads: {fraction: 0.1, by: retrieval}  # head-level hybrid (see crate::selection)
//! ```
use crate::selection::{HeadSelector, LayerScoring, LayerSelector};
use anyhow::{ensure, Context, Result};
use linearize_attention::linearized::{AttentionConfig, LayerShape, LinearizedMixer, Method};
use linearize_models::config::LayerType;
use linearize_models::llama::Model;
use linearize_models::mixer::{Mixer, SoftmaxMixer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use tch::{nn, Tensor};

/// Which layers a conversion touches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelection {
    /// `all`, `global` or `local`.
    Type(LayerTypes),
    /// `[i, j, ...]`: these layers only.
    List(Vec<usize>),
}

impl Default for LayerSelection {
    fn default() -> Self {
        Self::Type(LayerTypes::All)
    }
}

/// Layers selected by the kind of attention the teacher gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerTypes {
    All,
    /// The layers that attend to every earlier key (Gemma 3's `full_attention` layers, every
    /// layer of a model without sliding windows): the ones whose KV cache grows with the context.
    Global,
    /// The sliding-window layers (Gemma 3's `sliding_attention`, every layer of a Mistral with a
    /// window).
    Local,
}

impl LayerTypes {
    fn contains(self, layer_type: LayerType) -> bool {
        match self {
            LayerTypes::All => true,
            LayerTypes::Global => layer_type == LayerType::Full,
            LayerTypes::Local => layer_type == LayerType::Sliding,
        }
    }
}

/// The recipe's `conversion` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionConfig {
    /// The attention every converted layer gets (see [`AttentionConfig`]).
    pub attention: AttentionConfig,
    /// Layers to convert: `all` (default), `global`, `local` or a list of indices.
    #[serde(default)]
    pub layers: LayerSelection,
    /// With `layers: all`, layers that keep the teacher's softmax attention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub softmax_layers: Vec<usize>,
    /// Per-layer attention replacing `attention` for that layer (a converted layer; `method:
    /// softmax` keeps it unconverted).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<usize, AttentionConfig>,
    /// Hybrid by error: after attention transfer, the k converted layers with the largest
    /// validation attention MSE go back to softmax (see [`layers_with_largest_error`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_by_error: Option<usize>,
    /// Hybrid by measurement: after attention transfer, the `count` converted layers ranked
    /// first `by` stage 1's attention MSE (`softmax_by_error: k` is `{count: k, by: mse}`) or
    /// by the KL drop when each alone is softmax again go back to softmax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_layers_by: Option<LayerSelector>,
    /// Head-level hybrid: the query heads of converted layers that keep the teacher's softmax,
    /// chosen by the teacher's retrieval scores (before attention transfer) or by KL drop
    /// (after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_heads: Option<HeadSelector>,
}

impl ConversionConfig {
    /// Every layer converted to `attention`.
    pub fn all(attention: AttentionConfig) -> Self {
        Self {
            attention,
            layers: LayerSelection::default(),
            softmax_layers: Vec::new(),
            overrides: BTreeMap::new(),
            softmax_by_error: None,
            softmax_layers_by: None,
            softmax_heads: None,
        }
    }

    /// How layers go back to softmax after attention transfer: `softmax_layers_by`, or
    /// `softmax_by_error: k` as `{count: k, by: mse}`.
    pub fn layer_selector(&self) -> Option<LayerSelector> {
        self.softmax_layers_by.clone().or_else(|| {
            self.softmax_by_error.map(|count| LayerSelector {
                count,
                by: LayerScoring::Mse,
                batches: None,
            })
        })
    }

    /// The attention of each layer of a model with these `layer_types`, checked: indices in
    /// range and listed once, no layer both kept softmax and overridden, every attention config
    /// valid.
    pub fn plan(&self, layer_types: &[LayerType]) -> Result<Vec<AttentionConfig>> {
        let num_layers = layer_types.len();
        let check_index = |key: &str, i: usize| {
            ensure!(
                i < num_layers,
                "conversion.{key}: layer {i} does not exist (the model has {num_layers} layers, \
                 0..{})",
                num_layers.saturating_sub(1)
            );
            Ok(())
        };
        let unique = |key: &str, list: &[usize]| -> Result<BTreeSet<usize>> {
            let mut set = BTreeSet::new();
            for &i in list {
                check_index(key, i)?;
                ensure!(set.insert(i), "conversion.{key}: layer {i} is listed twice");
            }
            Ok(set)
        };
        self.attention.validate().context("conversion.attention")?;
        let selected = match &self.layers {
            LayerSelection::Type(types) => {
                let selected: BTreeSet<usize> = (0..num_layers)
                    .filter(|&i| types.contains(layer_types[i]))
                    .collect();
                ensure!(
                    !selected.is_empty(),
                    "conversion.layers: {types:?} selects no layer of this model (its layer types: {})",
                    layer_types.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
                );
                selected
            }
            LayerSelection::List(list) => {
                ensure!(
                    self.softmax_layers.is_empty(),
                    "conversion: give either a `layers` list or `softmax_layers` (with `layers: \
                     all`), not both"
                );
                unique("layers", list)?
            }
        };
        let softmax = unique("softmax_layers", &self.softmax_layers)?;
        let mut plan: Vec<AttentionConfig> = (0..num_layers)
            .map(|i| {
                if selected.contains(&i) && !softmax.contains(&i) {
                    self.attention.clone()
                } else {
                    AttentionConfig::new(Method::Softmax)
                }
            })
            .collect();
        for (&i, attention) in &self.overrides {
            check_index("overrides", i)?;
            ensure!(
                selected.contains(&i) && !softmax.contains(&i),
                "conversion.overrides: layer {i} is not converted (it is not in `layers` or is \
                 in `softmax_layers`)"
            );
            attention
                .validate()
                .with_context(|| format!("conversion.overrides.{i}"))?;
            plan[i] = attention.clone();
        }
        ensure!(
            self.softmax_by_error.is_none() || self.softmax_layers_by.is_none(),
            "conversion: give either `softmax_by_error` or `softmax_layers_by`, not both"
        );
        if let Some(selector) = &self.softmax_layers_by {
            selector.validate()?;
        }
        if let Some(selector) = self.layer_selector() {
            let key = match self.softmax_by_error {
                Some(_) => "softmax_by_error",
                None => "softmax_layers_by.count",
            };
            let converted = plan.iter().filter(|a| a.method != Method::Softmax).count();
            ensure!(
                selector.count <= converted,
                "conversion.{key}: {} layers asked for, only {converted} are converted",
                selector.count
            );
        }
        if let Some(selector) = &self.softmax_heads {
            selector.validate()?;
        }
        Ok(plan)
    }
}

/// One layer's method, for reports and the exported config's `linearize` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerMethod {
    pub layer: usize,
    pub method: Method,
    /// Short name, e.g. `lolcats-sw64+hedgehog64` or `softmax`.
    pub name: String,
    /// The resolved attention config of the layer.
    pub attention: AttentionConfig,
    /// Trainable scalars the conversion added to this layer.
    pub new_parameters: usize,
}

struct ConvertedLayer {
    index: usize,
    mixer: LinearizedMixer,
    /// The layer's parameters in the student store, by name.
    params: Vec<(String, Tensor)>,
}

/// The converted layers of a model: their mixers (shallow clones of the ones installed in the
/// model) and their parameters in the student store.
pub struct ConvertedLayers {
    num_layers: usize,
    /// Each layer's softmax window in the teacher.
    teacher_windows: Vec<Option<i64>>,
    layers: Vec<ConvertedLayer>,
}

/// Converts the layers of `model` as `config` says: the teacher weights are frozen, each
/// converted layer gets a [`LinearizedMixer`] whose new parameters are created in `student` (a
/// separate store on the model's device; its kind is the parameters' dtype) under
/// `model.layers.<i>.self_attn.`.
pub fn convert(
    model: &mut Model,
    config: &ConversionConfig,
    student: &nn::VarStore,
) -> Result<ConvertedLayers> {
    let plan = config.plan(&model.config().layer_types)?;
    ensure!(
        student.device() == model.device(),
        "the student parameters must live on the model's device {:?}, not {:?}",
        model.device(),
        student.device()
    );
    model.var_store_mut().freeze();
    let shape = LayerShape::of(model.config());
    let mut layers = Vec::new();
    for (index, attention) in plan.iter().enumerate() {
        if attention.method == Method::Softmax {
            continue;
        }
        let prefix = format!("{}.self_attn.", Model::layer_prefix(index));
        let existing = layer_variables(student, &prefix);
        ensure!(
            existing.is_empty(),
            "the student store already holds '{}': convert a model into a fresh store",
            existing[0].0
        );
        let path = student
            .root()
            .sub("model")
            .sub("layers")
            .sub(index)
            .sub("self_attn");
        // The layer's own teacher window: softmax heads of a head-level hybrid keep it.
        let shape = LayerShape {
            sliding_window: model.config().layer_window(index),
            ..shape
        };
        let mixer = LinearizedMixer::new(&path, &shape, attention)
            .with_context(|| format!("converting layer {index}"))?;
        model.set_mixer(index, Box::new(mixer.shallow_clone()))?;
        layers.push(ConvertedLayer {
            index,
            mixer,
            params: layer_variables(student, &prefix),
        });
    }
    let converted = ConvertedLayers {
        num_layers: model.num_layers(),
        teacher_windows: (0..model.num_layers())
            .map(|i| model.config().layer_window(i))
            .collect(),
        layers,
    };
    // The per-layer table is printed once by the command (on stdout for a job): one line here.
    tracing::info!(
        "converted {} of {} layers",
        converted.len(),
        converted.num_layers
    );
    Ok(converted)
}

/// The variables of `vs` whose names start with `prefix`, sorted by name.
fn layer_variables(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut vars: Vec<_> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

impl ConvertedLayers {
    /// Number of converted layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Indices of the converted layers, ascending.
    pub fn indices(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.index).collect()
    }

    /// The mixer of converted layer `index`.
    pub fn mixer(&self, index: usize) -> Option<&LinearizedMixer> {
        self.layers
            .iter()
            .find(|l| l.index == index)
            .map(|l| &l.mixer)
    }

    /// The teacher's softmax window of layer `index` (none: every earlier key).
    pub fn teacher_window(&self, index: usize) -> Option<i64> {
        self.teacher_windows.get(index).copied().flatten()
    }

    /// Query heads of the converted layers that could still become softmax heads, as
    /// `(layer, head)`, by layer then head.
    pub fn head_candidates(&self) -> Vec<(usize, usize)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.mixer
                    .linear_heads()
                    .into_iter()
                    .map(move |h| (l.index, h))
            })
            .collect()
    }

    /// Adds `heads[layer]` (query heads) to the softmax heads of each listed converted layer, in
    /// these mixers and in `model` (a head-level hybrid over the same parameters).
    pub fn set_softmax_heads(
        &mut self,
        model: &mut Model,
        heads: &BTreeMap<usize, Vec<usize>>,
    ) -> Result<()> {
        for &index in heads.keys() {
            ensure!(
                self.mixer(index).is_some(),
                "layer {index} is not a converted layer (converted: {:?})",
                self.indices()
            );
        }
        for layer in &mut self.layers {
            if let Some(chosen) = heads.get(&layer.index) {
                let mut all: Vec<usize> = layer.mixer.softmax_heads().to_vec();
                all.extend(chosen);
                all.sort_unstable();
                all.dedup();
                layer.mixer = layer
                    .mixer
                    .with_softmax_heads(Some(all))
                    .with_context(|| format!("layer {}", layer.index))?;
                model.set_mixer(layer.index, Box::new(layer.mixer.shallow_clone()))?;
            }
        }
        Ok(())
    }

    /// `(layer index, mixer)` of every converted layer, ascending.
    pub fn mixers(&self) -> impl Iterator<Item = (usize, &LinearizedMixer)> {
        self.layers.iter().map(|l| (l.index, &l.mixer))
    }

    /// The new parameters of the converted layers, sorted by name (what stage 1 trains and
    /// `adapters.safetensors` holds).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<_> = self
            .layers
            .iter()
            .flat_map(|l| l.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// The converted layers with their linear part switched off
    /// ([`LinearizedMixer::window_only`]), over the same parameters; an error names the first
    /// layer whose method has no window part.
    pub fn window_only(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mixer = l.mixer.window_only().with_context(|| {
                    format!(
                        "layer {} ({}) has no window part to keep",
                        l.index,
                        l.mixer.method()
                    )
                })?;
                Ok(ConvertedLayer {
                    index: l.index,
                    mixer,
                    params: l
                        .params
                        .iter()
                        .map(|(n, t)| (n.clone(), t.shallow_clone()))
                        .collect(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            num_layers: self.num_layers,
            teacher_windows: self.teacher_windows.clone(),
            layers,
        })
    }

    /// (Re)installs the converted mixers into `model` (after stage 1 wrapped them).
    pub fn install(&self, model: &mut Model) -> Result<()> {
        for layer in &self.layers {
            model.set_mixer(layer.index, Box::new(layer.mixer.shallow_clone()))?;
        }
        Ok(())
    }

    /// Gives `layers` back their teacher softmax attention (hybrid by error); their student
    /// parameters are no longer part of [`ConvertedLayers::named_parameters`].
    pub fn revert_to_softmax(&mut self, model: &mut Model, layers: &[usize]) -> Result<()> {
        for &index in layers {
            ensure!(
                self.mixer(index).is_some(),
                "layer {index} is not a converted layer (converted: {:?})",
                self.indices()
            );
        }
        for &index in layers {
            model.set_mixer(
                index,
                Box::new(SoftmaxMixer::new(self.teacher_windows[index])),
            )?;
        }
        self.layers.retain(|l| !layers.contains(&l.index));
        tracing::info!(?layers, "layers reverted to softmax attention");
        Ok(())
    }

    /// The method of every layer of the model, converted or not.
    pub fn methods(&self) -> Vec<LayerMethod> {
        (0..self.num_layers)
            .map(
                |index| match self.layers.iter().find(|l| l.index == index) {
                    Some(layer) => LayerMethod {
                        layer: index,
                        method: layer.mixer.method(),
                        name: layer.mixer.config().name(),
                        attention: layer.mixer.config().clone(),
                        new_parameters: layer.params.iter().map(|(_, t)| t.numel()).sum(),
                    },
                    None => LayerMethod {
                        layer: index,
                        method: Method::Softmax,
                        name: SoftmaxMixer::new(self.teacher_windows[index]).name(),
                        attention: AttentionConfig::new(Method::Softmax),
                        new_parameters: 0,
                    },
                },
            )
            .collect()
    }

    /// The per-layer methods as an aligned text table.
    pub fn table(&self) -> String {
        let methods = self.methods();
        let width = methods
            .iter()
            .map(|m| m.name.len())
            .max()
            .unwrap_or(0)
            .max("attention".len());
        let mut out = format!("layer  {:<width$}  new params\n", "attention");
        for m in &methods {
            let _ = writeln!(
                out,
                "{:>5}  {:<width$}  {:>10}",
                m.layer, m.name, m.new_parameters
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attention() -> AttentionConfig {
        AttentionConfig::new(Method::Lolcats)
    }

    fn methods(plan: &[AttentionConfig]) -> Vec<Method> {
        plan.iter().map(|a| a.method).collect()
    }

    #[test]
    fn plans_all_lists_softmax_layers_and_overrides() {
        use Method::{Linear, Lolcats, Softmax};
        let mut cfg = ConversionConfig::all(attention());
        assert_eq!(
            methods(&cfg.plan(&[LayerType::Full; 3]).unwrap()),
            [Lolcats; 3]
        );
        cfg.softmax_layers = vec![1];
        cfg.overrides
            .insert(2, AttentionConfig::new(Method::Linear));
        assert_eq!(
            methods(&cfg.plan(&[LayerType::Full; 3]).unwrap()),
            [Lolcats, Softmax, Linear]
        );

        let cfg: ConversionConfig = serde_yaml_ng::from_str(
            "attention: {method: lolcats}\nlayers: [0, 2]\noverrides:\n  2: {method: softmax}\n",
        )
        .unwrap();
        assert_eq!(
            methods(&cfg.plan(&[LayerType::Full; 4]).unwrap()),
            [Lolcats, Softmax, Softmax, Softmax]
        );
        let cfg: ConversionConfig =
            serde_yaml_ng::from_str("attention: {method: linear}\nlayers: all\n").unwrap();
        assert_eq!(cfg.layers, LayerSelection::Type(LayerTypes::All));
        let text = serde_yaml_ng::to_string(&cfg).unwrap();
        assert!(text.contains("layers: all"), "{text}");
    }

    #[test]
    fn bad_plans_name_the_key_and_layer() {
        let err = |yaml: &str, layers: usize| {
            let cfg: ConversionConfig = serde_yaml_ng::from_str(yaml).unwrap();
            format!(
                "{:#}",
                cfg.plan(&vec![LayerType::Full; layers]).unwrap_err()
            )
        };
        let e = err("attention: {method: lolcats}\nlayers: [0, 30]\n", 30);
        assert!(
            e.contains("conversion.layers: layer 30 does not exist"),
            "{e}"
        );
        assert!(e.contains("30 layers"), "{e}");
        let e = err("attention: {method: lolcats}\nsoftmax_layers: [31]\n", 30);
        assert!(e.contains("conversion.softmax_layers: layer 31"), "{e}");
        let e = err("attention: {method: lolcats}\nlayers: [1, 1]\n", 4);
        assert!(e.contains("listed twice"), "{e}");
        let e = err(
            "attention: {method: lolcats}\nlayers: [1]\nsoftmax_layers: [2]\n",
            4,
        );
        assert!(e.contains("not both"), "{e}");
        let e = err(
            "attention: {method: lolcats}\nsoftmax_layers: [2]\noverrides: {2: {method: linear}}\n",
            4,
        );
        assert!(e.contains("overrides: layer 2 is not converted"), "{e}");
        let e = err("attention: {method: linear, window_size: 8}\n", 4);
        assert!(
            e.contains("conversion.attention") && e.contains("window_size"),
            "{e}"
        );
        let e = err(
            "attention: {method: lolcats}\nlayers: [0]\nsoftmax_by_error: 2\n",
            4,
        );
        assert!(e.contains("only 1 are converted"), "{e}");
        let e = err(
            "attention: {method: lolcats}\nsoftmax_by_error: 1\nsoftmax_layers_by: {count: 1, by: kl}\n",
            4,
        );
        assert!(
            e.contains("`softmax_by_error` or `softmax_layers_by`, not both"),
            "{e}"
        );
        let e = err(
            "attention: {method: lolcats}\nlayers: [0, 1]\nsoftmax_layers_by: {count: 3, by: kl}\n",
            4,
        );
        assert!(
            e.contains("conversion.softmax_layers_by.count: 3 layers"),
            "{e}"
        );
        let e = err(
            "attention: {method: lolcats}\nsoftmax_heads: {count: 3, fraction: 0.1, by: kl}\n",
            4,
        );
        assert!(
            e.contains("conversion.softmax_heads: give exactly one"),
            "{e}"
        );
        let e = err(
            "attention: {method: lolcats}\nsoftmax_heads: {fraction: 0.1, by: retrieval, batches: 2}\n",
            4,
        );
        assert!(e.contains("conversion.softmax_heads.batches"), "{e}");
        let e = serde_yaml_ng::from_str::<ConversionConfig>(
            "attention: {method: linear}\nsoftmax_heads: {count: 2, by: mse}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown variant `mse`"), "{e}");
        let cfg: ConversionConfig =
            serde_yaml_ng::from_str("attention: {method: linear}\nsoftmax_by_error: 2\n").unwrap();
        assert_eq!(
            cfg.layer_selector(),
            Some(LayerSelector {
                count: 2,
                by: LayerScoring::Mse,
                batches: None
            })
        );
        let e = serde_yaml_ng::from_str::<ConversionConfig>(
            "attention: {method: linear}\nlayers: some\n",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.is_empty());
    }
}
