//! A stage with its own sequence length and batch (a long-context stage): the dry run says so,
//! the stage trains on the packed text re-cut at that length (its records count its tokens), and
//! a length that teacher samples cannot follow is refused.
mod common;

use common::{run, stderr, train_records, TinyJob};

#[test]
fn a_long_context_stage_trains_on_the_text_recut_at_its_length() {
    let job = TinyJob::new();
    let recipe = job.recipe.to_str().unwrap();
    let out = job.out("long");
    // The tiny job packs 64-token sequences in batches of 2; its LoRA stage runs at 256 x 1.
    let sets = [
        "--set",
        "attention_transfer.max_steps=3",
        "--set",
        "attention_transfer.schedule.warmup_steps=1",
        "--set",
        "lora.max_steps=3",
        "--set",
        "lora.log_every=1",
        "--set",
        "lora.seq_len=256",
        "--set",
        "lora.batch_size=1",
        "--set",
        "eval=null",
    ];
    let mut args = vec!["--recipe", recipe, "--output", out.to_str().unwrap()];
    args.extend(sets);

    let dry = run(&[args.as_slice(), &["--dry-run"]].concat());
    assert!(dry.status.success(), "{}", stderr(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout);
    let lora_line = plan.lines().find(|l| l.starts_with("stage 2")).unwrap();
    assert!(
        lora_line.contains("(this stage: seq_len 256, batch 1)")
            && lora_line.contains("of 256 tokens"),
        "{plan}"
    );
    let stage1_line = plan.lines().find(|l| l.starts_with("stage 1")).unwrap();
    assert!(!stage1_line.contains("this stage"), "{plan}");

    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let tokens = |stage: &str| -> Vec<u64> {
        train_records(&out)
            .iter()
            .filter(|r| r["stage"] == stage)
            .map(|r| r["tokens"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(tokens("lora"), [256, 512, 768]);
    assert_eq!(tokens("attention_transfer").last(), Some(&(3 * 2 * 64)));

    // Teacher samples are sampled at data.seq_len: a stage of another length is refused.
    let refused = run(&[
        args.as_slice(),
        &[
            "--set",
            "data.teacher_samples={num_sequences: 2}",
            "--dry-run",
        ],
    ]
    .concat());
    let e = stderr(&refused);
    assert!(
        !refused.status.success() && e.contains("lora.seq_len") && e.contains("teacher_samples"),
        "{e}"
    );
    let e = stderr(&run(&[
        args.as_slice(),
        &["--set", "lora.seq_len=0", "--dry-run"],
    ]
    .concat()));
    assert!(e.contains("seq_len must be >= 1"), "{e}");
}
