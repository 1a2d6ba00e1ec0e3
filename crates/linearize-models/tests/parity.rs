//! The decoder against Hugging Face transformers on the tiny random models that
//! `scripts/make_model_fixtures.py` writes: full forward, cached decoding, and bf16 compute.
mod common;

use common::{fixture, max_diff, reference, FIXTURES};
use linearize_models::config::{Family, LayerType, RopeScaling};
use linearize_models::llama::Model;
use linearize_models::lm::CausalLm;
use linearize_models::weights::Checkpoint;
use tch::{Device, Kind, Tensor};

fn load(name: &str, kind: Kind) -> Model {
    Model::load(&fixture(name), Device::Cpu, kind).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[test]
fn fixtures_cover_the_paths_they_are_named_for() {
    let seq = reference("mistral_sliding").0.size()[1];
    for name in FIXTURES {
        let model = load(name, Kind::Float);
        let cfg = model.config();
        assert!(
            cfg.num_key_value_heads < cfg.num_attention_heads,
            "{name}: GQA"
        );
        let ckpt = Checkpoint::open(&fixture(name)).unwrap();
        let saved_by_5 = name.starts_with("transformers5/");
        let file: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("config.json")).unwrap(),
        )
        .unwrap();
        // A multimodal model's RoPE keys are its text model's.
        let config = file.get("text_config").unwrap_or(&file);
        assert_eq!(cfg.multimodal, name.ends_with("gemma3_mm"), "{name}");
        assert_eq!(
            (
                config.get("rope_parameters").is_some(),
                config.get("rope_theta").is_some()
            ),
            (saved_by_5, !saved_by_5),
            "{name}: the RoPE format of the transformers that saved it"
        );
        match name.trim_start_matches("transformers5/") {
            "llama3_tied_sharded" => {
                assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Llama3 { .. })));
                assert!(cfg.tie_word_embeddings && ckpt.info("lm_head.weight").is_none());
                assert_eq!(ckpt.files().len(), 2);
            }
            "llama_untied_bias" => {
                assert!(!cfg.tie_word_embeddings && cfg.rope_scaling.is_none());
                assert!(cfg.qkv_bias && cfg.o_proj_bias && cfg.mlp_bias);
            }
            "mistral_sliding" => {
                assert_eq!(cfg.family, Family::Mistral);
                assert!(cfg.sliding_window.unwrap() < seq);
            }
            "qwen2" => assert!(cfg.family == Family::Qwen2 && cfg.qkv_bias && !cfg.o_proj_bias),
            "qwen2_yarn" => match cfg.rope_scaling {
                Some(RopeScaling::Yarn {
                    truncate,
                    attention_factor,
                    ..
                }) => {
                    assert!(attention_factor > 1.1, "{name}: cos/sin scaled");
                    // 4.57's default rounds the ramp to whole dims; the 5.x fixture does not.
                    assert_eq!(truncate, !saved_by_5);
                }
                other => panic!("{name}: {other:?}"),
            },
            "qwen3_bf16" => {
                assert!(cfg.qk_norm && cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size);
                assert_eq!(ckpt.dtype_counts().keys().collect::<Vec<_>>(), ["BF16"]);
            }
            "gemma3_mm" => {
                assert_eq!(file["model_type"], "gemma3");
                assert_eq!(cfg.family, Family::Gemma3);
                assert!(cfg.layer_window(0).unwrap() < seq && cfg.layer_window(1).is_none());
                assert!(cfg
                    .gemma
                    .as_ref()
                    .unwrap()
                    .final_logit_softcapping
                    .is_none());
                // Sharded, with the vision tower beside the language model.
                assert_eq!(ckpt.files().len(), 2);
                assert!(ckpt.names().any(|n| n.starts_with("vision_tower.")));
                assert!(ckpt.names().all(|n| !n.starts_with("model.")));
                // Read back, the config is the text model's alone.
                assert_eq!(cfg.to_json()["model_type"], "gemma3_text");
                assert!(cfg.to_json().get("vision_config").is_none());
            }
            "gemma3" => {
                assert_eq!(cfg.family, Family::Gemma3);
                let g = cfg.gemma.as_ref().unwrap();
                assert!(cfg.sliding_window.unwrap() < seq && cfg.layer_window(1).is_none());
                assert_eq!(
                    cfg.layer_types,
                    [
                        LayerType::Sliding,
                        LayerType::Full,
                        LayerType::Sliding,
                        LayerType::Sliding
                    ]
                );
                assert!(g.query_pre_attn_scalar != cfg.head_dim as f64);
                assert!(
                    g.local_rope_theta != cfg.rope_theta && g.final_logit_softcapping.is_some()
                );
                assert!(matches!(cfg.rope_scaling, Some(RopeScaling::Linear { .. })));
                assert!(cfg.tie_word_embeddings && cfg.qk_norm);
                assert!(cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size);
            }
            _ => unreachable!(),
        }
    }
}

#[test]
fn full_forward_matches_hf() {
    for name in FIXTURES {
        let (ids, want) = reference(name);
        // HF's logits are far from flat, so a wrong RoPE, mask or norm cannot hide under 1e-4.
        assert!(want.std(true).double_value(&[]) > 2.0);
        let model = load(name, Kind::Float);
        let got = tch::no_grad(|| model.forward(&ids, None)).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff <= 1e-4, "{name}: max |logit diff| = {diff}");
        // The trait's forward runs through an empty cache: the prefill path.
        let via_cache = CausalLm::forward(&model, &ids).unwrap();
        let diff = max_diff(&via_cache, &want);
        assert!(
            diff <= 1e-4,
            "{name}: through the cache, max |logit diff| = {diff}"
        );
    }
}

#[test]
fn cached_decoding_matches_full_forward() {
    for name in FIXTURES {
        let (ids, want) = reference(name);
        let model = load(name, Kind::Float);
        let full = tch::no_grad(|| model.forward(&ids, None)).unwrap();
        let seq = ids.size()[1];
        // Prefill 5 tokens then one at a time; and uneven chunks that continue a non-empty cache
        // with several tokens at once (an explicit mask, crossing mistral's window).
        let one_at_a_time: Vec<i64> = std::iter::once(5)
            .chain(std::iter::repeat_n(1, seq as usize - 5))
            .collect();
        for chunks in [one_at_a_time, vec![3, 4, 1, 4]] {
            let mut cache = model.new_cache(ids.size()[0]).unwrap();
            let mut outs = Vec::new();
            let mut start = 0;
            for len in &chunks {
                let part = ids.narrow(1, start, *len);
                outs.push(model.forward_cached(&part, &mut cache).unwrap());
                start += len;
            }
            assert_eq!((start, cache.seen()), (seq, seq));
            let cached = Tensor::cat(&outs, 1);
            let diff = max_diff(&cached, &full);
            assert!(
                diff <= 1e-4,
                "{name} chunks {chunks:?}: vs full, max diff {diff}"
            );
            let diff = max_diff(&cached, &want);
            assert!(
                diff <= 1e-4,
                "{name} chunks {chunks:?}: vs HF, max diff {diff}"
            );
        }
    }
}

#[test]
fn bf16_compute_stays_close_to_hf() {
    for name in FIXTURES {
        let (ids, want) = reference(name);
        let model = load(name, Kind::BFloat16);
        assert_eq!(model.kind(), Kind::BFloat16);
        let got = tch::no_grad(|| model.forward(&ids, None)).unwrap();
        assert_eq!(got.kind(), Kind::Float);
        // bf16 keeps 8 mantissa bits: relative errors of a few 1e-3 per op, compounded over the
        // layers, against logits of std ~5.
        let mean = (&got - &want).abs().mean(Kind::Float).double_value(&[]);
        assert!(mean < 0.15, "{name}: mean |logit diff| in bf16 = {mean}");
        let agree = got.argmax(-1, false).eq_tensor(&want.argmax(-1, false));
        let agree = agree
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(agree > 0.9, "{name}: bf16 top-1 agreement {agree}");
    }
}
