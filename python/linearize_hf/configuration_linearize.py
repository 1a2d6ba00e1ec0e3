# The configuration of a model converted by linearize (https://github.com/linearize/linearize):
# a Llama-family decoder (llama, mistral, qwen2, qwen3, gemma3_text) whose attention layers each
# run the method that the `linearize` section of config.json names. This file is copied into every
# export by the `linearize` binary (the copy in the repository's python/linearize_hf/ is the one
# source).
"""LinearizeConfig: the `model_type: linearize` configuration."""
from transformers import PretrainedConfig

# The decoder families linearize converts, with what each implies (as linearize-models'
# config.rs reads them): bias on q/k/v, bias on o_proj, RMSNorm of q and k heads; Gemma 3's text
# model adds its norms, GeGLU MLP, scales, soft cap and local layers (config/gemma.rs).
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
GEMMA = "gemma3_text"

# The RoPE scalings the modeling code computes (`rope_type` as transformers names them).
ROPE_TYPES = ("default", "linear", "llama3")

# Gemma3TextConfig's defaults (transformers 4.57 and 5.x) for the keys a Gemma export may leave out.
GEMMA_DEFAULTS = {
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window_pattern": 6,
    "tie_word_embeddings": True,
}

# Each method's attention keys that change the math (required: the export writes them all) and
# the keys that only choose how linearize computes it (chunk sizes, fused kernels; accepted and
# not used here). Any other key is refused, so that a config this code cannot honour fails loudly.
FEATURE_MAP_KEYS = {
    "hedgehog": ({"feature_dim", "half_space", "bias"}, {"init"}),
    "t2r": ({"feature_dim", "bias"}, {"init"}),
    "elu": (set(), set()),
    "based": (set(), set()),
    "softmax_dim": (set(), set()),
}
METHOD_KEYS = {
    "softmax": (set(), set()),
    "linear": ({"feature_map", "eps"}, {"chunk_size", "fused_kernels"}),
    "lolcats": ({"feature_map", "window_shape", "window_size", "sinks"}, {"chunk_size", "fused_kernels"}),
    "lizard": ({"feature_map", "window_shape", "window_size", "sinks", "gate_normalizer"}, {"chunk_size"}),
    "sliding_window": ({"window_size", "sinks"}, {"chunk_size"}),
    "liger_gla": ({"gate_normalizer"}, {"chunk_size", "sub_chunk", "fused_kernels"}),
    "liger": ({"window_size", "gate_normalizer", "sinks"}, {"chunk_size", "sub_chunk", "fused_kernels"}),
    "gated_deltanet": ({"rope", "qk_activation"}, {"chunk_size"}),
    "gdn_window": ({"window_size", "sinks", "rope", "qk_activation"}, {"chunk_size"}),
}


def _check_keys(where, given, required, optional):
    missing = sorted(required - set(given))
    unknown = sorted(set(given) - required - optional)
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} (this modeling code reads {sorted(required | optional)}); "
            "the export is newer than its code, or was edited"
        )


def check_attention(where, attention):
    """Checks one layer's attention config (a dict as linearize writes it); errors name `where`."""
    if not isinstance(attention, dict) or "method" not in attention:
        raise ValueError(f"{where}: expected a mapping with a `method`, got {attention!r}")
    method = attention["method"]
    if method not in METHOD_KEYS:
        raise ValueError(
            f"{where}.method: unknown attention method {method!r} (known: {sorted(METHOD_KEYS)})"
        )
    required, optional = METHOD_KEYS[method]
    if method != "softmax":
        optional = optional | {"softmax_heads"}
    _check_keys(where, set(attention) - {"method"}, required, optional)
    if "softmax_heads" in attention:
        heads = attention["softmax_heads"]
        if (
            not isinstance(heads, list)
            or not heads
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads)
            or any(a >= b for a, b in zip(heads, heads[1:]))
        ):
            raise ValueError(f"{where}.softmax_heads: expected distinct query heads in ascending order, got {heads!r}")
    if "feature_map" in attention:
        fm = attention["feature_map"]
        kind = fm.get("kind") if isinstance(fm, dict) else None
        if kind not in FEATURE_MAP_KEYS:
            raise ValueError(
                f"{where}.feature_map: unknown kind {kind!r} (known: {sorted(FEATURE_MAP_KEYS)})"
            )
        _check_keys(f"{where}.feature_map", set(fm) - {"kind"}, *FEATURE_MAP_KEYS[kind])
    if attention.get("window_shape", "sw") not in ("sw", "tk"):
        raise ValueError(f"{where}.window_shape: expected sw or tk, got {attention['window_shape']!r}")
    if "sinks" in attention and (
        not isinstance(attention["sinks"], int) or isinstance(attention["sinks"], bool) or attention["sinks"] < 0
    ):
        raise ValueError(f"{where}.sinks: expected an integer >= 0, got {attention['sinks']!r}")
    if "rope" in attention and not isinstance(attention["rope"], bool):
        raise ValueError(f"{where}.rope: expected true or false, got {attention['rope']!r}")
    if attention.get("qk_activation", "identity") not in ("identity", "silu"):
        raise ValueError(f"{where}.qk_activation: expected identity or silu, got {attention['qk_activation']!r}")
    for key in ("window_size", "feature_dim"):
        value = attention.get(key, attention.get("feature_map", {}).get(key, 1))
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")


def rope_section(where, section, default_theta):
    """(rope_theta, rope_scaling) of one RoPE given as transformers 5 writes it (`rope_theta` and
    `rope_type` with the scaling's keys in one dict); rope_scaling is None for plain RoPE."""
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {section!r}")
    scaling = {k: v for k, v in section.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    check_rope_type(where, rope_type)
    return section.get("rope_theta", default_theta), (None if rope_type == "default" else scaling)


def check_rope_type(where, rope_type):
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (one of {ROPE_TYPES})")


def gemma_layer_types(layer_types, sliding_window_pattern, num_hidden_layers):
    """Gemma 3's `layer_types`, or those of the older `sliding_window_pattern` (every p-th layer
    global), checked."""
    if layer_types is None:
        p = sliding_window_pattern or GEMMA_DEFAULTS["sliding_window_pattern"]
        return ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(num_hidden_layers)]
    if len(layer_types) != num_hidden_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(
            f"layer_types: expected {num_hidden_layers} entries of 'full_attention' or 'sliding_attention', "
            f"got {layer_types!r}"
        )
    return list(layer_types)


class LinearizeConfig(PretrainedConfig):
    r"""
    A Llama-family decoder converted by linearize. The decoder keys are the base model's (as in
    its own config.json); `base_model_type` names its family and `linearize` is the section that
    linearize writes: `layers`, one entry per decoder layer with its `attention` (method and
    settings), plus provenance (`base_model`, `recipe_hash`, `tool_version`, `lora`).

    RoPE is read in both formats (transformers 4's `rope_theta` and `rope_scaling`, 5's
    `rope_parameters`; Gemma 3's local layers from `rope_local_base_freq` or the
    `sliding_attention` section) and kept as `rope_theta`, `rope_scaling` (the global layers') and
    `rope_local_base_freq`.
    """

    model_type = "linearize"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        base_model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=None,
        rope_scaling=None,
        rope_parameters=None,
        attention_bias=False,
        mlp_bias=False,
        sliding_window=None,
        use_sliding_window=False,
        tie_word_embeddings=None,
        use_cache=True,
        linearize=None,
        # Gemma 3's keys (read for base_model_type gemma3_text only, as transformers does).
        hidden_activation=None,
        layer_types=None,
        sliding_window_pattern=None,
        rope_local_base_freq=None,
        query_pre_attn_scalar=None,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        use_bidirectional_attention=False,
        **kwargs,
    ):
        if base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(
                f"base_model_type {base_model_type!r} is not supported (expected one of {BASE_MODEL_TYPES})"
            )
        gemma = base_model_type == GEMMA
        # Gemma reads `hidden_activation`; its `hidden_act` is unused (as in transformers).
        if not gemma and hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (expected 'silu')")
        if base_model_type in ("qwen2", "qwen3") and use_sliding_window:
            raise ValueError("use_sliding_window: per-layer sliding windows of qwen models are not supported")
        self.base_model_type = base_model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        defaults = GEMMA_DEFAULTS if gemma else {}
        self.num_key_value_heads = num_key_value_heads or defaults.get("num_key_value_heads", num_attention_heads)
        self.head_dim = head_dim or defaults.get("head_dim", hidden_size // num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        self.use_sliding_window = use_sliding_window
        self.use_cache = use_cache
        if tie_word_embeddings is None:
            tie_word_embeddings = defaults.get("tie_word_embeddings", False)

        default_theta = defaults.get("rope_theta", 10000.0)
        local_theta = rope_local_base_freq or GEMMA_DEFAULTS["rope_local_base_freq"]
        per_layer_type = isinstance(rope_parameters, dict) and (
            "full_attention" in rope_parameters or "sliding_attention" in rope_parameters
        )
        if rope_parameters is not None and rope_scaling is not None:
            raise ValueError("rope_scaling is given beside rope_parameters (transformers 4 and 5 read different ones); keep one")
        if per_layer_type:
            if not gemma:
                raise ValueError(f"rope_parameters: per-layer-type sections are Gemma 3's, not {base_model_type}'s")
            rope_theta, rope_scaling = rope_section(
                "rope_parameters.full_attention", rope_parameters.get("full_attention") or {}, rope_theta or default_theta
            )
            local_theta, local_scaling = rope_section(
                "rope_parameters.sliding_attention", rope_parameters.get("sliding_attention") or {}, local_theta
            )
            if local_scaling is not None:
                raise ValueError("rope_parameters.sliding_attention: scaled RoPE of the local layers is not supported")
        elif rope_parameters is not None:
            rope_theta, rope_scaling = rope_section("rope_parameters", rope_parameters, rope_theta or default_theta)
        elif rope_scaling is not None:
            check_rope_type("rope_scaling", rope_scaling.get("rope_type", rope_scaling.get("type")))
        self.rope_theta = rope_theta or default_theta
        self.rope_scaling = rope_scaling

        if gemma:
            if (hidden_activation or "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
                raise ValueError(f"hidden_activation {hidden_activation!r} is not supported (expected 'gelu_pytorch_tanh')")
            if use_bidirectional_attention:
                raise ValueError("use_bidirectional_attention: true is not supported (the decoder is causal)")
            if attn_logit_softcapping is not None:
                raise ValueError(
                    f"attn_logit_softcapping {attn_logit_softcapping!r} is not supported (soft-capped attention "
                    "scores are not implemented; Gemma 3 sets none)"
                )
            if final_logit_softcapping is not None and final_logit_softcapping <= 0:
                raise ValueError(f"final_logit_softcapping {final_logit_softcapping!r} is not positive")
            self.hidden_activation = "gelu_pytorch_tanh"
            self.layer_types = gemma_layer_types(layer_types, sliding_window_pattern, num_hidden_layers)
            if sliding_window is None and "sliding_attention" in self.layer_types:
                raise ValueError("sliding_window: missing or null, but layer_types has sliding_attention layers")
            self.rope_local_base_freq = local_theta
            self.query_pre_attn_scalar = query_pre_attn_scalar or GEMMA_DEFAULTS["query_pre_attn_scalar"]
            self.final_logit_softcapping = final_logit_softcapping
            self.attn_logit_softcapping = None
            self.use_bidirectional_attention = False
        if linearize is None:
            # A model of softmax layers only (e.g. built in Python); exports always carry the section.
            linearize = {"layers": [{"layer": i, "attention": {"method": "softmax"}} for i in range(num_hidden_layers)]}
        layers = linearize.get("layers")
        if not isinstance(layers, list) or [l.get("layer") for l in layers] != list(range(num_hidden_layers)):
            raise ValueError(
                f"linearize.layers must list layers 0..{num_hidden_layers - 1} in order, one entry each"
            )
        for l in layers:
            check_attention(f"linearize.layers[{l['layer']}].attention", l.get("attention"))
        self.linearize = linearize
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # The family's details, as linearize-models' config.rs derives them.
    @property
    def gemma(self):
        return self.base_model_type == GEMMA

    @property
    def qkv_bias(self):
        return self.attention_bias if self.base_model_type in ("llama", "qwen3", GEMMA) else self.base_model_type == "qwen2"

    @property
    def o_proj_bias(self):
        return self.base_model_type in ("llama", "qwen3", GEMMA) and self.attention_bias

    @property
    def has_mlp_bias(self):
        return self.base_model_type == "llama" and self.mlp_bias

    @property
    def qk_norm(self):
        return self.base_model_type in ("qwen3", GEMMA)

    def is_local(self, index):
        """Whether decoder layer `index` is one of Gemma 3's sliding-window layers, which have their
        own RoPE base."""
        return self.gemma and self.layer_types[index] == "sliding_attention"

    def teacher_window(self, index):
        """The softmax window of the base model's own attention in layer `index`: mistral's
        sliding_window in every layer, Gemma 3's in its sliding_attention layers, else None."""
        if self.base_model_type == "mistral" or self.is_local(index):
            return self.sliding_window
        return None

    def layer_attention(self, index):
        """The attention config (dict) of decoder layer `index`."""
        return self.linearize["layers"][index]["attention"]


__all__ = ["LinearizeConfig"]
