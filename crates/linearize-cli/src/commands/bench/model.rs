//! The models the stage and decoding benchmarks run: random weights built on the device from a
//! `config.json` (throughput and memory do not depend on the values, and no weights travel), as
//! the teacher or converted to a linear-attention student.
use crate::runtime::RuntimeArgs;
use anyhow::{Context, Result};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_train::convert::{convert, ConversionConfig, ConvertedLayers};
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// A model's `config.json` (e.g. configs/models/llama3_8b/config.json); weights are random.
    #[arg(long)]
    pub config: PathBuf,
    /// The student's attention: a preset file with `conversion.attention` (e.g.
    /// configs/attention/lolcats_sw.yaml). Default: LoLCATs, 64-token sliding window, Hedgehog
    /// feature maps of 64.
    #[arg(long)]
    pub attention: Option<PathBuf>,
}

/// A student and the parameters its conversion added.
pub struct Student {
    pub model: Model,
    pub converted: ConvertedLayers,
    /// Owns the converted layers' parameters.
    pub store: nn::VarStore,
}

impl ModelArgs {
    /// The flags that give a child process the same models.
    pub fn child_args(&self) -> Vec<String> {
        let mut args = vec![
            "--device".into(),
            self.runtime.device.clone(),
            "--dtype".into(),
            self.runtime.dtype.clone(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        if let Some(attention) = &self.attention {
            args.extend(["--attention".into(), attention.display().to_string()]);
        }
        args
    }

    pub fn device(&self) -> Result<Device> {
        self.runtime.device()
    }

    pub fn model_config(&self) -> Result<ModelConfig> {
        ModelConfig::from_file(&self.config)
    }

    pub fn attention_config(&self) -> Result<AttentionConfig> {
        let Some(path) = &self.attention else {
            return Ok(AttentionConfig::new(Method::Lolcats));
        };
        #[derive(serde::Deserialize)]
        struct Preset {
            conversion: Conversion,
        }
        #[derive(serde::Deserialize)]
        struct Conversion {
            attention: AttentionConfig,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the attention preset {}", path.display()))?;
        let preset: Preset = serde_yaml_ng::from_str(&text).with_context(|| {
            format!(
                "{}: expected `conversion: {{attention: {{method: ...}}}}`",
                path.display()
            )
        })?;
        preset.conversion.attention.validate()?;
        Ok(preset.conversion.attention)
    }

    pub fn teacher(&self) -> Result<Model> {
        tch::manual_seed(0);
        let model = Model::new(
            &self.model_config()?,
            self.runtime.device()?,
            self.runtime.kind()?,
        )?;
        warm_up(model.device(), model.kind());
        Ok(model)
    }

    /// The teacher with every layer converted to the student's attention.
    pub fn student(&self) -> Result<Student> {
        let mut model = self.teacher()?;
        let store = nn::VarStore::new(model.device());
        let converted = convert(
            &mut model,
            &ConversionConfig::all(self.attention_config()?),
            &store,
        )?;
        Ok(Student {
            model,
            converted,
            store,
        })
    }
}

/// Initialises the device's libraries (e.g. cuBLAS workspaces) before a memory baseline.
pub fn warm_up(device: Device, kind: Kind) {
    let x = Tensor::ones([64, 64], (kind, device));
    let _ = x.matmul(&x);
}

/// Uniform random token ids (b, len) below the vocabulary size.
pub fn random_ids(cfg: &ModelConfig, batch: i64, len: i64, device: Device) -> Tensor {
    Tensor::randint(cfg.vocab_size, [batch, len], (Kind::Int64, device))
}
