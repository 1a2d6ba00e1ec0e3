//! Reads a Kineto trace back and totals the time of device activity per named range, per aten
//! operator and per kernel, over the spans of one repeated range (an update, a forward pass).
//!
//! Device activity is every kernel, copy and memset when the trace has GPU events; on a CPU-only
//! trace it is every operator's CPU self time (less that of the operators it called). A GPU
//! event is attributed through the runtime call that launched it: its operator by the launch's
//! "External id", its range by the ranges open when it was launched (on any thread, so work
//! that autograd's device threads launch is counted in the range that called backward).
use anyhow::{bail, Context, Result};
use linearize_models::markdown_table::MarkdownTable;
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// One line of a table: a name and its share of the counted activity.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub ms_per_unit: f64,
    pub calls_per_unit: f64,
    pub share: f64,
}

/// Totals over the counted spans of the unit range.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Name of the repeated range the totals are per.
    pub unit: String,
    /// Spans of it counted (after the skipped ones).
    pub units: usize,
    /// Whether the activity is GPU time (else operators' CPU self time).
    pub gpu: bool,
    /// Mean wall time of a counted span, from its range on the host.
    pub wall_ms_per_unit: f64,
    /// Device activity per counted span.
    pub busy_ms_per_unit: f64,
    /// Innermost-first range paths below the unit ("a > b"); "(no range)" for the rest.
    pub by_range: Vec<Row>,
    pub by_op: Vec<Row>,
    pub by_kernel: Vec<Row>,
}

struct Span {
    name: String,
    start: f64,
    end: f64,
}

struct Activity {
    name: String,
    op: String,
    launched: f64,
    dur: f64,
}

/// An event's category ("" when it has none).
fn cat(e: &Value) -> &str {
    e["cat"].as_str().unwrap_or("")
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.parse().ok())
}

fn arg_id(e: &Value, key: &str) -> Option<i64> {
    let v = &e["args"][key];
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

fn span(e: &Value) -> Option<Span> {
    let start = num(&e["ts"])?;
    Some(Span {
        name: e["name"].as_str()?.to_string(),
        start,
        end: start + num(&e["dur"]).unwrap_or(0.0),
    })
}

impl Summary {
    /// Totals the activity of `trace` inside the spans of range `unit`, leaving out the first
    /// `skip` of them (warm-up).
    pub fn from_trace(trace: &Path, unit: &str, skip: usize) -> Result<Self> {
        let text = std::fs::read_to_string(trace)
            .with_context(|| format!("reading the trace {}", trace.display()))?;
        let doc: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing the trace {}", trace.display()))?;
        let events = doc["traceEvents"].as_array().with_context(|| {
            format!(
                "{}: no traceEvents array (not a Kineto trace)",
                trace.display()
            )
        })?;
        Self::from_events(events, unit, skip).with_context(|| format!("in {}", trace.display()))
    }

    fn from_events(events: &[Value], unit: &str, skip: usize) -> Result<Self> {
        let mut ranges: Vec<Span> = events
            .iter()
            .filter(|e| cat(e) == "user_annotation")
            .filter_map(span)
            .collect();
        ranges.sort_by(|a, b| a.start.total_cmp(&b.start));
        let units: Vec<&Span> = ranges.iter().filter(|r| r.name == unit).collect();
        if units.len() <= skip {
            bail!(
                "the trace has {} '{unit}' ranges; {skip} are skipped as warm-up, none is left",
                units.len()
            );
        }
        let counted = &units[skip..];

        let op_names: HashMap<i64, String> = events
            .iter()
            .filter(|e| cat(e) == "cpu_op")
            .filter_map(|e| Some((arg_id(e, "External id")?, e["name"].as_str()?.to_string())))
            .collect();
        let launches: HashMap<i64, f64> = events
            .iter()
            .filter(|e| matches!(cat(e), "cuda_runtime" | "cuda_driver"))
            .filter_map(|e| Some((arg_id(e, "correlation")?, num(&e["ts"])?)))
            .collect();
        let gpu_events: Vec<&Value> = events
            .iter()
            .filter(|e| matches!(cat(e), "kernel" | "gpu_memcpy" | "gpu_memset"))
            .collect();
        let gpu = !gpu_events.is_empty();
        let activities: Vec<Activity> = if gpu {
            gpu_events
                .iter()
                .filter_map(|e| {
                    let launched = *launches.get(&arg_id(e, "correlation")?)?;
                    let op = arg_id(e, "External id")
                        .and_then(|id| op_names.get(&id).cloned())
                        .unwrap_or_else(|| "(no operator)".into());
                    Some(Activity {
                        name: e["name"].as_str()?.to_string(),
                        op,
                        launched,
                        dur: num(&e["dur"])?,
                    })
                })
                .collect()
        } else {
            self_times(events)
        };

        let mut by_range: HashMap<String, (f64, usize)> = HashMap::new();
        let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
        let mut by_kernel: HashMap<String, (f64, usize)> = HashMap::new();
        let mut busy = 0.0;
        for a in &activities {
            let Some(u) = counted
                .iter()
                .find(|u| u.start <= a.launched && a.launched <= u.end)
            else {
                continue;
            };
            let path: Vec<&str> = ranges
                .iter()
                .filter(|r| {
                    r.start >= u.start
                        && r.end <= u.end
                        && r.start <= a.launched
                        && a.launched <= r.end
                        && !std::ptr::eq(*r, *u)
                })
                .map(|r| r.name.as_str())
                .collect();
            let path = if path.is_empty() {
                "(no range)".to_string()
            } else {
                path.join(" > ")
            };
            for (table, key) in [
                (&mut by_range, path),
                (&mut by_op, a.op.clone()),
                (&mut by_kernel, a.name.clone()),
            ] {
                let slot = table.entry(key).or_default();
                slot.0 += a.dur;
                slot.1 += 1;
            }
            busy += a.dur;
        }
        let n = counted.len() as f64;
        let rows = |table: HashMap<String, (f64, usize)>| {
            let mut rows: Vec<Row> = table
                .into_iter()
                .map(|(name, (us, calls))| Row {
                    name,
                    ms_per_unit: us / 1e3 / n,
                    calls_per_unit: calls as f64 / n,
                    share: if busy > 0.0 { us / busy } else { 0.0 },
                })
                .collect();
            rows.sort_by(|a, b| b.ms_per_unit.total_cmp(&a.ms_per_unit));
            rows
        };
        Ok(Self {
            unit: unit.to_string(),
            units: counted.len(),
            gpu,
            wall_ms_per_unit: counted.iter().map(|u| u.end - u.start).sum::<f64>() / 1e3 / n,
            busy_ms_per_unit: busy / 1e3 / n,
            by_range: rows(by_range),
            by_op: rows(by_op),
            by_kernel: rows(by_kernel),
        })
    }

    /// The three tables as markdown, each cut to its `top` longest rows.
    pub fn markdown(&self, top: usize) -> String {
        let what = if self.gpu { "GPU" } else { "operator CPU" };
        let mut out = format!(
            "{} '{}' spans counted: {:.1} ms wall, {:.1} ms of {what} time each\n",
            self.units, self.unit, self.wall_ms_per_unit, self.busy_ms_per_unit
        );
        let mut tables = vec![("range", &self.by_range), ("operator", &self.by_op)];
        if self.gpu {
            tables.push(("kernel", &self.by_kernel));
        }
        for (title, rows) in tables {
            let mut table = MarkdownTable::new()
                .left(title)
                .right(format!("ms per {}", self.unit))
                .right("calls")
                .right("share");
            for r in rows.iter().take(top) {
                let mut name: String = r.name.chars().take(90).collect();
                if name.len() < r.name.len() {
                    name.push('…');
                }
                table.row([
                    name,
                    format!("{:.2}", r.ms_per_unit),
                    format!("{:.0}", r.calls_per_unit),
                    format!("{:.1}%", r.share * 100.0),
                ]);
            }
            if rows.len() > top {
                let rest: f64 = rows[top..].iter().map(|r| r.ms_per_unit).sum();
                table.row([
                    format!("({} more)", rows.len() - top),
                    format!("{rest:.2}"),
                    String::new(),
                    String::new(),
                ]);
            }
            out += &format!("\n{table}");
        }
        out
    }
}

/// Every CPU operator as an activity of its own, with its self time (its time less that of the
/// operators it called on its thread).
fn self_times(events: &[Value]) -> Vec<Activity> {
    let mut by_thread: HashMap<String, Vec<Span>> = HashMap::new();
    for e in events.iter().filter(|e| e["cat"] == "cpu_op") {
        if let Some(s) = span(e) {
            by_thread.entry(e["tid"].to_string()).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for mut ops in by_thread.into_values() {
        // Parents sort before the children they enclose.
        ops.sort_by(|a, b| a.start.total_cmp(&b.start).then(b.end.total_cmp(&a.end)));
        let mut child_time = vec![0.0; ops.len()];
        let mut open: Vec<usize> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            while open.last().is_some_and(|&p| ops[p].end <= op.start) {
                open.pop();
            }
            if let Some(&parent) = open.last() {
                child_time[parent] += op.end - op.start;
            }
            open.push(i);
        }
        for (op, children) in ops.iter().zip(child_time) {
            out.push(Activity {
                name: op.name.clone(),
                op: op.name.clone(),
                launched: op.start,
                dur: (op.end - op.start - children).max(0.0),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn x(cat: &str, name: &str, ts: f64, dur: f64, args: Value) -> Value {
        json!({"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "args": args})
    }

    /// Two updates; the second launches a kernel from a backward thread while its range is open
    /// on the main thread, and one kernel runs after the update it was launched in.
    fn events() -> Vec<Value> {
        let mut e = Vec::new();
        for (i, t0) in [0.0, 1000.0].into_iter().enumerate() {
            let id = 10 * i as i64;
            e.push(x("user_annotation", "update", t0, 500.0, json!({})));
            e.push(x("user_annotation", "student", t0 + 10.0, 100.0, json!({})));
            e.push(x(
                "cpu_op",
                "aten::mm",
                t0 + 20.0,
                5.0,
                json!({"External id": id + 1}),
            ));
            e.push(x(
                "cuda_runtime",
                "cudaLaunchKernel",
                t0 + 21.0,
                1.0,
                json!({"correlation": id + 2}),
            ));
            e.push(x(
                "kernel",
                "gemm",
                t0 + 600.0,
                30.0,
                json!({"correlation": id + 2, "External id": id + 1}),
            ));
            e.push(x(
                "cpu_op",
                "aten::exp",
                t0 + 200.0,
                5.0,
                json!({"External id": id + 3}),
            ));
            e.push(x(
                "cuda_runtime",
                "cudaLaunchKernel",
                t0 + 201.0,
                1.0,
                json!({"correlation": id + 4}),
            ));
            e.push(x(
                "kernel",
                "exp_kernel",
                t0 + 650.0,
                10.0,
                json!({"correlation": id + 4, "External id": id + 3}),
            ));
        }
        // Launched outside every update: not counted.
        e.push(x(
            "cuda_runtime",
            "cudaLaunchKernel",
            3000.0,
            1.0,
            json!({"correlation": 99}),
        ));
        e.push(x(
            "kernel",
            "stray",
            3001.0,
            1000.0,
            json!({"correlation": 99}),
        ));
        e
    }

    #[test]
    fn gpu_time_is_attributed_by_launch_to_ranges_operators_and_kernels() {
        let s = Summary::from_events(&events(), "update", 0).unwrap();
        assert!(s.gpu);
        assert_eq!(s.units, 2);
        assert!((s.busy_ms_per_unit - 0.040).abs() < 1e-12);
        assert!((s.wall_ms_per_unit - 0.5).abs() < 1e-12);
        let find =
            |rows: &[Row], name: &str| rows.iter().find(|r| r.name == name).cloned().unwrap();
        let student = find(&s.by_range, "student");
        assert!((student.ms_per_unit - 0.030).abs() < 1e-12);
        assert!((student.share - 0.75).abs() < 1e-12);
        assert_eq!(find(&s.by_range, "(no range)").calls_per_unit, 1.0);
        assert_eq!(find(&s.by_op, "aten::exp").calls_per_unit, 1.0);
        assert_eq!(s.by_kernel[0].name, "gemm");
        assert!(s.by_kernel.iter().all(|r| r.name != "stray"));
    }

    #[test]
    fn warm_up_spans_are_left_out_and_too_few_spans_are_an_error() {
        let s = Summary::from_events(&events(), "update", 1).unwrap();
        assert_eq!(s.units, 1);
        assert!((s.busy_ms_per_unit - 0.040).abs() < 1e-12);
        let e = Summary::from_events(&events(), "update", 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 'update' ranges"), "{e}");
        let e = Summary::from_events(&events(), "step", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 'step' ranges"), "{e}");
    }

    #[test]
    fn markdown_keeps_the_top_rows_and_totals_the_rest() {
        let s = Summary::from_events(&events(), "update", 0).unwrap();
        let md = s.markdown(1);
        assert!(md.contains("| student | 0.03 | 1 | 75.0% |"), "{md}");
        assert!(md.contains("| (1 more) | 0.01 | | |"), "{md}");
    }
}
