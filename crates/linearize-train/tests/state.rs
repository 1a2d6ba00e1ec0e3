//! Saving, verifying, falling back and pruning resumable training states.
use linearize_train::schedule::ScheduleState;
use linearize_train::state::{
    latest_valid_state, load_best, recipe_hash, save_best, save_state, states_dir, SeedStream,
    StateTensors, TrainState,
};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tch::{Kind, Tensor};

fn sample_state(run_step: u64) -> TrainState {
    TrainState {
        stage: "attention_transfer".into(),
        step: run_step,
        run_step,
        tokens_seen: run_step * 4096,
        best_val_loss: Some(0.1 + 1.0 / 3.0),
        schedule: ScheduleState::Plateau {
            lr: 0.01 / 3.0,
            best: Some(1.0 / 7.0),
            bad_evals: 2,
            cooldown_left: 1,
        },
        rng: SeedStream {
            seed: 42,
            drawn: run_step,
        },
        data_cursor: serde_json::json!({"epoch": 1, "offset": run_step * 8, "files": ["a.txt"]}),
        recipe_hash: recipe_hash("model: x\n"),
    }
}

fn sample_tensors(shift: f64) -> StateTensors {
    let w = (Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3]) / 7.0 + shift)
        .set_requires_grad(true);
    let lora =
        (Tensor::arange(4, (Kind::Float, tch::Device::Cpu)) * -0.3 + shift).to_kind(Kind::BFloat16);
    StateTensors {
        params: vec![
            ("layers.0.w".into(), w),
            ("layers.0.lora_a".into(), lora.shallow_clone()),
        ],
        optimizer: vec![
            (
                "layers.0.lora_a.exp_avg".into(),
                lora.to_kind(Kind::Float) * 1e-3,
            ),
            ("layers.0.lora_a.master".into(), lora.to_kind(Kind::Float)),
            ("layers.0.lora_a.step".into(), Tensor::from(17i64)),
        ],
    }
}

fn bytes(t: &Tensor) -> (Kind, Vec<i64>, Vec<u8>) {
    let t = t.detach().contiguous();
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, t.numel());
    (t.kind(), t.size(), out)
}

fn assert_same_tensors(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    let mut a: Vec<_> = a.iter().map(|(n, t)| (n.clone(), bytes(t))).collect();
    let mut b: Vec<_> = b.iter().map(|(n, t)| (n.clone(), bytes(t))).collect();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a, b);
}

fn step_dirs(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(states_dir(run))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Runs `f` with `tracing` output captured, returns its result and the log text.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let result = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    (result, logs)
}

fn save(run: &Path, run_step: u64, keep_last: usize) -> PathBuf {
    save_state(
        run,
        &sample_state(run_step),
        &sample_tensors(run_step as f64),
        keep_last,
    )
    .unwrap()
}

#[test]
fn round_trip_is_bit_identical() {
    let run = tempfile::tempdir().unwrap();
    let state = sample_state(400);
    let tensors = sample_tensors(0.5);
    let dir = save_state(run.path(), &state, &tensors, 3).unwrap();
    assert_eq!(dir, run.path().join("state/step-000400"));
    let loaded = latest_valid_state(run.path()).unwrap().expect("a state");
    assert_eq!(loaded.dir, dir);
    assert_eq!(loaded.state, state);
    assert_same_tensors(&loaded.tensors.params, &tensors.params);
    assert_same_tensors(&loaded.tensors.optimizer, &tensors.optimizer);
    loaded.ensure_recipe(&recipe_hash("model: x\n")).unwrap();
    let err = loaded
        .ensure_recipe(&recipe_hash("model: y\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("different recipe"), "{err}");
}

#[test]
fn checksum_list_is_sha256sum_compatible() {
    let run = tempfile::tempdir().unwrap();
    let dir = save(run.path(), 5, 1);
    let status = std::process::Command::new("sha256sum")
        .args(["--check", "--quiet", "SHA256SUMS"])
        .current_dir(&dir)
        .status()
        .expect("sha256sum runs");
    assert!(status.success());
}

#[test]
fn no_state_yet_is_none() {
    let run = tempfile::tempdir().unwrap();
    assert!(latest_valid_state(run.path()).unwrap().is_none());
    fs::create_dir_all(states_dir(run.path())).unwrap();
    assert!(latest_valid_state(run.path()).unwrap().is_none());
}

#[test]
fn truncated_file_falls_back_to_the_previous_state() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 5);
    let newest = save(run.path(), 200, 5);
    let file = newest.join("optimizer.safetensors");
    let len = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let (loaded, logs) = with_logs(|| latest_valid_state(run.path()).unwrap().unwrap());
    assert_eq!(loaded.state.run_step, 100);
    assert!(
        logs.contains("WARN") && logs.contains("step-000200"),
        "{logs}"
    );
    assert!(
        logs.contains("checksum mismatch for optimizer.safetensors"),
        "{logs}"
    );
}

#[test]
fn flipped_byte_falls_back_to_the_previous_state() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 5);
    let newest = save(run.path(), 200, 5);
    let file = newest.join("params.safetensors");
    let mut data = fs::read(&file).unwrap();
    let last = data.len() - 3;
    data[last] ^= 0x01;
    fs::write(&file, data).unwrap();

    let (loaded, logs) = with_logs(|| latest_valid_state(run.path()).unwrap().unwrap());
    assert_eq!(loaded.state.run_step, 100);
    assert!(
        logs.contains("step-000200") && logs.contains("params.safetensors"),
        "{logs}"
    );
}

#[test]
fn unparsable_json_falls_back_even_with_matching_checksums() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 5);
    let newest = save(run.path(), 200, 5);
    fs::write(newest.join("state.json"), b"{\"format\": 1, \"state\": {").unwrap();
    // Recompute the list so that only the parse can catch it.
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "sha256sum optimizer.safetensors params.safetensors state.json > SHA256SUMS",
        ])
        .current_dir(&newest)
        .status()
        .unwrap();
    assert!(status.success());

    let (loaded, logs) = with_logs(|| latest_valid_state(run.path()).unwrap().unwrap());
    assert_eq!(loaded.state.run_step, 100);
    assert!(logs.contains("parsing state.json"), "{logs}");
}

#[test]
fn unlisted_or_missing_files_make_a_state_damaged() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 5);
    let newest = save(run.path(), 200, 5);
    fs::write(newest.join("stray.bin"), b"x").unwrap();
    let (loaded, logs) = with_logs(|| latest_valid_state(run.path()).unwrap().unwrap());
    assert_eq!(loaded.state.run_step, 100);
    assert!(logs.contains("stray.bin is not listed"), "{logs}");

    fs::remove_file(newest.join("stray.bin")).unwrap();
    fs::remove_file(newest.join("SHA256SUMS")).unwrap();
    let (loaded, logs) = with_logs(|| latest_valid_state(run.path()).unwrap().unwrap());
    assert_eq!(loaded.state.run_step, 100);
    assert!(logs.contains("reading SHA256SUMS"), "{logs}");
}

#[test]
fn all_states_damaged_is_an_error_not_a_fresh_start() {
    let run = tempfile::tempdir().unwrap();
    let only = save(run.path(), 100, 5);
    fs::write(only.join("state.json"), b"garbage").unwrap();
    let err = format!("{:#}", latest_valid_state(run.path()).unwrap_err());
    assert!(err.contains("none of the 1 states"), "{err}");
}

#[test]
fn keeps_only_the_last_k_states() {
    let run = tempfile::tempdir().unwrap();
    for step in [100, 200, 300, 400, 500] {
        save(run.path(), step, 2);
    }
    assert_eq!(step_dirs(run.path()), ["step-000400", "step-000500"]);
    assert_eq!(
        latest_valid_state(run.path())
            .unwrap()
            .unwrap()
            .state
            .run_step,
        500
    );
}

#[test]
fn saving_an_earlier_step_removes_the_abandoned_later_states() {
    let run = tempfile::tempdir().unwrap();
    for step in [100, 200, 300] {
        save(run.path(), step, 5);
    }
    // Resumed from 100 (say 200 and 300 were damaged); the next save is 150.
    save(run.path(), 150, 5);
    assert_eq!(step_dirs(run.path()), ["step-000100", "step-000150"]);
}

#[test]
fn leftovers_of_an_interrupted_save_are_ignored_and_removed() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 5);
    let root = states_dir(run.path());
    // A build directory of a save killed half-way (another process id).
    let partial = root.join(".step-000200.tmp-999999");
    fs::create_dir(&partial).unwrap();
    fs::write(partial.join("params.safetensors"), b"partial").unwrap();
    // A replaced directory moved aside just before the new one was renamed in.
    let moved = root.join("best.old.tmp");
    save_best(run.path(), &sample_state(50), &sample_tensors(0.0)).unwrap();
    fs::rename(root.join("best"), &moved).unwrap();

    let loaded = latest_valid_state(run.path()).unwrap().unwrap();
    assert_eq!(loaded.state.run_step, 100);
    assert_eq!(step_dirs(run.path()), ["best", "step-000100"]);
    assert_eq!(load_best(run.path()).unwrap().unwrap().state.run_step, 50);
}

#[test]
fn best_state_is_kept_apart_from_the_step_states() {
    let run = tempfile::tempdir().unwrap();
    assert!(load_best(run.path()).unwrap().is_none());
    save_best(run.path(), &sample_state(100), &sample_tensors(1.0)).unwrap();
    for step in [100, 200, 300] {
        save(run.path(), step, 1);
    }
    let best_tensors = sample_tensors(2.0);
    save_best(run.path(), &sample_state(200), &best_tensors).unwrap();
    assert_eq!(step_dirs(run.path()), ["best", "step-000300"]);
    let best = load_best(run.path()).unwrap().unwrap();
    assert_eq!(best.state.run_step, 200);
    assert_same_tensors(&best.tensors.params, &best_tensors.params);
    assert_eq!(
        latest_valid_state(run.path())
            .unwrap()
            .unwrap()
            .state
            .run_step,
        300
    );
}

#[test]
fn seed_stream_reseeds_torch_reproducibly() {
    let draw = |seed| {
        let mut stream = SeedStream::new(seed);
        stream.reseed_torch();
        Tensor::rand([4], (Kind::Float, tch::Device::Cpu))
    };
    assert!(draw(1).equal(&draw(1)));
    assert!(!draw(1).equal(&draw(2)));
}

#[test]
fn a_damaged_best_state_is_treated_as_absent_with_a_warning() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 2);
    let best = save_best(run.path(), &sample_state(100), &sample_tensors(1.0)).unwrap();
    let params = best.join("params.safetensors");
    let len = fs::metadata(&params).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&params)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (loaded, logs) = with_logs(|| load_best(run.path()).unwrap());
    assert!(loaded.is_none());
    assert!(
        logs.contains("ignoring the damaged best state") && logs.contains("best"),
        "{logs}"
    );
    // The step state is untouched, and the next best replaces the damaged one.
    assert_eq!(
        latest_valid_state(run.path())
            .unwrap()
            .unwrap()
            .state
            .run_step,
        100
    );
    save_best(run.path(), &sample_state(100), &sample_tensors(1.0)).unwrap();
    assert!(load_best(run.path()).unwrap().is_some());
}

#[test]
fn a_state_that_verifies_but_does_not_fit_falls_back_to_the_previous_one() {
    let run = tempfile::tempdir().unwrap();
    save(run.path(), 100, 3);
    let newest = save(run.path(), 200, 3);
    // The job's check: run step 200 is "impossible" for it.
    let fits = |s: &linearize_train::state::LoadedState| {
        anyhow::ensure!(
            s.state.run_step < 150,
            "step {} is impossible",
            s.state.run_step
        );
        Ok(())
    };
    let (loaded, logs) = with_logs(|| {
        linearize_train::state::latest_fitting_state(run.path(), &fits)
            .unwrap()
            .unwrap()
    });
    assert_eq!(loaded.state.run_step, 100);
    assert!(
        logs.contains("skipping")
            && logs.contains(newest.to_str().unwrap())
            && logs.contains("impossible"),
        "{logs}"
    );
    // When none fits, the job is told so rather than starting over in silence.
    let none = |_: &linearize_train::state::LoadedState| anyhow::bail!("wrong shapes");
    let err = linearize_train::state::latest_fitting_state(run.path(), &none).unwrap_err();
    assert!(
        format!("{err:#}").contains("none of the 2 states"),
        "{err:#}"
    );
}
