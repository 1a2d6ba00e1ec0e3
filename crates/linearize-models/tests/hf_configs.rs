//! config.json reading against transformers 4.57 and 5.x: every case of
//! tests/fixtures/hf_configs/transformers-<version>.json (written by
//! scripts/make_model_fixtures.py) is a config.json and what that transformers built from it.
//! Each family with its keys left out or null (the defaults table), and every `rope_type` in both
//! the `rope_scaling` and the `rope_parameters` format, down to the RoPE inverse frequencies.
use linearize_models::config::{Family, ModelConfig, DEFAULTS};
use linearize_models::rope::{inv_freq, inv_freq_with};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

const VERSIONS: [&str; 2] = ["4.57.1", "5.25.0"];

/// Cases transformers runs and linearize refuses on purpose, with what the error must name.
const REFUSED: [(&str, &str); 3] = [
    // LongRoPE switches every frequency when a sequence crosses the pretraining length.
    ("/longrope/", "\"longrope\""),
    // transformers 5 reads neither for Gemma 3 (it looks for `truncate` at the top of the
    // per-layer-type `rope_parameters`, and merges an old `type` under the default `rope_type`);
    // 4 reads both.
    ("gemma3_text/yarn_betas_untruncated/", "truncate"),
    ("gemma3_text/old_type_key/rope_scaling", "`rope_type`"),
];

fn cases(version: &str) -> Vec<(String, Value, Value)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "tests/fixtures/hf_configs/transformers-{version}.json"
    ));
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(file["transformers"], version);
    file["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["config"].clone(),
                c["transformers"].clone(),
            )
        })
        .collect()
}

/// Every field of `cfg` that transformers' built model shows, compared with it.
fn compare(name: &str, cfg: &ModelConfig, hf: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut check = |what: &str, ours: Value, theirs: &Value| {
        if &ours != theirs {
            wrong.push(format!("{name}: {what} = {ours}, transformers {theirs}"));
        }
    };
    check(
        "num_attention_heads",
        cfg.num_attention_heads.into(),
        &hf["num_attention_heads"],
    );
    check(
        "num_key_value_heads",
        cfg.num_key_value_heads.into(),
        &hf["num_key_value_heads"],
    );
    check("head_dim", cfg.head_dim.into(), &hf["head_dim"]);
    check("qkv_bias", cfg.qkv_bias.into(), &hf["qkv_bias"]);
    check("o_proj_bias", cfg.o_proj_bias.into(), &hf["o_proj_bias"]);
    check("mlp_bias", cfg.mlp_bias.into(), &hf["mlp_bias"]);
    check("qk_norm", cfg.qk_norm.into(), &hf["qk_norm"]);
    check("rms_norm_eps", cfg.rms_norm_eps.into(), &hf["rms_norm_eps"]);
    check(
        "max_position_embeddings",
        cfg.max_position_embeddings.into(),
        &hf["max_position_embeddings"],
    );
    // transformers' layer 0 (a full layer of gemma has no window).
    check(
        "sliding_window",
        cfg.layer_window(0).into(),
        &hf["sliding_window"],
    );
    check(
        "tie_word_embeddings",
        cfg.tie_word_embeddings.into(),
        &hf["tie_word_embeddings"],
    );
    let act = match cfg.family {
        Family::Gemma3 => "gelu_pytorch_tanh",
        _ => "silu",
    };
    check("hidden_act", act.into(), &hf["hidden_act"]);
    if let Some(g) = &cfg.gemma {
        let types: Vec<&str> = cfg.layer_types.iter().map(|t| t.name()).collect();
        check("layer_types", types.into(), &hf["layer_types"]);
        let scalar = hf["query_pre_attn_scalar"].as_f64();
        check(
            "query_pre_attn_scalar",
            g.query_pre_attn_scalar.into(),
            &scalar.into(),
        );
        let theirs: Vec<f64> = serde_json::from_value(hf["local_inv_freq"].clone()).unwrap();
        let ours = inv_freq_with(
            cfg.head_dim,
            g.local_rope_theta,
            g.local_rope_scaling.as_ref(),
        );
        let close = ours.len() == theirs.len()
            && ours
                .iter()
                .zip(&theirs)
                .all(|(a, b)| (a - b).abs() <= 2e-6 * b.abs());
        if !close {
            check("local inv_freq", ours.into(), &theirs.into());
        }
    }
    check(
        "initializer_range",
        cfg.initializer_range.into(),
        &hf["initializer_range"],
    );

    // transformers computes the frequencies in f32; ours are f64, used as f32.
    let theirs: Vec<f64> = serde_json::from_value(hf["inv_freq"].clone()).unwrap();
    let ours = inv_freq(cfg);
    if ours.len() != theirs.len() {
        wrong.push(format!(
            "{name}: {} frequencies, transformers {}",
            ours.len(),
            theirs.len()
        ));
    } else {
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if (a - b).abs() > 2e-6 * b.abs() {
                wrong.push(format!("{name}: inv_freq[{i}] = {a:e}, transformers {b:e}"));
            }
        }
    }
    let scale = cfg.rope_scaling.map_or(1.0, |s| s.attention_factor());
    let hf_scale = hf["attention_scaling"].as_f64().unwrap();
    if (scale - hf_scale).abs() > 1e-12 {
        wrong.push(format!(
            "{name}: attention scaling {scale}, transformers {hf_scale}"
        ));
    }
    wrong
}

#[test]
fn configs_read_as_transformers_4_and_5_read_them() {
    let all: HashMap<&str, Vec<(String, Value, Value)>> =
        VERSIONS.iter().map(|v| (*v, cases(v))).collect();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for version in VERSIONS {
        for (name, config, hf) in &all[version] {
            let label = format!("transformers {version} {name}");
            let parsed = ModelConfig::from_json_str(&config.to_string());
            if let Some((_, needle)) = REFUSED.iter().find(|(pat, _)| name.contains(pat)) {
                match parsed {
                    Ok(_) => wrong.push(format!("{label}: accepted, must be refused")),
                    Err(e) if !format!("{e:#}").contains(needle) => {
                        wrong.push(format!("{label}: error does not name {needle}: {e:#}"))
                    }
                    Err(_) => {}
                }
                continue;
            }
            if hf.get("error").is_some() {
                // A config one version cannot run and the other can (e.g. 4.57's mistral yarn,
                // 5.x's strict null checks) is read as the version that runs it; one that neither
                // runs must be refused.
                let runs_elsewhere = VERSIONS.iter().any(|other| {
                    all[other]
                        .iter()
                        .any(|(n, c, h)| n == name && c == config && h.get("error").is_none())
                });
                if !runs_elsewhere && parsed.is_ok() {
                    wrong.push(format!(
                        "{label}: accepted, transformers fails: {}",
                        hf["error"]
                    ));
                }
                continue;
            }
            match parsed {
                Ok(cfg) => wrong.extend(compare(&label, &cfg, hf)),
                Err(e) => wrong.push(format!("{label}: refused, transformers runs it: {e:#}")),
            }
            checked += 1;
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Every family and rope type in both versions: guards against an empty fixture.
    assert!(checked > 120, "only {checked} cases compared");
}

#[test]
fn the_defaults_table_has_one_row_per_family_and_matches_transformers() {
    let families = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma3,
    ];
    assert_eq!(DEFAULTS.len(), families.len());
    for version in VERSIONS {
        for family in families {
            let name = format!("{family}/minimal");
            let (_, config, hf) = cases(version)
                .into_iter()
                .find(|(n, _, _)| *n == name)
                .unwrap_or_else(|| panic!("no case {name}"));
            // The minimal config names none of the table's keys: everything comes from the row.
            let d = family.defaults();
            let cfg = ModelConfig::from_json_str(&config.to_string()).unwrap();
            let label = format!("transformers {version} {name}");
            let wrong = compare(&label, &cfg, &hf);
            assert!(wrong.is_empty(), "{}", wrong.join("\n"));
            assert_eq!(cfg.rope_theta, d.rope_theta, "{label}");
            assert_eq!(cfg.rope_scaling, None, "{label}");
            assert_eq!(
                cfg.num_key_value_heads,
                d.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
                "{label}"
            );
            assert_eq!(
                cfg.head_dim,
                d.head_dim
                    .unwrap_or(cfg.hidden_size / cfg.num_attention_heads),
                "{label}"
            );
            assert_eq!(
                cfg.max_position_embeddings, d.max_position_embeddings,
                "{label}"
            );
            assert_eq!(cfg.rms_norm_eps, d.rms_norm_eps, "{label}");
            assert_eq!(cfg.sliding_window, d.sliding_window, "{label}");
            assert_eq!(cfg.tie_word_embeddings, d.tie_word_embeddings, "{label}");
        }
    }
}

#[test]
fn written_back_configs_read_the_same_in_both_formats() {
    for version in VERSIONS {
        for (name, config, hf) in cases(version) {
            if hf.get("error").is_some() || name.contains("/longrope/") {
                continue;
            }
            let Ok(cfg) = ModelConfig::from_json_str(&config.to_string()) else {
                continue;
            };
            let json = cfg.to_json();
            // The file's own format is kept: 5.x configs stay in `rope_parameters`.
            let v5 = config.get("rope_parameters").is_some_and(|v| !v.is_null())
                && config.get("rope_scaling").is_none();
            assert_eq!(
                json.get("rope_parameters").is_some(),
                v5,
                "{version} {name}: {json}"
            );
            assert_eq!(json.get("rope_theta").is_some(), !v5, "{version} {name}");
            let back = ModelConfig::from_json_str(&json.to_string()).unwrap();
            assert_eq!(back.rope_theta, cfg.rope_theta, "{version} {name}");
            let kind = |c: &ModelConfig| c.rope_scaling.map(|s| s.rope_type());
            assert_eq!(kind(&back), kind(&cfg), "{version} {name}");
            assert_eq!(inv_freq(&back), inv_freq(&cfg), "{version} {name}");
            // serde_json's float parsing may be one ulp off a derived value such as yarn's.
            let scale = |c: &ModelConfig| c.rope_scaling.map_or(1.0, |s| s.attention_factor());
            assert!(
                (scale(&back) - scale(&cfg)).abs() < 1e-15,
                "{version} {name}"
            );
        }
    }
}
