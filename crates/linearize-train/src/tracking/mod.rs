//! Experiment tracking beside `metrics.jsonl`: TensorBoard event files in the run directory (on
//! by default) and an MLflow tracking server (optional). Every record the metrics writer appends
//! goes to each sink; a sink that fails warns and never stops training.
mod mlflow;
mod tensorboard;

use crate::metrics::MetricRecord;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub use mlflow::{MlflowConfig, MlflowSink};
pub use tensorboard::{scalars, split_name, TensorBoardSink};

/// The recipe's `tracking` section.
///
/// ```yaml
/// tracking:
///   tensorboard: true          # <run dir>/tensorboard/
///   mlflow: {tracking_uri: http://mlflow:5000, experiment: linearize}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingConfig {
    /// TensorBoard event files in `<run dir>/tensorboard/`.
    #[serde(default = "default_true")]
    pub tensorboard: bool,
    /// An MLflow tracking server; also used, with defaults, when `MLFLOW_TRACKING_URI` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<MlflowConfig>,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        Self {
            tensorboard: true,
            mlflow: None,
        }
    }
}

fn default_true() -> bool {
    true
}

impl TrackingConfig {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The sinks this section asks for, for the run `run_name` in `run_dir`, with the resolved
    /// recipe (`recipe_yaml`, and flattened `params` for MLflow) as the run's hyperparameters.
    /// A sink that cannot start is left out with a warning.
    pub fn open_sinks(
        &self,
        run_dir: &Path,
        run_name: &str,
        recipe_yaml: &str,
        params: &[(String, String)],
    ) -> Vec<Box<dyn MetricSink>> {
        let mut sinks: Vec<Box<dyn MetricSink>> = Vec::new();
        if self.tensorboard {
            match TensorBoardSink::create(&run_dir.join("tensorboard"), recipe_yaml) {
                Ok(sink) => {
                    tracing::info!(events = %sink.path().display(), "TensorBoard event file");
                    sinks.push(Box::new(sink));
                }
                Err(e) => tracing::warn!("TensorBoard: {e:#}; metrics go to metrics.jsonl only"),
            }
        }
        let env_uri = std::env::var("MLFLOW_TRACKING_URI")
            .ok()
            .filter(|u| !u.trim().is_empty());
        let mlflow = match (&self.mlflow, env_uri) {
            (Some(cfg), _) => Some(cfg.clone()),
            (None, Some(_)) => Some(MlflowConfig::default()),
            (None, None) => None,
        };
        if let Some(cfg) = mlflow {
            match MlflowSink::start(&cfg, run_name, params) {
                Ok(sink) => sinks.push(Box::new(sink)),
                Err(e) => tracing::warn!("MLflow: {e:#}; not tracking this run there"),
            }
        }
        sinks
    }
}

/// Somewhere metric records go besides `metrics.jsonl`.
pub trait MetricSink {
    /// The name warnings use.
    fn name(&self) -> &str;
    /// Sends one record.
    fn record(&mut self, record: &MetricRecord) -> Result<()>;
    /// The job ended without error.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Flattens a JSON value into `a.b.c = value` pairs (lists by index), as MLflow's params want.
pub fn flatten_params(value: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        let join = |key: &str| {
            if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            }
        };
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    walk(&join(k), v, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&join(&i.to_string()), v, out);
                }
            }
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            serde_json::Value::Null => {}
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    walk("", value, &mut out);
    out
}
