//! Loading damaged or mismatched model directories: each problem is a one-line error that names
//! the file and the key or tensor at fault.
mod common;

use common::{fixture, reference};
use linearize_models::llama::Model;
use std::fs;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A writable copy of a fixture directory.
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let err = match Model::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(!err.contains('\n'), "not one line: {err}");
    err
}

/// Rewrites `dir/model.safetensors` through `edit` of its (name, tensor) list.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, &path).unwrap();
}

#[test]
fn missing_config_is_named() {
    let dir = copy_of("qwen2");
    fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(&dir.path().join("config.json").display().to_string()),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_named() {
    let dir = copy_of("qwen2");
    let path = dir.path().join("config.json");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"qwen2\"", "\"gpt_neox\"");
    fs::write(&path, text).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("model_type") && err.contains("\"gpt_neox\""),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_file_and_both_shapes() {
    let dir = copy_of("llama_untied_bias");
    let name = "model.layers.1.mlp.up_proj.weight";
    edit_weights(dir.path(), |tensors| {
        let t = tensors.iter_mut().find(|(n, _)| n == name).unwrap();
        t.1 = t.1.tr().contiguous();
    });
    let err = load_err(dir.path());
    assert!(
        err.contains(name) && err.contains("model.safetensors"),
        "{err}"
    );
    assert!(
        err.contains("[32, 64]") && err.contains("[64, 32]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_of("llama_untied_bias");
    let name = "model.layers.0.self_attn.k_proj.bias";
    edit_weights(dir.path(), |tensors| tensors.retain(|(n, _)| n != name));
    let err = load_err(dir.path());
    assert!(
        err.contains(&format!("missing tensor {name}")) && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = copy_of("llama_untied_bias");
    edit_weights(dir.path(), |tensors| {
        tensors.push((
            "model.layers.0.self_attn.gate.weight".into(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        ))
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("unexpected tensor model.layers.0.self_attn.gate.weight"),
        "{err}"
    );
}

#[test]
fn truncated_file_is_named() {
    let dir = copy_of("llama_untied_bias");
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains(&path.display().to_string()) && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_of("llama3_tied_sharded");
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    fs::remove_file(&shard).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains(&shard.display().to_string()), "{err}");
}

#[test]
fn saved_lm_head_of_a_tied_model_is_accepted() {
    let dir = copy_of("qwen2");
    edit_weights(dir.path(), |tensors| {
        let embed = tensors
            .iter()
            .find(|(n, _)| n == "model.embed_tokens.weight")
            .unwrap()
            .1
            .copy();
        tensors.push(("lm_head.weight".into(), embed));
    });
    let model = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let (ids, want) = reference("qwen2");
    let got = tch::no_grad(|| model.forward(&ids, None)).unwrap();
    assert!((got - want).abs().max().double_value(&[]) <= 1e-4);

    edit_weights(dir.path(), |tensors| {
        let head = tensors
            .iter_mut()
            .find(|(n, _)| n == "lm_head.weight")
            .unwrap();
        head.1 = head.1.narrow(0, 0, 7).contiguous();
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("lm_head.weight") && err.contains("tie_word_embeddings"),
        "{err}"
    );
}

/// Sets `key` of `dir/config.json` to `value`.
fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    config[key] = value;
    fs::write(&path, config.to_string()).unwrap();
}

#[test]
fn absurd_config_sizes_are_refused_by_key_before_anything_is_allocated() {
    // Each would ask for terabytes (or a billion layers) if the model were built first.
    for (key, value, named) in [
        ("vocab_size", 1_000_000_000_000i64, "vocab_size"),
        ("hidden_size", 1 << 40, "hidden_size"),
        ("intermediate_size", 1 << 40, "intermediate_size"),
        ("head_dim", 1 << 40, "num_attention_heads x head_dim"),
        ("num_hidden_layers", 1_000_000_000, "num_hidden_layers"),
    ] {
        let dir = copy_of("qwen2");
        set_config(dir.path(), key, value.into());
        let started = std::time::Instant::now();
        let err = load_err(dir.path());
        assert!(
            err.contains(&format!("config.json: {named} =")),
            "{key}: {err}"
        );
        assert!(
            started.elapsed().as_secs() < 10,
            "{key}: refused only after {:?}",
            started.elapsed()
        );
    }
    let dir = copy_of("qwen2");
    set_config(dir.path(), "num_hidden_layers", 3.into());
    let err = load_err(dir.path());
    assert!(
        err.contains("num_hidden_layers = 3") && err.contains("holds 2 layers"),
        "{err}"
    );
}

#[test]
fn rope_tables_are_bounded_whatever_max_position_embeddings_claims() {
    use linearize_models::lm::CausalLm;
    let dir = copy_of("qwen2");
    set_config(
        dir.path(),
        "max_position_embeddings",
        1_000_000_000_000i64.into(),
    );
    let model = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(
        model.max_context(),
        Some(linearize_models::rope::MAX_TABLE_POSITIONS)
    );
    let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let want = {
        let reference = Model::load(&fixture("qwen2"), Device::Cpu, Kind::Float).unwrap();
        reference.forward(&ids, None).unwrap()
    };
    assert!(model.forward(&ids, None).unwrap().equal(&want));
}
