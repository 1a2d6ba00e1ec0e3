//! An MLflow tracking server through its REST API (`/api/2.0/mlflow/...`): the experiment found
//! or created, a run created with the recipe as params, each record logged as one batch of
//! metrics, and the run ended.
use super::tensorboard::{scalars, split_name};
use super::MetricSink;
use crate::metrics::MetricRecord;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;

/// The recipe's `tracking.mlflow`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowConfig {
    /// The server, e.g. `http://localhost:5000`; default: `MLFLOW_TRACKING_URI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_uri: Option<String>,
    /// The experiment (created if missing); default: `MLFLOW_EXPERIMENT_NAME`, else `linearize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
}

/// MLflow's limits per `log-batch` call.
const MAX_PARAMS_PER_BATCH: usize = 100;
const MAX_PARAM_VALUE: usize = 6000;
/// Consecutive failed calls after which the sink stops trying, so that an unreachable server
/// does not cost a timeout per logged step.
const MAX_FAILURES: u32 = 5;

pub struct MlflowSink {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    run_id: String,
    failures: u32,
    finished: bool,
}

impl MlflowSink {
    /// Finds or creates the experiment, creates the run named `run_name` and logs `params`.
    pub fn start(cfg: &MlflowConfig, run_name: &str, params: &[(String, String)]) -> Result<Self> {
        let uri = cfg
            .tracking_uri
            .clone()
            .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok())
            .filter(|u| !u.trim().is_empty())
            .context("tracking.mlflow: no tracking_uri and MLFLOW_TRACKING_URI is not set")?;
        let experiment = cfg
            .experiment
            .clone()
            .or_else(|| std::env::var("MLFLOW_EXPERIMENT_NAME").ok())
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "linearize".into());
        let mut sink = Self {
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
            base: format!("{}/api/2.0/mlflow", uri.trim_end_matches('/')),
            token: std::env::var("MLFLOW_TRACKING_TOKEN").ok(),
            run_id: String::new(),
            failures: 0,
            finished: false,
        };
        let experiment_id = match sink.get(&format!(
            "experiments/get-by-name?experiment_name={}",
            query_escape(&experiment)
        )) {
            Ok(found) => found["experiment"]["experiment_id"].clone(),
            Err(_) => sink
                .post("experiments/create", &json!({"name": experiment}))
                .with_context(|| format!("creating the experiment {experiment:?} at {uri}"))?
                ["experiment_id"]
                .clone(),
        };
        let experiment_id = experiment_id
            .as_str()
            .with_context(|| format!("{uri}: no experiment_id for {experiment:?}"))?
            .to_string();
        let run = sink.post(
            "runs/create",
            &json!({
                "experiment_id": experiment_id,
                "run_name": run_name,
                "start_time": now_ms(),
            }),
        )?;
        sink.run_id = run["run"]["info"]["run_id"]
            .as_str()
            .with_context(|| format!("{uri}: runs/create returned no run_id"))?
            .to_string();
        for chunk in params.chunks(MAX_PARAMS_PER_BATCH) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(k, v)| json!({"key": k, "value": truncate(v, MAX_PARAM_VALUE)}))
                .collect();
            sink.post(
                "runs/log-batch",
                &json!({"run_id": sink.run_id, "params": params}),
            )?;
        }
        tracing::info!(server = %uri, experiment = %experiment, run_id = %sink.run_id, "MLflow run");
        Ok(sink)
    }

    fn get(&self, path: &str) -> Result<Value> {
        let mut request = self.agent.get(&format!("{}/{path}", self.base));
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        answer(request.call(), path)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let mut request = self.agent.post(&format!("{}/{path}", self.base));
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        answer(request.send_json(body), path)
    }

    fn end(&mut self, status: &str) -> Result<()> {
        self.finished = true;
        self.post(
            "runs/update",
            &json!({"run_id": self.run_id, "status": status, "end_time": now_ms()}),
        )
        .map(|_| ())
    }
}

impl MetricSink for MlflowSink {
    fn name(&self) -> &str {
        "MLflow"
    }

    /// The record's scalars as `<stage>/<split>/<name>` at its step (non-finite values left out:
    /// MLflow's JSON has no NaN).
    fn record(&mut self, record: &MetricRecord) -> Result<()> {
        if self.failures >= MAX_FAILURES {
            return Ok(());
        }
        let timestamp = (record.time * 1000.0) as i64;
        let metrics: Vec<Value> = scalars(record)
            .into_iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(name, value)| {
                json!({
                    "key": format!("{}/{}/{name}", record.stage, split_name(record)),
                    "value": value,
                    "timestamp": timestamp,
                    "step": record.step,
                })
            })
            .collect();
        match self.post(
            "runs/log-batch",
            &json!({"run_id": self.run_id, "metrics": metrics}),
        ) {
            Ok(_) => {
                self.failures = 0;
                Ok(())
            }
            Err(e) => {
                self.failures += 1;
                if self.failures == MAX_FAILURES {
                    return Err(e.context(format!(
                        "{MAX_FAILURES} failures in a row: no more metrics are sent to MLflow"
                    )));
                }
                Err(e)
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.end("FINISHED")
    }
}

impl Drop for MlflowSink {
    /// A job that ends in an error, or is stopped, leaves its run marked failed, not running.
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.end("FAILED") {
                tracing::warn!("MLflow: ending the run: {e:#}");
            }
        }
    }
}

fn answer(response: Result<ureq::Response, ureq::Error>, path: &str) -> Result<Value> {
    match response {
        Ok(response) => response
            .into_json()
            .with_context(|| format!("MLflow {path}: the answer is not JSON")),
        Err(ureq::Error::Status(code, response)) => {
            let body = response.into_string().unwrap_or_default();
            Err(anyhow!(
                "MLflow {path}: HTTP {code}: {}",
                body.split_whitespace().collect::<Vec<_>>().join(" ")
            ))
        }
        Err(e) => Err(anyhow!("MLflow {path}: {e}")),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Percent-encodes a query value.
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
