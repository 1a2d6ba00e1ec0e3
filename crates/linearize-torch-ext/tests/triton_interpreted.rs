//! The fused LoLCATs kernels' logic, checked on the CPU: `triton/check_lolcats.py` runs them in
//! Triton's interpreter against the quadratic definition (output and every gradient, both window
//! shapes). The GPU run of the compiled kernels is `linearize-attention`'s
//! `fused_kernels_match_naive_on_cuda`.
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

#[test]
fn lolcats_kernels_match_the_definition_in_the_interpreter() {
    let python = python();
    let out = Command::new(&python)
        .arg("triton/check_lolcats.py")
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
    assert_eq!(text.matches("ok seed").count(), 12, "{text}");
}
