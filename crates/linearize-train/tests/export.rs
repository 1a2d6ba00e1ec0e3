//! Export round trips on a tiny converted Llama with LoRA: the merged `model/` directory and the
//! base model plus `adapters.safetensors` load back with the in-memory model's logits; sharding
//! writes an index; bad inputs give errors naming the file and tensor.
mod common;

use common::{
    converted, lolcats, max_abs_diff, probe_logits, rng_lock, save_hf_dir, tiny_config, tiny_model,
};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_models::weights::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use linearize_train::convert::{
    convert, ConversionConfig, ConvertedLayers, LayerSelection, LayerTypes,
};
use linearize_train::export::{
    export_adapters, export_model, load_model, EvalRow, EvalTable, ExportInfo, ExportOptions,
    LinearizeSection, SECTION_KEY,
};
use linearize_train::lora::{LoraAdapters, LoraSettings};
use safetensors::tensor::{Dtype, SafeTensors};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// A converted tiny model with adapters whose tensors are all random (a trained state: B is
/// not zero, so the adapters change the logits), and its base model saved beside it.
fn trained(base_dir: &Path) -> (Model, ConvertedLayers, LoraAdapters) {
    let (mut model, layers) = converted(1);
    save_hf_dir(&model, base_dir);
    std::fs::write(base_dir.join("tokenizer.json"), "{}").unwrap();
    let settings = LoraSettings {
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        ..LoraSettings::default()
    };
    let lora = LoraAdapters::install(&mut model, &settings, 3).unwrap();
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (_, t) in lora
            .named_parameters()
            .iter()
            .chain(&layers.named_parameters())
        {
            let noise = Tensor::randn_like(t) * 0.05;
            let _ = t.shallow_clone().g_add_(&noise);
        }
    });
    (model, layers, lora)
}

fn info(base_dir: &Path) -> ExportInfo {
    ExportInfo {
        base_model: "test/tiny-llama".into(),
        base_revision: Some("abc123".into()),
        base_dir: base_dir.to_owned(),
        recipe_hash: "test-recipe".into(),
        data: "counting sequences".into(),
        tokens: vec![("attention_transfer".into(), 1000), ("lora".into(), 2000)],
        eval: Some(EvalTable {
            columns: vec!["ppl".into()],
            rows: vec![
                EvalRow {
                    model: "teacher".into(),
                    values: vec![Some(12.5)],
                },
                EvalRow {
                    model: "converted".into(),
                    values: vec![Some(13.25)],
                },
            ],
        }),
    }
}

fn f32_options() -> ExportOptions {
    ExportOptions {
        dtype: Kind::Float,
        ..ExportOptions::default()
    }
}

#[test]
fn merged_model_round_trips_with_its_section_tokenizer_and_card() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let (model, layers, lora) = trained(&base);
    let want = probe_logits(&model);
    let dir = root.path().join("model");
    export_model(
        &dir,
        &model,
        &layers,
        Some(&lora),
        &info(&base),
        &f32_options(),
    )
    .unwrap();

    let loaded = load_model(&dir, None, Device::Cpu, Kind::Float).unwrap();
    let diff = max_abs_diff(&probe_logits(&loaded.model), &want);
    assert!(diff <= 1e-5, "merged model logits differ by {diff}");
    assert!(loaded.lora.is_none());
    assert_eq!(loaded.converted.as_ref().unwrap().indices(), [0, 2]);
    assert!(loaded.model.mixer(0).name().starts_with("lolcats-sw4"));
    assert_eq!(loaded.model.mixer(1).name(), "softmax");

    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let section = LinearizeSection::of_config(&cfg, "config.json")
        .unwrap()
        .unwrap();
    assert_eq!(section, loaded.section.unwrap());
    assert_eq!(section.layers.len(), 3);
    assert_eq!(section.layers[0].attention.window_size, Some(4));
    assert_eq!(section.base_revision.as_deref(), Some("abc123"));
    assert_eq!(section.lora.as_ref().unwrap().rank, 8);
    assert_eq!(cfg.torch_dtype.as_deref(), Some("float32"));
    assert!(dir.join("tokenizer.json").is_file());
    assert!(dir.join(SINGLE_FILE).is_file() && !dir.join(INDEX_FILE).exists());
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for needle in [
        "base_model: test/tiny-llama",
        "lolcats-sw4",
        "| 1 | `softmax`",
        "| converted | 13.2500 |",
        "lora: 2000 tokens",
    ] {
        assert!(card.contains(needle), "card lacks {needle:?}:\n{card}");
    }

    // The default export is bf16: every tensor stored so, and the model still loads.
    let bf16_dir = root.path().join("model-bf16");
    export_model(
        &bf16_dir,
        &model,
        &layers,
        Some(&lora),
        &info(&base),
        &ExportOptions::default(),
    )
    .unwrap();
    let ckpt = Checkpoint::open(&bf16_dir).unwrap();
    assert!(ckpt
        .names()
        .all(|n| ckpt.info(n).unwrap().dtype == Dtype::BF16));
    let bf16 = load_model(&bf16_dir, None, Device::Cpu, Kind::Float).unwrap();
    assert!(max_abs_diff(&probe_logits(&bf16.model), &want) < 0.1);

    // A plain HF directory loads as the teacher.
    let teacher = load_model(&base, None, Device::Cpu, Kind::Float).unwrap();
    assert!(teacher.converted.is_none() && teacher.section.is_none());
    assert_eq!(teacher.model.mixer(0).name(), "softmax");
}

#[test]
fn base_plus_adapters_round_trips() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let (model, layers, lora) = trained(&base);
    let want = probe_logits(&model);
    let path = root.path().join("adapters.safetensors");
    export_adapters(&path, &model, &layers, Some(&lora), &info(&base)).unwrap();

    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap();
    assert_eq!(meta["linearize.recipe_hash"], "test-recipe");
    assert_eq!(meta["linearize.base_model"], "test/tiny-llama");
    assert_eq!(meta["linearize.base_revision"], "abc123");
    assert_eq!(meta["linearize.tool_version"], env!("CARGO_PKG_VERSION"));
    assert!(meta["linearize.layers"].contains("lolcats"));
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let stored = file.names().len();
    assert_eq!(
        stored,
        layers.named_parameters().len() + lora.named_parameters().len()
    );
    assert!(
        file.names().iter().all(|n| !n.ends_with("q_proj.weight")),
        "only trained tensors"
    );

    let loaded = load_model(&base, Some(&path), Device::Cpu, Kind::Float).unwrap();
    let diff = max_abs_diff(&probe_logits(&loaded.model), &want);
    assert!(diff <= 1e-5, "base + adapters logits differ by {diff}");
    assert_eq!(loaded.lora.as_ref().unwrap().len(), 15);
    assert_eq!(loaded.section.unwrap().recipe_hash, "test-recipe");
}

#[test]
fn a_conversion_without_parameters_exports_and_reloads() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let mut model = tiny_model();
    save_hf_dir(&model, &base);
    std::fs::write(base.join("tokenizer.json"), "{}").unwrap();
    let student = nn::VarStore::new(Device::Cpu);
    let liger = AttentionConfig {
        window_size: Some(4),
        chunk_size: Some(8),
        sub_chunk: Some(4),
        ..AttentionConfig::new(Method::Liger)
    };
    let layers = convert(&mut model, &ConversionConfig::all(liger), &student).unwrap();
    assert!(layers.named_parameters().is_empty());
    let want = probe_logits(&model);

    let path = root.path().join("adapters.safetensors");
    export_adapters(&path, &model, &layers, None, &info(&base)).unwrap();
    let loaded = load_model(&base, Some(&path), Device::Cpu, Kind::Float).unwrap();
    let diff = max_abs_diff(&probe_logits(&loaded.model), &want);
    assert!(
        diff <= 1e-5,
        "base + empty adapters logits differ by {diff}"
    );
    let names: Vec<String> = (0..3).map(|i| loaded.model.mixer(i).name()).collect();
    assert!(names.iter().all(|n| n.starts_with("liger")), "{names:?}");
}

/// A multimodal Gemma 3 (the tiny random `Gemma3ForConditionalGeneration` of linearize-models'
/// fixtures, saved by transformers 4.57 and 5) with its global layer converted exports as a
/// gemma3_text-based model: the text config, the language model's tensors under the text
/// model's names, no vision tensor, a card that says so; it loads back to the same logits.
#[test]
fn a_multimodal_gemma3_exports_its_text_model() {
    let _rng = rng_lock();
    for name in ["gemma3_mm", "transformers5/gemma3_mm"] {
        let base = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../linearize-models/tests/fixtures")
            .join(name);
        let mut model = Model::load(&base, Device::Cpu, Kind::Float).unwrap();
        assert!(model.config().multimodal);
        let student = nn::VarStore::new(Device::Cpu);
        tch::manual_seed(3);
        let conversion = ConversionConfig {
            layers: LayerSelection::Type(LayerTypes::Global),
            ..ConversionConfig::all(lolcats())
        };
        let layers = convert(&mut model, &conversion, &student).unwrap();
        assert_eq!(layers.indices(), [1], "{name}: the one global layer");
        let want = probe_logits(&model);

        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        export_model(&dir, &model, &layers, None, &info(&base), &f32_options()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            (&config["model_type"], &config["base_model_type"]),
            (&"linearize".into(), &"gemma3_text".into()),
            "{name}"
        );
        for key in ["text_config", "vision_config", "mm_tokens_per_image"] {
            assert!(config.get(key).is_none(), "{name}: {key} exported");
        }
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert!(
            ckpt.names().all(|n| n.starts_with("model.layers.")
                || ["model.embed_tokens.weight", "model.norm.weight"].contains(&n)),
            "{name}: {:?}",
            ckpt.names().collect::<Vec<_>>()
        );
        let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(card.contains("vision tower"), "{name}: {card}");

        let loaded = load_model(&dir, None, Device::Cpu, Kind::Float).unwrap();
        assert!(!loaded.model.config().multimodal);
        let diff = max_abs_diff(&probe_logits(&loaded.model), &want);
        assert!(diff <= 1e-5, "{name}: exported logits differ by {diff}");
    }
}

#[test]
fn large_exports_are_sharded_with_an_index() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let (model, layers, lora) = trained(&base);
    let dir = root.path().join("model");
    let options = ExportOptions {
        max_shard_bytes: 16_000,
        ..f32_options()
    };
    export_model(&dir, &model, &layers, Some(&lora), &info(&base), &options).unwrap();
    assert!(!dir.join(SINGLE_FILE).exists());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.files().len() > 2, "{} files", ckpt.files().len());
    let name = ckpt.files()[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("model-00001-of-"), "{name}");
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.len(), ckpt.names().count());
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        ckpt.data_bytes()
    );
    assert!(weight_map.contains_key("model.layers.2.self_attn.window_factors"));

    let loaded = load_model(&dir, None, Device::Cpu, Kind::Float).unwrap();
    assert!(max_abs_diff(&probe_logits(&loaded.model), &probe_logits(&model)) <= 1e-5);
}

#[test]
fn bad_inputs_name_the_file_and_tensor() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let (model, layers, lora) = trained(&base);
    let path = root.path().join("adapters.safetensors");
    export_adapters(&path, &model, &layers, Some(&lora), &info(&base)).unwrap();

    // Adapters made for another shape of model.
    let other = root.path().join("other");
    tch::manual_seed(1);
    save_hf_dir(
        &Model::new(&tiny_config(48), Device::Cpu, Kind::Float).unwrap(),
        &other,
    );
    let e = format!(
        "{:#}",
        load_model(&other, Some(&path), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
    );
    assert!(
        e.contains(&path.display().to_string()) && e.contains("hidden_size"),
        "{e}"
    );

    // An adapter file that lacks one tensor.
    let missing = "model.layers.2.self_attn.o_proj.lora_B.weight";
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != missing)
        .collect();
    let cut = root.path().join("cut.safetensors");
    std::fs::write(
        &cut,
        safetensors::tensor::serialize(kept, header.metadata().clone()).unwrap(),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        load_model(&base, Some(&cut), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
    );
    assert!(
        e.contains(&cut.display().to_string()) && e.contains(missing),
        "{e}"
    );

    // Adapters applied to an already converted model.
    let dir = root.path().join("model");
    export_model(
        &dir,
        &model,
        &layers,
        Some(&lora),
        &info(&base),
        &f32_options(),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        load_model(&dir, Some(&path), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
    );
    assert!(e.contains("already a converted model"), "{e}");

    // A merged model whose checkpoint lacks a feature map.
    let weights = dir.join(SINGLE_FILE);
    let bytes = std::fs::read(&weights).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let gone = file
        .names()
        .into_iter()
        .find(|n| n.contains("layers.0.self_attn.feature_map_q"))
        .unwrap()
        .to_owned();
    let kept: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(n, _)| *n != gone)
        .collect();
    let rewritten = safetensors::tensor::serialize(kept, None).unwrap();
    std::fs::write(&weights, rewritten).unwrap();
    let e = format!(
        "{:#}",
        load_model(&dir, None, Device::Cpu, Kind::Float)
            .err()
            .unwrap()
    );
    assert!(
        e.contains(&gone) && e.contains(&weights.display().to_string()),
        "{e}"
    );

    // A `linearize` section naming a method that does not exist.
    let config = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json[SECTION_KEY]["layers"][0]["attention"]["method"] = "quantum".into();
    std::fs::write(&config, json.to_string()).unwrap();
    let e = format!(
        "{:#}",
        load_model(&dir, None, Device::Cpu, Kind::Float)
            .err()
            .unwrap()
    );
    assert!(e.contains("config.json") && e.contains(SECTION_KEY), "{e}");
}

#[test]
fn the_same_tensors_export_to_the_same_bytes() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let (model, layers, lora) = trained(&base);
    // Several writes: a header whose key order depended on a HashMap would differ in most.
    let first = root.path().join("adapters-0.safetensors");
    export_adapters(&first, &model, &layers, Some(&lora), &info(&base)).unwrap();
    let want = std::fs::read(&first).unwrap();
    for i in 1..6 {
        let path = root.path().join(format!("adapters-{i}.safetensors"));
        export_adapters(&path, &model, &layers, Some(&lora), &info(&base)).unwrap();
        assert!(
            std::fs::read(&path).unwrap() == want,
            "write {i} of the same adapters differs from the first"
        );
    }
    // The header lists the metadata keys, then the tensors, each in sorted order.
    let n = u64::from_le_bytes(want[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&want[8..8 + n]).unwrap();
    let keys: Vec<usize> = [
        "linearize.base_model",
        "linearize.layers",
        "linearize.recipe_hash",
    ]
    .iter()
    .map(|k| header.find(&format!("\"{k}\"")).unwrap())
    .collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "{header}");
    let merged = |name: &str| {
        let dir = root.path().join(name);
        export_model(
            &dir,
            &model,
            &layers,
            Some(&lora),
            &info(&base),
            &f32_options(),
        )
        .unwrap();
        std::fs::read(dir.join(SINGLE_FILE)).unwrap()
    };
    assert!(
        merged("model-a") == merged("model-b"),
        "merged weights differ"
    );
}
