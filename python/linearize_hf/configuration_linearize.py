# The configuration of a model converted by linearize (https://github.com/linearize/linearize):
# a Llama-family decoder (llama, mistral, qwen2, qwen3) whose attention layers each run the method
# that the `linearize` section of config.json names. This file is copied into every export by the
# `linearize` binary (the copy in the repository's python/linearize_hf/ is the one source).
"""LinearizeConfig: the `model_type: linearize` configuration."""
from transformers import PretrainedConfig

# The decoder families linearize converts, with what each implies (as linearize-models'
# config.rs reads them): bias on q/k/v, bias on o_proj, RMSNorm of q and k heads.
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

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
    "linear": ({"feature_map", "eps"}, {"chunk_size"}),
    "lolcats": ({"feature_map", "window_shape", "window_size", "sinks"}, {"chunk_size", "fused_kernels"}),
    "sliding_window": ({"window_size", "sinks"}, {"chunk_size"}),
    "liger_gla": ({"gate_normalizer"}, {"chunk_size", "sub_chunk", "fused_kernels"}),
    "liger": ({"window_size", "gate_normalizer", "sinks"}, {"chunk_size", "sub_chunk", "fused_kernels"}),
    "gated_deltanet": ({"rope", "qk_activation"}, {"chunk_size"}),
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
    _check_keys(where, set(attention) - {"method"}, required, optional)
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


class LinearizeConfig(PretrainedConfig):
    r"""
    A Llama-family decoder converted by linearize. The decoder keys are the base model's (as in
    its own config.json); `base_model_type` names its family and `linearize` is the section that
    linearize writes: `layers`, one entry per decoder layer with its `attention` (method and
    settings), plus provenance (`base_model`, `recipe_hash`, `tool_version`, `lora`).
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
        rope_theta=10000.0,
        rope_scaling=None,
        attention_bias=False,
        mlp_bias=False,
        sliding_window=None,
        use_sliding_window=False,
        tie_word_embeddings=False,
        use_cache=True,
        linearize=None,
        **kwargs,
    ):
        if base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(
                f"base_model_type {base_model_type!r} is not supported (expected one of {BASE_MODEL_TYPES})"
            )
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported (expected 'silu')")
        if base_model_type in ("qwen2", "qwen3") and use_sliding_window:
            raise ValueError("use_sliding_window: per-layer sliding windows of qwen models are not supported")
        self.base_model_type = base_model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        self.use_sliding_window = use_sliding_window
        self.use_cache = use_cache
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type not in ("llama3", "default"):
                raise ValueError(f"rope_scaling: rope_type {rope_type!r} is not supported (llama3 or default)")
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
    def qkv_bias(self):
        return {"llama": self.attention_bias, "qwen3": self.attention_bias, "mistral": False, "qwen2": True}[
            self.base_model_type
        ]

    @property
    def o_proj_bias(self):
        return self.base_model_type in ("llama", "qwen3") and self.attention_bias

    @property
    def has_mlp_bias(self):
        return self.base_model_type == "llama" and self.mlp_bias

    @property
    def qk_norm(self):
        return self.base_model_type == "qwen3"

    @property
    def teacher_window(self):
        """The softmax window of the base model's own attention (mistral's sliding_window)."""
        return self.sliding_window if self.base_model_type == "mistral" else None

    def layer_attention(self, index):
        """The attention config (dict) of decoder layer `index`."""
        return self.linearize["layers"][index]["attention"]


__all__ = ["LinearizeConfig"]
