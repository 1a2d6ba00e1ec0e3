//! Jobs interrupted at a random step (SIGKILL, SIGTERM) or left with a damaged latest state
//! resume to trained tensors bit-identical to an uninterrupted job's; a changed recipe refuses to
//! resume and names what changed.
mod common;

use common::{
    linearize, run, send_signal, stage_tensors, stderr, train_records, TinyJob, EXIT_PREEMPTED,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::Tensor;

impl TinyJob {
    fn args<'a>(&'a self, out: &'a Path) -> Vec<&'a str> {
        vec![
            "--recipe",
            self.recipe.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]
    }

    /// Runs the job to completion in `out`.
    fn complete(&self, out: &Path) {
        let output = run(&self.args(out));
        assert!(output.status.success(), "{}", stderr(&output));
    }

    /// Starts the job in `out` and waits until it has trained past `step`.
    fn start_until(&self, out: &Path, step: u64) -> Child {
        // stderr is read at the end (the job logs only warnings, which fit the pipe).
        let mut child = linearize(&self.args(out))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the job ended before step {step}"
            );
            assert!(Instant::now() < deadline, "no step {step} within 300 s");
            if train_records(out).iter().any(|r| run_step(r) >= step) {
                return child;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The run-wide step of a metrics record (LoRA's steps follow stage 1's 24).
fn run_step(record: &serde_json::Value) -> u64 {
    let offset = if record["stage"] == "lora" { 24 } else { 0 };
    offset + record["step"].as_u64().unwrap_or(0)
}

/// A run-wide step in 3..=28 (stage 1 has 24, LoRA 6) that changes from run to run.
fn random_step() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    3 + u64::from(nanos) % 26
}

fn assert_identical(want: &[(String, Tensor)], got: &[(String, Tensor)]) {
    assert_eq!(want.len(), got.len());
    for ((name, a), (other, b)) in want.iter().zip(got) {
        assert_eq!(name, other);
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(
            a.equal(b),
            "'{name}' differs after resuming (max abs {diff})"
        );
    }
}

#[test]
fn killed_terminated_and_damaged_jobs_resume_bit_identically() {
    let job = TinyJob::new();
    let straight = job.out("straight");
    job.complete(&straight);
    let want = stage_tensors(&straight);

    // SIGKILL at a random step, then `linearize resume`.
    let killed = job.out("killed");
    let step = random_step();
    let mut child = job.start_until(&killed, step);
    child.kill().unwrap();
    child.wait().unwrap();
    let output = run(&["resume", killed.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "killed at step {step}: {}",
        stderr(&output)
    );
    assert_identical(&want, &stage_tensors(&killed));

    // SIGTERM during stage 1: a state is saved and the job exits with the documented status;
    // re-running the same command resumes it.
    let terminated = job.out("terminated");
    let step = 3 + random_step() % 18;
    let child = job.start_until(&terminated, step);
    send_signal("TERM", child.id());
    let output = child.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(EXIT_PREEMPTED),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("linearize resume"));
    job.complete(&terminated);
    assert_identical(&want, &stage_tensors(&terminated));

    // A truncated latest state: reported, and the one before it is used.
    let damaged = job.out("damaged");
    let mut child = job.start_until(&damaged, random_step());
    child.kill().unwrap();
    child.wait().unwrap();
    let latest = latest_state(&damaged);
    let params = latest.join("params.safetensors");
    let len = std::fs::metadata(&params).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&params)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let output = linearize(&["resume", damaged.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(
        log.contains("skipping damaged training state") && log.contains(latest.to_str().unwrap()),
        "{log}"
    );
    assert_identical(&want, &stage_tensors(&damaged));
}

#[test]
fn a_changed_recipe_refuses_to_resume_unless_restarted() {
    let job = TinyJob::new();
    let out = job.out("run");
    let mut child = job.start_until(&out, 2);
    child.kill().unwrap();
    child.wait().unwrap();

    let mut args = job.args(&out);
    args.extend(["--set", "attention_transfer.optimizer.lr=0.05"]);
    let output = run(&args);
    assert!(!output.status.success());
    let e = stderr(&output);
    assert!(
        e.contains("the recipe changed") && e.contains("attention_transfer.optimizer.lr"),
        "{e}"
    );

    args.push("--restart");
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let aside: Vec<_> = std::fs::read_dir(job.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("run.restarted-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the earlier attempt is kept");
}

/// The newest `state/step-*` directory.
fn latest_state(run_dir: &Path) -> PathBuf {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(run_dir.join("state"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("step-")
        })
        .collect();
    steps.sort();
    steps.pop().expect("a saved state")
}

#[test]
fn a_second_process_on_a_live_run_directory_is_refused_and_the_first_finishes() {
    let job = TinyJob::new();
    let out = job.out("run");
    // More steps than the other tests, so the job is still training while the others try.
    let mut args = job.args(&out);
    args.extend(["--set", "attention_transfer.max_steps=60"]);
    let mut first = linearize(&args).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while train_records(&out).is_empty() {
        assert!(first.try_wait().unwrap().is_none(), "the job ended early");
        assert!(Instant::now() < deadline, "no training step within 300 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let expected = format!(
        "run directory {} in use by pid {}",
        out.display(),
        first.id()
    );
    let out_str = out.to_str().unwrap();
    for second in [vec!["resume", out_str], args.clone()] {
        let started = Instant::now();
        let output = run(&second);
        let e = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{second:?}: {e}");
        assert!(e.contains(&expected), "{second:?}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{second:?} was refused only after {:?}",
            started.elapsed()
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first job ended before {second:?} was refused; the test needs it still running"
        );
    }
    let output = first.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    // The lock ends with its holder: the finished run can be resumed again.
    let output = run(&["resume", out_str]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn a_damaged_stage_output_runs_its_stage_again() {
    let job = TinyJob::new();
    let out = job.out("run");
    job.complete(&out);
    let stages = out.join("stages");
    let adapters = std::fs::read(out.join("adapters.safetensors")).unwrap();
    for (stage, damage) in [("attention_transfer", "flip"), ("lora", "truncate")] {
        let path = stages.join(format!("{stage}.safetensors"));
        let want = std::fs::read(&path).unwrap();
        let mut bytes = want.clone();
        match damage {
            "flip" => *bytes.last_mut().unwrap() ^= 0x40,
            _ => bytes.truncate(bytes.len() / 2),
        }
        std::fs::write(&path, &bytes).unwrap();
        let output = run(&["resume", out.to_str().unwrap()]);
        let log = stderr(&output);
        assert!(output.status.success(), "{stage}: {log}");
        assert!(
            log.contains("damaged") && log.contains(path.to_str().unwrap()),
            "{stage}: {log}"
        );
        assert!(
            std::fs::read(&path).unwrap() == want,
            "{stage}: the stage ran again to other tensors"
        );
        assert!(
            std::fs::read(out.join("adapters.safetensors")).unwrap() == adapters,
            "{stage}: the export changed"
        );
    }
}

#[test]
fn sigterm_during_evaluation_exits_75_and_resume_completes() {
    use std::io::{BufRead, BufReader};
    let job = TinyJob::new();
    let train = job.dir.path().join("train.txt");
    let recipe = common::write_recipe(
        job.dir.path(),
        &format!(
            "eval:\n  perplexity: {{files: [{}], ctx: 64}}\n  attention_error: {{enabled: false}}\n  \
             passkey: {{enabled: false}}\n  mqar: {{enabled: false}}\n  \
             multiple_choice: {{enabled: false}}\n  speed: {{enabled: false}}\n  \
             generations: {{enabled: false}}\n  decode_check: {{enabled: false}}\n",
            train.display()
        ),
    );
    let out = job.out("run");
    let mut child = linearize(&[
        "--recipe",
        recipe.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ])
    .env("RUST_LOG", "info")
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Training is over once evaluation starts: only the phase's own polling can stop the job.
    let mut log = String::new();
    let mut signalled = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !signalled && line.contains("eval: perplexity and KL") {
            send_signal("TERM", child.id());
            signalled = true;
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(signalled, "evaluation never started: {log}");
    assert_eq!(status.code(), Some(EXIT_PREEMPTED), "{log}");
    assert!(log.contains("linearize resume"), "{log}");
    assert!(
        !out.join("adapters.safetensors").exists(),
        "exported after SIGTERM"
    );
    let output = run(&["resume", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(out.join("adapters.safetensors").exists());
    assert!(out.join("report/eval.json").exists());
}

/// Every file under `dir`, by path relative to it, with its bytes.
fn tree_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// The exported files of a finished run: adapters, merged model, PEFT directory.
fn exports(run_dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for name in ["model", "peft"] {
        for (path, bytes) in tree_bytes(&run_dir.join(name)) {
            files.push((Path::new(name).join(path), bytes));
        }
    }
    let adapters = std::fs::read(run_dir.join("adapters.safetensors")).unwrap();
    files.push(("adapters.safetensors".into(), adapters));
    files
}

/// Runs `linearize ARGS` with info logs and sends SIGTERM on the first log line containing
/// `at`; returns the exit status and the log.
fn terminate_at(args: &[&str], at: &str) -> (Option<i32>, String) {
    use std::io::{BufRead, BufReader};
    let mut child = linearize(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut signalled = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if !signalled && line.contains(at) {
            send_signal("TERM", child.id());
            signalled = true;
            log.push_str("<SIGTERM sent>\n");
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(signalled, "no log line with {at:?}: {log}");
    (status.code(), log)
}

/// SIGTERM while a long document is tokenised, then, resumed, while the last export is written:
/// each phase stops within one unit of work (a piece of the document, a tensor) with exit 75 and
/// leaves nothing half-written; `resume` then completes, and the exported files are
/// byte-identical to an uninterrupted run's.
#[test]
fn sigterm_during_data_preparation_and_export_exits_75_and_resume_is_identical() {
    let job = TinyJob::new();
    // One 4 MB document: tokenised in 1 MiB pieces for seconds, long enough to be interrupted.
    let train = job.dir.path().join("train.txt");
    let text = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, text.repeat(4_000_000 / text.len() + 1)).unwrap();

    let out = job.out("run");
    let (status, log) = terminate_at(&job.args(&out), "tokenising");
    assert_eq!(status, Some(EXIT_PREEMPTED), "{log}");
    let after = log.split("<SIGTERM sent>").nth(1).unwrap();
    assert!(
        !after.contains("tokenised"),
        "tokenisation ran to its end: {log}"
    );
    assert!(log.contains("linearize resume"), "{log}");

    let resume = ["resume", out.to_str().unwrap()];
    let (status, log) = terminate_at(&resume, "exporting the PEFT adapters");
    assert_eq!(status, Some(EXIT_PREEMPTED), "{log}");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "a stopped export left {leftovers:?}");
    let output = run(&resume);
    assert!(output.status.success(), "{}", stderr(&output));

    let straight = job.out("straight");
    job.complete(&straight);
    let want = exports(&straight);
    let got = exports(&out);
    assert_eq!(
        want.iter().map(|f| &f.0).collect::<Vec<_>>(),
        got.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((path, a), (_, b)) in want.iter().zip(&got) {
        assert!(
            a == b,
            "{} differs from the uninterrupted run's",
            path.display()
        );
    }
}
