//! `bench kernels`: every (method, length, form) case runs in its own child process (this binary
//! with `--worker`), so each peak-memory reading starts from a clean allocator and an
//! out-of-memory failure only loses that case. Prints a table; optionally writes JSON.
use super::case::{Case, Form, Method, Shape};
use super::harness::{
    cell, device_arg, machine, median_ms, run_child, self_command, synchronize, write_json, GIB,
    MIB,
};
use super::memory::{available_host_bytes, CudaDriver, MemoryProbe};
use super::KernelArgs;
use anyhow::{bail, Context, Result};
use linearize_models::markdown_table::MarkdownTable;
use serde_json::{json, Value};
use tch::{Device, Tensor};

pub fn run(args: KernelArgs) -> Result<()> {
    let device = args.runtime.device()?;
    let shape = shape(&args, device)?;
    let iters = args.iters.unwrap_or(if device.is_cuda() { 10 } else { 3 });
    if iters == 0 {
        bail!("--iters must be >= 1");
    }
    if let Some(spec) = &args.worker {
        return worker(spec, shape, iters);
    }
    if let Some(&bad) = args.lengths.iter().find(|&&l| l < 1) {
        bail!("--lengths: {bad} is not a sequence length (>= 1)");
    }

    let budget = naive_budget(&args, device)?;
    let machine = machine(device)?;
    tracing::info!(%machine, budget_gib = budget / GIB, "benchmarking kernels");
    let mut results = Vec::new();
    for &method in &args.methods {
        for &len in &args.lengths {
            for &form in &args.forms {
                let lolcats = matches!(method, Method::LolcatsSw | Method::LolcatsTk);
                let fused =
                    lolcats || matches!(method, Method::Linear | Method::Gla | Method::Liger);
                let outcome = if form == Form::Fused && !fused {
                    skipped(
                        method,
                        form,
                        len,
                        "only linear, LoLCATs, GLA and Liger have fused forms".into(),
                    )
                } else if form == Form::Transfer && !lolcats {
                    skipped(method, form, len, "only LoLCATs has a transfer form".into())
                } else if form == Form::Naive && method.naive_bytes(&shape, len) > budget {
                    let need = method.naive_bytes(&shape, len) / GIB;
                    skipped(
                        method,
                        form,
                        len,
                        format!(
                            "naive needs ~{need:.1} GiB > {:.1} GiB budget (--naive-max-gib)",
                            budget / GIB
                        ),
                    )
                } else {
                    measure_in_child(&args, device, iters, method, form, len)?
                };
                tracing::info!(
                    method = method.name(),
                    form = form.name(),
                    len,
                    status = %outcome["status"],
                    fwd_bwd_ms = %outcome["fwd_bwd_ms"],
                    peak_bytes = %outcome["peak_bytes"],
                    note = %outcome["note"],
                    "case done"
                );
                results.push(outcome);
            }
        }
    }

    println!("{}", table(&results));
    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "settings": {
                "device": device_arg(device), "dtype": args.runtime.dtype, "batch": shape.batch,
                "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                "features": shape.features, "window": shape.window, "chunk": shape.chunk,
                "sinks": shape.sinks, "iters": iters, "naive_budget_bytes": budget,
            },
            "results": results,
        });
        write_json(path, &report)?;
        tracing::info!(path = %path.display(), "wrote results");
    }
    Ok(())
}

fn shape(args: &KernelArgs, device: Device) -> Result<Shape> {
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    for (flag, value) in [
        ("--heads", args.heads),
        ("--kv-heads", kv_heads),
        ("--head-dim", args.head_dim),
        ("--batch", args.batch),
        ("--features", args.features),
        ("--window", args.window),
        ("--chunk", args.chunk),
    ] {
        if value < 1 {
            bail!("{flag} must be >= 1, got {value}");
        }
    }
    if args.heads % kv_heads != 0 {
        bail!("--kv-heads {kv_heads} must divide --heads {}", args.heads);
    }
    if args.sinks < 0 {
        bail!("--sinks must be >= 0, got {}", args.sinks);
    }
    Ok(Shape {
        batch: args.batch,
        heads: args.heads,
        kv_heads,
        head_dim: args.head_dim,
        features: args.features,
        window: args.window,
        chunk: args.chunk,
        sinks: args.sinks,
        kind: args.runtime.kind()?,
        device,
    })
}

/// Bytes a naive case may be expected to use before it is skipped.
fn naive_budget(args: &KernelArgs, device: Device) -> Result<f64> {
    if let Some(gib) = args.naive_max_gib {
        return Ok(gib * GIB);
    }
    Ok(match device {
        Device::Cuda(i) => 0.8 * CudaDriver::load()?.total_bytes(i)? as f64,
        _ => 0.5 * available_host_bytes()? as f64,
    })
}

fn skipped(method: Method, form: Form, len: i64, note: String) -> Value {
    json!({"method": method.name(), "form": form.name(), "len": len, "status": "skipped", "note": note})
}

/// Runs one case in a child process and collects its report.
fn measure_in_child(
    args: &KernelArgs,
    device: Device,
    iters: usize,
    method: Method,
    form: Form,
    len: i64,
) -> Result<Value> {
    let spec = format!("{}:{}:{len}", method.name(), form.name());
    let mut cmd = self_command()?;
    cmd.args([
        "bench",
        "kernels",
        "--device",
        &device_arg(device),
        "--dtype",
        &args.runtime.dtype,
    ]);
    for (flag, value) in [
        ("--heads", args.heads),
        ("--kv-heads", args.kv_heads.unwrap_or(args.heads)),
        ("--head-dim", args.head_dim),
        ("--batch", args.batch),
        ("--features", args.features),
        ("--window", args.window),
        ("--chunk", args.chunk),
        ("--sinks", args.sinks),
        ("--iters", iters as i64),
    ] {
        cmd.args([flag.to_string(), value.to_string()]);
    }
    cmd.args(["--worker", &spec]);
    let base = json!({"method": method.name(), "form": form.name(), "len": len});
    let report = match run_child(cmd, &spec)? {
        Ok(report) => report,
        Err(reason) => {
            let mut failed = base;
            failed["status"] = json!("failed");
            failed["note"] = json!(reason);
            return Ok(failed);
        }
    };
    let mut ok = base;
    ok["status"] = json!("ok");
    for key in ["fwd_ms", "fwd_bwd_ms", "peak_bytes"] {
        ok[key] = report[key].clone();
    }
    Ok(ok)
}

fn parse_spec(spec: &str) -> Result<(Method, Form, i64)> {
    use clap::ValueEnum;
    let parts: Vec<&str> = spec.split(':').collect();
    let [method, form, len] = parts[..] else {
        bail!("--worker {spec:?}: expected METHOD:FORM:LEN");
    };
    let method = Method::from_str(method, false)
        .map_err(|e| anyhow::anyhow!("--worker method {method:?}: {e}"))?;
    let form =
        Form::from_str(form, false).map_err(|e| anyhow::anyhow!("--worker form {form:?}: {e}"))?;
    let len = len
        .parse()
        .with_context(|| format!("--worker length {len:?}"))?;
    Ok((method, form, len))
}

/// The child's side: set up the case, measure it, print one JSON line.
fn worker(spec: &str, shape: Shape, iters: usize) -> Result<()> {
    let (method, form, len) = parse_spec(spec)?;
    let device = shape.device;
    // Initialise the device's libraries (e.g. cuBLAS workspaces) before the baseline.
    let warm = Tensor::ones([8, 8], (shape.kind, device));
    let _ = warm.matmul(&warm);
    let case = Case::new(method, form, len, shape);
    let probe = MemoryProbe::new(device)?;
    synchronize(device);
    let baseline = probe.start()?;

    case.forward_backward()?;
    let fwd_bwd = median_ms(iters, device, || case.forward_backward())?;
    let fwd = median_ms(iters, device, || tch::no_grad(|| case.forward().map(drop)))?;
    synchronize(device);
    let peak = probe.peak_since(baseline)?;
    println!(
        "{}",
        json!({"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_bytes": peak})
    );
    Ok(())
}

/// A Markdown table of the results.
fn table(results: &[Value]) -> String {
    let mut table = MarkdownTable::new()
        .left("method")
        .right("len")
        .left("form")
        .right("fwd ms")
        .right("fwd+bwd ms")
        .right("peak MiB")
        .left("note");
    for r in results {
        table.row([
            r["method"].as_str().unwrap_or("").to_string(),
            r["len"].to_string(),
            r["form"].as_str().unwrap_or("").to_string(),
            cell(&r["fwd_ms"], 1.0, 1),
            cell(&r["fwd_bwd_ms"], 1.0, 1),
            cell(&r["peak_bytes"], MIB, 1),
            r["note"].as_str().unwrap_or("").to_string(),
        ]);
    }
    table.to_string()
}
