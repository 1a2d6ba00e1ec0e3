//! Chat teacher samples end to end (`data.teacher_samples` with `chat: true`): the tiny job's
//! teacher (a random model with SmolLM2's tokenizer and chat template) answers prompts of a
//! prompts file, each sample opening with the prompt exactly as the chat template renders it; a
//! job stopped while sampling keeps its finished samples and samples only the missing ones; a
//! teacher without a chat template is refused in one line naming the key and the model.
mod common;

use common::{run, stderr, TinyJob};
use linearize_models::chat_template::ChatMessage;
use linearize_models::tokenizer::Tokenizer;
use std::fs;
use std::path::Path;

/// Tokens per stored sequence: the fixture's seq_len 64 plus the next-token target.
const WINDOW: usize = 65;
const PROMPTS: [&str; 3] = [
    "Name a color.",
    "Why is the sky blue?",
    "Write a haiku about rain.",
];

/// The job's arguments: the tiny recipe with three chat samples (each used twice), a short
/// stage 1 and no LoRA, into `out`.
fn args(job: &TinyJob, out: &Path) -> Vec<String> {
    let seeds = job.dir.path().join("seeds.txt");
    fs::write(&seeds, format!("# chat seeds\n{}\n", PROMPTS.join("\n"))).unwrap();
    [
        "--recipe",
        job.recipe.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--set",
        &format!(
            "data.teacher_samples={{num_sequences: 3, prompts_file: {}, chat: true, weight: 2}}",
            seeds.display()
        ),
        "--set",
        "attention_transfer.max_steps=6",
        "--set",
        "lora=null",
    ]
    .map(String::from)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn stored(run_dir: &Path) -> Vec<Vec<u32>> {
    let bytes = fs::read(run_dir.join("teacher-samples/samples.u32")).unwrap();
    assert_eq!(bytes.len() % (4 * WINDOW), 0);
    let ids: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ids.chunks(WINDOW).map(<[u32]>::to_vec).collect()
}

#[test]
fn chat_samples_open_with_the_rendered_prompt_and_survive_an_interrupted_sampling() {
    let job = TinyJob::new();
    let first = job.out("first");
    let args = args(&job, &first);

    let plan = run(&[strs(&args), vec!["--dry-run"]].concat());
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "{}", stderr(&plan));
    assert!(
        text.contains("plus 3 sequences sampled from the teacher")
            && text.contains("seeds.txt")
            && text.contains("(chat)")
            && text.contains("each used 2 times per epoch"),
        "{text}"
    );

    let output = run(&strs(&args));
    assert!(output.status.success(), "{}", stderr(&output));
    let samples = stored(&first);
    assert_eq!(samples.len(), 3);
    // Sequence i opens with prompt i as the model's chat template renders one user turn with the
    // generation prompt (the system turn, the question, the assistant's header), encoded as
    // transformers' apply_chat_template(tokenize=True) does: without added special tokens.
    let tokenizer = Tokenizer::from_dir(&job.dir.path().join("model")).unwrap();
    let rendered = |prompt: &str| {
        let text = tokenizer
            .apply_chat_template(&[ChatMessage::user(prompt)], true)
            .unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
        tokenizer.encode(&text, false).unwrap()
    };
    for (sample, prompt) in samples.iter().zip(PROMPTS) {
        let ids = rendered(prompt);
        assert!(ids.len() < WINDOW);
        assert_eq!(&sample[..ids.len()], &ids[..], "{prompt}");
    }
    let header: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(first.join("teacher-samples/samples.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(header["settings"]["prompts"], serde_json::json!(PROMPTS));
    assert!(header["settings"]["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));

    // A job stopped while sampling, after its first sequence was stored and while the second
    // was being written: the run directory holds the recipe, one sequence (marked here) and a
    // partial record. Its resume keeps the sequence and samples the two missing ones.
    let stopped = job.out("stopped");
    fs::create_dir_all(stopped.join("teacher-samples")).unwrap();
    for file in ["recipe.resolved.yaml", "teacher-samples/samples.json"] {
        fs::copy(first.join(file), stopped.join(file)).unwrap();
    }
    let mut kept: Vec<u8> = [42u32; WINDOW]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    kept.extend_from_slice(&[7, 0, 0, 0, 9]);
    fs::write(stopped.join("teacher-samples/samples.u32"), kept).unwrap();
    let output = run(&["resume", stopped.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let resumed = stored(&stopped);
    assert_eq!(resumed.len(), 3);
    assert_eq!(resumed[0], [42; WINDOW], "the stored sequence is kept");
    for (sample, prompt) in resumed.iter().zip(PROMPTS).skip(1) {
        let ids = rendered(prompt);
        assert_eq!(&sample[..ids.len()], &ids[..], "{prompt}");
    }
    assert!(stopped
        .join("stages/attention_transfer.safetensors")
        .exists());
}

#[test]
fn a_teacher_without_a_chat_template_is_refused_in_one_line() {
    let job = TinyJob::new();
    let config_path = job.dir.path().join("model/tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    fs::write(&config_path, config.to_string()).unwrap();

    let out = job.out("refused");
    let args = args(&job, &out);
    for dry_run in [true, false] {
        let mut call = strs(&args);
        if dry_run {
            call.push("--dry-run");
        }
        let output = run(&call);
        let e = stderr(&output);
        assert!(!output.status.success(), "{e}");
        let line = e
            .lines()
            .find(|l| l.contains("data.teacher_samples.chat"))
            .unwrap_or_else(|| panic!("{e}"));
        let model = job.dir.path().join("model");
        assert!(
            line.contains("has no chat template") && line.contains(model.to_str().unwrap()),
            "{line}"
        );
        assert!(!out.join("teacher-samples").exists());
    }
}
