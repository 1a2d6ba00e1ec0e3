//! The decoding plot: best and batch-1 tokens/s, and the decoding memory per sequence, of
//! teacher and student against context length, from `bench decode` results (a run's, or the
//! reports earlier runs wrote with `--json`).
use super::harness::MIB;
use anyhow::{ensure, Context, Result};
use linearize_eval::plots::{write_png, Panel, Series};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct PlotArgs {
    /// Reports written by `bench decode --json` (their results are drawn together).
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: PlotArgs) -> Result<()> {
    let mut results = Vec::new();
    for path in &args.reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let rows = report["results"].as_array().with_context(|| {
            format!(
                "{}: no 'results' array (not a bench decode report)",
                path.display()
            )
        })?;
        results.extend(rows.iter().cloned());
    }
    write(&args.out, &results)
}

/// Draws `results` (rows of `bench decode`) to `path`.
pub fn write(path: &Path, results: &[Value]) -> Result<()> {
    let panels = panels(results);
    ensure!(
        panels.iter().any(|p| !p.series.is_empty()),
        "no successful decoding measurement to plot"
    );
    write_png(path, &panels, 3)?;
    tracing::info!(path = %path.display(), "wrote the decoding plot");
    Ok(())
}

fn panels(results: &[Value]) -> Vec<Panel> {
    let ok: Vec<&Value> = results.iter().filter(|r| r["status"] == "ok").collect();
    let series = |pick: &dyn Fn(&[&Value]) -> Option<f64>| {
        ["teacher", "student", "student-graph"]
            .into_iter()
            .filter_map(|model| {
                let mut contexts: Vec<i64> = ok
                    .iter()
                    .filter(|r| r["model"] == model)
                    .filter_map(|r| r["context"].as_i64())
                    .collect();
                contexts.sort_unstable();
                contexts.dedup();
                let points: Vec<(f64, f64)> = contexts
                    .into_iter()
                    .filter_map(|c| {
                        let rows: Vec<&Value> = ok
                            .iter()
                            .copied()
                            .filter(|r| r["model"] == model && r["context"].as_i64() == Some(c))
                            .collect();
                        Some((c as f64, pick(&rows)?))
                    })
                    .collect();
                (!points.is_empty()).then(|| Series::new(model, points))
            })
            .collect::<Vec<_>>()
    };
    let best = |rows: &[&Value]| {
        rows.iter()
            .filter_map(|r| r["tokens_per_s"].as_f64())
            .max_by(f64::total_cmp)
    };
    let batch_one = |rows: &[&Value]| {
        rows.iter()
            .find(|r| r["batch"] == 1)
            .and_then(|r| r["tokens_per_s"].as_f64())
    };
    let memory = |rows: &[&Value]| {
        rows.iter()
            .find_map(|r| r["state_bytes_per_seq"].as_f64())
            .map(|b| b / MIB)
    };
    let panel = |title: &str, y_label: &str, series| Panel {
        title: title.into(),
        x_label: "context (tokens)".into(),
        y_label: y_label.into(),
        series,
        log_x: true,
        log_y: true,
        ..Panel::default()
    };
    vec![
        panel(
            "best decode tokens/s (largest batch that fits)",
            "tokens/s",
            series(&best),
        ),
        panel("decode tokens/s at batch 1", "tokens/s", series(&batch_one)),
        panel(
            "decoding memory per sequence",
            "MiB (KV cache or recurrent state)",
            series(&memory),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(model: &str, context: i64, batch: i64, tps: f64, state: f64) -> Value {
        json!({"model": model, "context": context, "batch": batch, "status": "ok",
               "tokens_per_s": tps, "state_bytes_per_seq": state})
    }

    #[test]
    fn series_take_the_best_batch_the_first_batch_and_the_state_per_context() {
        let results = vec![
            row("teacher", 4096, 1, 30.0, 512.0 * MIB),
            row("teacher", 4096, 8, 300.0, 512.0 * MIB),
            row("student", 4096, 1, 20.0, 100.0 * MIB),
            row("student", 32768, 1, 15.0, 100.0 * MIB),
            row("student", 32768, 64, 900.0, 100.0 * MIB),
            json!({"model": "teacher", "context": 32768, "batch": 16, "status": "oom"}),
        ];
        let p = panels(&results);
        assert_eq!(p[0].series[0].points, vec![(4096.0, 300.0)]);
        assert_eq!(
            p[0].series[1].points,
            vec![(4096.0, 20.0), (32768.0, 900.0)]
        );
        assert_eq!(p[1].series[1].points[1], (32768.0, 15.0));
        assert_eq!(p[2].series[0].points, vec![(4096.0, 512.0)]);
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("decode.png");
        write(&png, &results).unwrap();
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
        let e = write(&png, &results[5..]).unwrap_err().to_string();
        assert!(e.contains("no successful"), "{e}");
    }
}
