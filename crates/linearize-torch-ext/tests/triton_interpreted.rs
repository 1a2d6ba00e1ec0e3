//! The fused kernels' logic, checked on the CPU: `triton/check_lolcats.py`,
//! `triton/check_linear_attn.py` and `triton/check_gla.py` run them in Triton's interpreter
//! against the quadratic definitions (output and every gradient). The GPU runs of the compiled
//! kernels are `linearize-attention`'s `fused_kernels_match_naive_on_cuda` tests (lolcats,
//! linear_attn, gla, liger).
use std::path::PathBuf;
use std::process::Command;

/// `$LINEARIZE_PYTHON`, or the workspace's virtual environment that `scripts/setup.sh` makes.
fn python() -> PathBuf {
    std::env::var_os("LINEARIZE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python3")
        })
}

/// Runs `triton/<script>` in the interpreter and returns its output; panics when it fails.
fn interpret(script: &str) -> String {
    let python = python();
    let out = Command::new(&python)
        .arg(format!("triton/{script}"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TRITON_INTERPRET", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (scripts/setup.sh makes it; LINEARIZE_PYTHON overrides): {e}",
                python.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn lolcats_kernels_match_the_definition_in_the_interpreter() {
    let text = interpret("check_lolcats.py");
    assert_eq!(text.matches("ok seed").count(), 24, "{text}");
}

#[test]
fn gla_kernels_match_the_definition_in_the_interpreter() {
    let text = interpret("check_gla.py");
    assert_eq!(text.matches("ok seed").count(), 6, "{text}");
}

#[test]
fn linear_attn_kernels_match_the_definition_in_the_interpreter() {
    let text = interpret("check_linear_attn.py");
    assert_eq!(text.matches("ok seed").count(), 7, "{text}");
}
