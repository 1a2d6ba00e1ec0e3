//! Converting a tiny random Llama by a recipe's conversion section: which layers change, where
//! the new parameters live, the per-layer report, and reverting layers to softmax (hybrid).
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_train::convert::{convert, ConversionConfig};
use linearize_train::selection::{top_layers, LayerScore};
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};

fn tiny_model() -> Model {
    let cfg = json!({
        "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "initializer_range": 0.2,
    });
    tch::manual_seed(7);
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    Model::new(&cfg, Device::Cpu, Kind::Float).unwrap()
}

fn recipe(yaml: &str) -> ConversionConfig {
    serde_yaml_ng::from_str(yaml).unwrap()
}

fn ids() -> Tensor {
    Tensor::arange(20, (Kind::Int64, Device::Cpu)).view([1, 20])
}

#[test]
fn converts_the_planned_layers_into_the_student_store() {
    let mut model = tiny_model();
    let student = nn::VarStore::new(Device::Cpu);
    let cfg = recipe(
        "attention: {method: lolcats, feature_map: {kind: hedgehog, feature_dim: 8}}\n\
         softmax_layers: [1]\n\
         overrides: {2: {method: sliding_window, window_size: 4}}\n",
    );
    let layers = convert(&mut model, &cfg, &student).unwrap();
    assert_eq!(layers.indices(), [0, 2]);
    assert_eq!(model.mixer(0).name(), "lolcats-sw64+hedgehog8");
    assert_eq!(model.mixer(1).name(), "softmax");
    assert_eq!(model.mixer(2).name(), "sliding_window-4");

    // Only layer 0 has new parameters (feature maps and window factors), all trainable, in the
    // student store; the teacher stays frozen.
    let named = layers.named_parameters();
    let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.feature_map_k.W",
            "model.layers.0.self_attn.feature_map_q.W",
            "model.layers.0.self_attn.window_factors",
        ]
    );
    assert!(named.iter().all(|(_, t)| t.requires_grad()));
    assert_eq!(student.variables().len(), 3);
    assert!(model
        .named_parameters()
        .values()
        .all(|t| !t.requires_grad()));

    let methods = layers.methods();
    assert_eq!(
        methods.iter().map(|m| m.method).collect::<Vec<_>>(),
        [Method::Lolcats, Method::Softmax, Method::SlidingWindow]
    );
    assert_eq!(methods[0].new_parameters, 2 * 4 * 8 * 8 + 4);
    assert_eq!(methods[2].attention.window_size, Some(4));
    let json = serde_json::to_value(&methods).unwrap();
    assert_eq!(json[1]["method"], "softmax");
    let table = layers.table();
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .contains("lolcats-sw64+hedgehog8"),
        "{table}"
    );
    assert!(table.lines().nth(2).unwrap().contains("softmax"), "{table}");
}

#[test]
fn reverting_every_layer_gives_back_the_teacher() {
    let mut model = tiny_model();
    let teacher = model.forward(&ids(), None).unwrap();
    let student = nn::VarStore::new(Device::Cpu);
    let mut layers = convert(
        &mut model,
        &ConversionConfig::all(AttentionConfig::new(Method::Linear)),
        &student,
    )
    .unwrap();
    let converted = model.forward(&ids(), None).unwrap();
    assert!((&converted - &teacher).abs().max().double_value(&[]) > 1e-3);

    let errors = [(0, 0.3), (1, 0.9), (2, 0.5)].map(|(layer, score)| LayerScore { layer, score });
    let worst = top_layers(&errors, 2).unwrap();
    assert_eq!(worst, [1, 2]);
    layers.revert_to_softmax(&mut model, &worst).unwrap();
    assert_eq!(layers.indices(), [0]);
    assert!(layers
        .named_parameters()
        .iter()
        .all(|(n, _)| n.starts_with("model.layers.0.")));
    assert_eq!(model.mixer(1).name(), "softmax");
    let e = layers
        .revert_to_softmax(&mut model, &[1])
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer 1 is not a converted layer"), "{e}");

    layers.revert_to_softmax(&mut model, &[0]).unwrap();
    assert!(model.forward(&ids(), None).unwrap().equal(&teacher));
}

#[test]
fn bad_layers_and_reused_stores_are_errors() {
    let mut model = tiny_model();
    let student = nn::VarStore::new(Device::Cpu);
    let e = convert(
        &mut model,
        &recipe("attention: {method: lolcats}\nlayers: [0, 3]\n"),
        &student,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("conversion.layers: layer 3 does not exist (the model has 3 layers"),
        "{e}"
    );
    assert!(student.variables().is_empty());

    let cfg = recipe("attention: {method: linear}\nlayers: [1]\n");
    convert(&mut model, &cfg, &student).unwrap();
    let e = convert(&mut model, &cfg, &student)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("already holds 'model.layers.1.self_attn."),
        "{e}"
    );
}
