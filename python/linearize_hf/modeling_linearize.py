# PyTorch modeling code for models converted by linearize (https://github.com/linearize/linearize):
# a Llama-family decoder (or Gemma 3's text decoder) whose attention layers each run their own
# method (softmax, linear attention with a feature map, LoLCATs, Lizard, sliding window, Liger GLA, Liger,
# Gated DeltaNet; the windowed ones optionally with sink tokens; any of them with some query heads
# kept softmax, a head-level hybrid). This file is copied
# into every export by the `linearize` binary; the copy in the repository's python/linearize_hf/
# is the one source. The math follows linearize-attention's naive and recurrent forms
# (crates/linearize-attention/src/ops/*): a whole sequence runs the quadratic (masked) form,
# `generate` carries each layer's recurrent state as its cache and decodes one token at a time.
# Gemma 3 (linearize-models' llama.rs) runs transformers' own Gemma3RMSNorm (scale 1 + weight, in
# f32) and Gemma3MLP (GeGLU); the rest of its decoder is here: norms after attention and the MLP
# too, embeddings scaled by sqrt(hidden), queries by query_pre_attn_scalar, the local layers'
# RoPE base and window, soft-capped logits.
#
# Adding a method: one subclass of `LinearizeAttention` (its parameters, `forward_core` for a
# fresh sequence, `prefill_state` and `step` for decoding) and one entry in `ATTENTION_CLASSES`,
# plus its keys in configuration_linearize.METHOD_KEYS.
"""LinearizeForCausalLM: a converted Llama-family decoder with linear or hybrid attention."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm

from .configuration_linearize import LinearizeConfig


def compute_dtype(x):
    """Kernels accumulate in f32 (f64 stays f64), whatever the input dtype, as linearize does."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def repeat_heads(x, heads):
    """(b, h', L, d) -> (b, heads, L, d): head i of the result is head i // (heads / h') (HF's repeat_kv)."""
    if x.shape[1] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def window_masks(shape, size, q_pos, k_pos, sinks=0):
    """Boolean `(window, linear)` masks for broadcastable int64 positions: `window` marks causal keys
    inside the softmax window of their query or before position `sinks` (sink tokens stay softmax
    keys of every query), `linear` the other causal keys. `sw`: the last `size` tokens; `tk`
    (terrace): the query's block of `size` tokens and the block before, blocks aligned to position 0."""
    causal = k_pos <= q_pos
    if shape == "sw":
        inside = (q_pos - k_pos) < size
    else:
        inside = k_pos >= (torch.div(q_pos, size, rounding_mode="floor") - 1) * size
    softmax = inside | (k_pos < sinks)
    return causal & softmax, causal & ~softmax


def window_start(shape, size, t):
    """The first position inside the window of query `t`: the sinks before it are separate keys."""
    start = t - size + 1 if shape == "sw" else (t // size - 1) * size
    return max(start, 0)


def window_reach(shape, size):
    """How many earlier tokens a query's window can reach: the decoding cache keeps that many."""
    return size - 1 if shape == "sw" else 2 * size - 1


def sink_state(k, v, offset, sinks, dtype):
    """The keys and values of the tokens k, v (b, ·, L, ·) from position `offset` that are sinks
    (position < `sinks`), kept beside the window cache: `sink_k`, `sink_v` (b, ·, n, ·)."""
    n = min(max(sinks - offset, 0), k.shape[2])
    return {"sink_k": k[:, :, :n].to(dtype), "sink_v": v[:, :, :n].to(dtype)}


def sink_step(state, k, v, t, sinks):
    """Adds the token at position `t` to the sink cache when it is a sink."""
    if t < sinks:
        state["sink_k"] = torch.cat([state["sink_k"], k.to(state["sink_k"].dtype)], 2)
        state["sink_v"] = torch.cat([state["sink_v"], v.to(state["sink_v"].dtype)], 2)


def visible_sinks(state, shape, size, t):
    """The sinks a query at `t` sees as separate keys: those before its window (the later ones are
    in its window cache), (b, ·, n, ·) each."""
    n = min(state["sink_k"].shape[2], window_start(shape, size, t))
    return state["sink_k"][:, :, :n], state["sink_v"][:, :, :n]


def without_sinks(phi_k, offset, sinks):
    """phi_k (b, h, L, f) of tokens from position `offset` with the rows of sinks zeroed: a sink is
    never a linear key, so its features enter no linear sum."""
    n = min(max(sinks - offset, 0), phi_k.shape[2])
    if n == 0:
        return phi_k
    return torch.cat([torch.zeros_like(phi_k[:, :, :n]), phi_k[:, :, n:]], 2)


# ----------------------------------------------------------------------------- feature maps
class HeadProjection(nn.Module):
    """The per-head `xW + b` of the learned maps: W (h, d, f), b (h, f)."""

    def __init__(self, heads, head_dim, feature_dim, bias):
        super().__init__()
        self.heads = heads
        self.W = nn.Parameter(torch.empty(heads, head_dim, feature_dim))
        self.b = nn.Parameter(torch.zeros(heads, feature_dim)) if bias else None
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))

    def project(self, x):
        x = repeat_heads(x.to(compute_dtype(x)), self.heads)  # (b, h, L, d)
        z = x @ self.W.to(x.dtype)  # (b, h, L, f)
        return z if self.b is None else z + self.b.to(x.dtype)[:, None, :]


class HedgehogMap(HeadProjection):
    """Hedgehog: [softmax_f(xW + b), softmax_f(-(xW + b))], or the first half with `half_space`."""

    def __init__(self, heads, head_dim, cfg):
        super().__init__(heads, head_dim, cfg["feature_dim"], cfg["bias"])
        self.half_space = cfg["half_space"]

    def forward(self, x):
        z = self.project(x)
        if self.half_space:
            return z.softmax(-1)
        return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)


class T2rMap(HeadProjection):
    """T2R: relu(xW + b)."""

    def __init__(self, heads, head_dim, cfg):
        super().__init__(heads, head_dim, cfg["feature_dim"], cfg["bias"])

    def forward(self, x):
        return self.project(x).relu()


class EluMap(nn.Module):
    """elu(x) + 1."""

    def __init__(self, heads, head_dim, cfg):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        return F.elu(repeat_heads(x.to(compute_dtype(x)), self.heads)) + 1.0


class BasedMap(nn.Module):
    """Based's 2nd-order Taylor map [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]."""

    def __init__(self, heads, head_dim, cfg):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        z = repeat_heads(x.to(compute_dtype(x)), self.heads)
        d = z.shape[-1]
        outer = (z.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
        return torch.cat([torch.ones_like(z[..., :1]), z / d**0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], -1)


class SoftmaxDimMap(nn.Module):
    """softmax over the head dimension (Liger's parameter-free map)."""

    def __init__(self, heads, head_dim, cfg):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        return repeat_heads(x.to(compute_dtype(x)), self.heads).softmax(-1)


FEATURE_MAPS = {
    "hedgehog": HedgehogMap,
    "t2r": T2rMap,
    "elu": EluMap,
    "based": BasedMap,
    "softmax_dim": SoftmaxDimMap,
}


# ----------------------------------------------------------------------------- decoder parts
class LinearizeRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_norm(config, dim):
    """The family's RMSNorm: Gemma's scales by 1 + weight in f32 (transformers' own module)."""
    return Gemma3RMSNorm(dim, config.rms_norm_eps) if config.gemma else LinearizeRMSNorm(dim, config.rms_norm_eps)


class LinearizeRotaryEmbedding(nn.Module):
    """HF's rotate-half RoPE of base `theta`; inverse frequencies (with linear or Llama 3.1
    scaling) computed in f64, angles in f32."""

    def __init__(self, head_dim, theta, scaling):
        super().__init__()
        d = head_dim
        inv_freq = [1.0 / theta ** (2.0 * i / d) for i in range(d // 2)]
        rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        if rope_type == "linear":
            inv_freq = [f / scaling["factor"] for f in inv_freq]
        elif rope_type == "llama3":
            factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old_len = scaling["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            scaled = []
            for f in inv_freq:
                wavelen = 2.0 * math.pi / f
                if wavelen < high_wavelen:
                    scaled.append(f)
                elif wavelen > low_wavelen:
                    scaled.append(f / factor)
                else:
                    smooth = (old_len / wavelen - low) / (high - low)
                    scaled.append((1.0 - smooth) * f / factor + smooth * f)
            inv_freq = scaled
        # A plain list, not a buffer: nothing to load, nothing lost when weights are loaded lazily.
        self.inv_freq = inv_freq

    def forward(self, positions, dtype):
        """positions (L,) int64 -> cos, sin (L, d) in `dtype`."""
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float64, device=positions.device).float()
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class LinearizeMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.has_mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- attention
class LinearizeAttention(nn.Module):
    """The projections of a layer (q/k/v/o, qwen3's q/k norms) around its attention core. A method
    subclasses it and implements, on q, k (after RoPE), v and q_raw, k_raw (before RoPE), shapes
    (b, h or h_kv, L, d):
      - `forward_core(x)`: the output (b, h, L, d) of a fresh causal pass over the L tokens;
      - `prefill_state(x)`: the decoding state after those tokens (a dict of tensors);
      - `step(state, x)`: the output of one new token (L = 1), updating `state` in place.
    `x` is a dict with q, k, v, q_raw, k_raw and `offset` (the absolute position of the first token).
    """

    def __init__(self, config, layer_idx, attention):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        nq, nkv = config.num_attention_heads, config.num_key_value_heads
        self.layer_idx = layer_idx
        self.attention = attention
        self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d
        self.q_proj = nn.Linear(h, nq * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, nkv * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, nkv * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(nq * d, h, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = rms_norm(config, d)
            self.k_norm = rms_norm(config, d)
        else:
            self.q_norm = self.k_norm = None
        # Gemma scales scores by query_pre_attn_scalar^-1/2, not head_dim^-1/2: the queries after
        # RoPE are multiplied by sqrt(d / scalar) so that every method's 1/sqrt(d) gives Gemma's.
        scale = math.sqrt(d / config.query_pre_attn_scalar) if config.gemma else 1.0
        self.query_scale = None if scale == 1.0 else scale
        # A head-level hybrid: these query heads keep the teacher's softmax attention (over the
        # teacher layer's own window).
        self.softmax_heads = attention.get("softmax_heads")
        self.teacher_window = config.teacher_window(layer_idx)
        if self.softmax_heads is not None and self.softmax_heads[-1] >= nq:
            raise ValueError(
                f"layer {layer_idx}: softmax_heads {self.softmax_heads} name a head the model does not have ({nq})"
            )

    def forward(self, hidden, cos, sin, offset, cache=None):
        b, L, _ = hidden.shape

        def heads(proj, n, norm):
            y = proj(hidden).view(b, L, n, self.head_dim)
            if norm is not None:
                y = norm(y)
            return y.transpose(1, 2)  # (b, n, L, d)

        q_raw = heads(self.q_proj, self.num_heads, self.q_norm)
        k_raw = heads(self.k_proj, self.num_kv_heads, self.k_norm)
        v = heads(self.v_proj, self.num_kv_heads, None)
        q = apply_rope(q_raw, cos, sin)
        x = {
            "q": q if self.query_scale is None else q * self.query_scale,
            "k": apply_rope(k_raw, cos, sin),
            "v": v,
            "q_raw": q_raw,
            "k_raw": k_raw,
            "offset": offset,
        }
        if cache is None:
            y = self.forward_core(x)
        else:
            y = self.cached_core(x, cache)
        if self.softmax_heads is not None:
            # Every head runs the method (heads are independent); the chosen ones' rows are
            # replaced by the teacher's softmax.
            y = y.index_copy(1, torch.tensor(self.softmax_heads, device=y.device), self.softmax_heads_core(x, cache).to(y.dtype))
        y = y.to(v.dtype).transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim)
        return self.o_proj(y)

    def cached_core(self, x, cache):
        """Runs the new tokens on from the layer's state in `cache`, which it updates."""
        state = cache.states[self.layer_idx]
        if state is None:
            cache.states[self.layer_idx] = self.prefill_state(x)
            return self.forward_core(x)
        outputs = []
        for t in range(x["q"].shape[2]):
            token = {k: (v[:, :, t : t + 1] if torch.is_tensor(v) else v + t) for k, v in x.items()}
            outputs.append(self.step(state, token))
        return torch.cat(outputs, dim=2)

    def softmax_heads_core(self, x, cache):
        """The chosen heads' softmax output (b, n, L, d); the cache holds keys and values of only
        the key/value heads they read (`cache.head_states`)."""
        group = self.num_heads // self.num_kv_heads
        kv = sorted({h // group for h in self.softmax_heads})
        k, v, k_offset = x["k"][:, kv], x["v"][:, kv], x["offset"]
        if cache is not None:
            state = cache.head_states[self.layer_idx]
            if state is None:
                state = cache.head_states[self.layer_idx] = {"k": k, "v": v, "start": k_offset}
            else:
                state["k"] = torch.cat([state["k"], k], dim=2)
                state["v"] = torch.cat([state["v"], v], dim=2)
            k, v, k_offset = state["k"], state["v"], state["start"]
        # Each chosen head with its own key/value head (no GQA sharing left to do).
        own = [kv.index(h // group) for h in self.softmax_heads]
        q = x["q"][:, self.softmax_heads]
        return softmax_attend(q, k[:, own], v[:, own], x["offset"], k_offset, self.teacher_window)

    def forward_core(self, x):
        raise NotImplementedError

    def prefill_state(self, x):
        raise NotImplementedError

    def step(self, state, x):
        raise NotImplementedError


def scaled_scores(q, k):
    """q (b, h, Lq, d), k (b, h_k, Lk, d) -> q.k / sqrt(d) (b, h, Lq, Lk) in the compute dtype."""
    dtype = compute_dtype(q)
    h = q.shape[1]
    return (q.to(dtype) @ repeat_heads(k.to(dtype), h).transpose(-1, -2)) / math.sqrt(q.shape[-1])


def softmax_attend(q, k, v, q_offset, k_offset, window):
    """Causal softmax attention of queries at positions q_offset.. over keys at k_offset.., within
    the last `window` positions when there is one."""
    Lq, Lk = q.shape[2], k.shape[2]
    q_pos = torch.arange(q_offset, q_offset + Lq, device=q.device)[:, None]
    k_pos = torch.arange(k_offset, k_offset + Lk, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & ((q_pos - k_pos) < window)
    scores = scaled_scores(q, k).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ repeat_heads(v.to(scores.dtype), q.shape[1])


class SoftmaxAttention(LinearizeAttention):
    """The teacher's causal softmax attention (over its own `sliding_window` for mistral and
    Gemma 3's local layers); the decoding state is the KV cache."""

    def attend(self, q, k, v, q_offset, k_offset):
        return softmax_attend(q, k, v, q_offset, k_offset, self.teacher_window)

    def forward_core(self, x):
        return self.attend(x["q"], x["k"], x["v"], x["offset"], x["offset"])

    def prefill_state(self, x):
        return {"k": x["k"], "v": x["v"], "start": x["offset"]}

    def cached_core(self, x, cache):
        state = cache.states[self.layer_idx]
        if state is None:
            cache.states[self.layer_idx] = self.prefill_state(x)
            return self.forward_core(x)
        state["k"] = torch.cat([state["k"], x["k"]], dim=2)
        state["v"] = torch.cat([state["v"], x["v"]], dim=2)
        return self.attend(x["q"], state["k"], state["v"], x["offset"], state["start"])


class LinearAttention(LinearizeAttention):
    """Normalised linear attention with a feature map phi (after RoPE; separate maps for q, k):
    y_t = sum_{s<=t} (phi(q_t).phi(k_s)) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps)."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        fm = attention["feature_map"]
        make = FEATURE_MAPS[fm["kind"]]
        self.feature_map_q = make(self.num_heads, self.head_dim, fm)
        self.feature_map_k = make(self.num_heads, self.head_dim, fm)
        self.eps = attention["eps"]

    def forward_core(self, x):
        phi_q, phi_k = self.feature_map_q(x["q"]), self.feature_map_k(x["k"])  # (b, h, L, f)
        L = phi_q.shape[2]
        causal = torch.ones(L, L, dtype=torch.bool, device=phi_q.device).tril()
        a = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~causal, 0.0)
        v = repeat_heads(x["v"].to(a.dtype), self.num_heads)
        return (a @ v) / (a.sum(-1, keepdim=True) + self.eps)

    def prefill_state(self, x):
        phi_k = self.feature_map_k(x["k"])
        v = repeat_heads(x["v"].to(phi_k.dtype), self.num_heads)
        return {"kv": phi_k.transpose(-1, -2) @ v, "k_sum": phi_k.sum(2)}

    def step(self, state, x):
        phi_q, phi_k = self.feature_map_q(x["q"]), self.feature_map_k(x["k"])  # (b, h, 1, f)
        v = repeat_heads(x["v"].to(phi_k.dtype), self.num_heads)
        state["kv"] = state["kv"] + phi_k.transpose(-1, -2) @ v
        state["k_sum"] = state["k_sum"] + phi_k.sum(2)
        num = phi_q @ state["kv"]
        den = phi_q @ state["k_sum"].unsqueeze(-1) + self.eps
        return num / den


class LolcatsAttention(LinearizeAttention):
    """LoLCATs: softmax over a local window W(t) plus linear attention over the keys before it, one
    shared normaliser, per-head window factor gamma = sigmoid(window_factors):
      a_ts = gamma * exp(q_t.k_s / sqrt(d) - m_t)  for s in W(t)  (m_t: the max score in W(t))
      a_ts = phi(q_t).phi(k_s)                      for s < t outside W(t)
      y_t = sum_s a_ts v_s / sum_s a_ts.
    With `sinks` = N, the keys s < N join W(t) for every t >= s (same max, same gamma) and are
    never linear keys."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        fm = attention["feature_map"]
        make = FEATURE_MAPS[fm["kind"]]
        self.feature_map_q = make(self.num_heads, self.head_dim, fm)
        self.feature_map_k = make(self.num_heads, self.head_dim, fm)
        self.window_factors = nn.Parameter(torch.full((self.num_heads,), -2.1972))
        self.window_shape = attention["window_shape"]
        self.window_size = attention["window_size"]
        self.sinks = attention["sinks"]

    def gammas(self, dtype):
        return self.window_factors.to(dtype).sigmoid().view(1, -1, 1, 1)

    def forward_core(self, x):
        q, k, v = x["q"], x["k"], x["v"]
        L, off = q.shape[2], x["offset"]
        pos = torch.arange(off, off + L, device=q.device)
        window, linear = window_masks(self.window_shape, self.window_size, pos[:, None], pos[None, :], self.sinks)
        scores = scaled_scores(q, k).masked_fill(~window, float("-inf"))  # (b, h, L, L)
        a_window = (scores - scores.amax(-1, keepdim=True)).exp() * self.gammas(scores.dtype)
        phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(k)
        a_linear = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~linear, 0.0)
        a = a_window + a_linear
        return (a @ repeat_heads(v.to(a.dtype), self.num_heads)) / a.sum(-1, keepdim=True)

    def prefill_state(self, x):
        """The last `reach` tokens' k, phi(k), v as the window cache, the sinks' k and v; linear sums
        over the rest (sinks' features zeroed)."""
        k, v = x["k"], x["v"]
        phi_k = without_sinks(self.feature_map_k(k), x["offset"], self.sinks)
        L = k.shape[2]
        keep = min(L, window_reach(self.window_shape, self.window_size))
        leaving = L - keep
        dtype = phi_k.dtype
        v_rep = repeat_heads(v.to(dtype), self.num_heads)
        return {
            "k": k[:, :, leaving:].to(dtype),
            "phi_k": phi_k[:, :, leaving:],
            "v": v[:, :, leaving:].to(dtype),
            "kv": phi_k[:, :, :leaving].transpose(-1, -2) @ v_rep[:, :, :leaving],
            "k_sum": phi_k[:, :, :leaving].sum(2),
            "pos": x["offset"] + L,
            **sink_state(k, v, x["offset"], self.sinks, dtype),
        }

    def step_keys(self, state, x):
        """The keys a one-token step sees: the n visible sinks, then the cached tokens (positions
        t-m .. t-1) and the new one, with their features (zero for the sinks, which are softmax
        keys only), values, and which of them are softmax keys."""
        t, m = state["pos"], state["k"].shape[2]
        dtype = state["kv"].dtype
        phi_k = without_sinks(self.feature_map_k(x["k"]), t, self.sinks)
        sink_k, sink_v = visible_sinks(state, self.window_shape, self.window_size, t)
        n = sink_k.shape[2]
        sink_phi = phi_k.new_zeros(phi_k.shape[0], phi_k.shape[1], n, phi_k.shape[3])
        keys = torch.cat([sink_k, state["k"], x["k"].to(dtype)], 2)  # (b, h_k, n+m+1, d)
        phi_keys = torch.cat([sink_phi, state["phi_k"], phi_k], 2)  # (b, h, n+m+1, f)
        values = torch.cat([sink_v, state["v"], x["v"].to(dtype)], 2)  # (b, h_v, n+m+1, d)
        device = keys.device
        inside, _ = window_masks(
            self.window_shape,
            self.window_size,
            torch.tensor([t], device=device)[:, None],
            torch.arange(t - m, t + 1, device=device)[None, :],
        )  # (1, m+1)
        inside = torch.cat([torch.ones(1, n, dtype=torch.bool, device=device), inside], 1)  # (1, n+m+1)
        return n, keys, phi_keys, values, inside

    def step(self, state, x):
        h, t = self.num_heads, state["pos"]
        dtype = state["kv"].dtype
        m = state["k"].shape[2]
        phi_q = self.feature_map_q(x["q"])
        n, keys, phi_keys, values, inside = self.step_keys(state, x)
        scores = scaled_scores(x["q"], keys).masked_fill(~inside, float("-inf"))
        a_window = (scores - scores.amax(-1, keepdim=True)).exp() * self.gammas(dtype)
        a_cached_linear = (phi_q @ phi_keys.transpose(-1, -2)).masked_fill(inside, 0.0)
        a = a_window + a_cached_linear
        num = a @ repeat_heads(values, h) + phi_q @ state["kv"]
        den = a.sum(-1, keepdim=True) + phi_q @ state["k_sum"].unsqueeze(-1)
        # The token joins the cache (and the sinks, if it is one); what falls out of the window's
        # reach joins the linear sums.
        sink_step(state, x["k"], x["v"], t, self.sinks)
        keys, phi_keys, values = keys[:, :, n:], phi_keys[:, :, n:], values[:, :, n:]
        keep = min(m + 1, window_reach(self.window_shape, self.window_size))
        leaving = m + 1 - keep
        state["kv"] = state["kv"] + phi_keys[:, :, :leaving].transpose(-1, -2) @ repeat_heads(values[:, :, :leaving], h)
        state["k_sum"] = state["k_sum"] + phi_keys[:, :, :leaving].sum(2)
        state["k"], state["phi_k"], state["v"] = keys[:, :, leaving:], phi_keys[:, :, leaving:], values[:, :, leaving:]
        state["pos"] = t + 1
        return num / den


def decay_after(g):
    """For log-gates g (.., n): sum_{r > s} g_r at each s (the log-decay from each token to the
    last, its own gate excluded), summed from the end."""
    rev = g.flip(-1)
    return (rev.cumsum(-1) - rev).flip(-1)


class LizardGate(nn.Module):
    """Lizard's gate projection: one scalar per head and token from the head's raw key at unit
    norm, log alpha = logsigmoid(weight . k_raw / |k_raw| + bias) / gate_normalizer."""

    def __init__(self, heads, head_dim, gate_normalizer):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, head_dim))
        self.bias = nn.Parameter(torch.full((heads,), 5.0))
        self.gate_normalizer = gate_normalizer

    def forward(self, k_raw):
        """k_raw (b, h_kv, L, d) -> log-gates (b, h, L) in the compute dtype."""
        dtype = compute_dtype(k_raw)
        k = l2_normalize(repeat_heads(k_raw.to(dtype), self.weight.shape[0]))
        z = (k @ self.weight.to(dtype).unsqueeze(-1)).squeeze(-1) + self.bias.to(dtype)[None, :, None]
        return F.logsigmoid(z) / self.gate_normalizer


class LizardAttention(LolcatsAttention):
    """Lizard: LoLCATs (window, sinks, one normaliser) whose linear terms decay by a learned scalar
    gate per head and token, alpha_r = exp(log_gates_r) (see LizardGate):
      a_ts = gamma * exp(q_t.k_s / sqrt(d) - m_t)                   for s in W(t)
      a_ts = phi(q_t).phi(k_s) * prod_{r=s+1..t} alpha_r             for s < t outside W(t).
    The decoding state keeps each cached token's log-gate; the linear sums are decayed to the
    token before the window cache."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        self.gate_proj = LizardGate(self.num_heads, self.head_dim, attention["gate_normalizer"])

    def forward_core(self, x):
        q, k, v = x["q"], x["k"], x["v"]
        L, off = q.shape[2], x["offset"]
        pos = torch.arange(off, off + L, device=q.device)
        window, linear = window_masks(self.window_shape, self.window_size, pos[:, None], pos[None, :], self.sinks)
        scores = scaled_scores(q, k).masked_fill(~window, float("-inf"))  # (b, h, L, L)
        a_window = (scores - scores.amax(-1, keepdim=True)).exp() * self.gammas(scores.dtype)
        cum = self.gate_proj(x["k_raw"]).to(scores.dtype).cumsum(-1)  # (b, h, L)
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~linear, float("-inf")).exp()
        phi_q, phi_k = self.feature_map_q(q), self.feature_map_k(k)
        a = a_window + (phi_q @ phi_k.transpose(-1, -2)) * decay
        return (a @ repeat_heads(v.to(a.dtype), self.num_heads)) / a.sum(-1, keepdim=True)

    def absorb(self, kv, k_sum, phi_k, v, g):
        """The linear sums decayed by the leaving tokens' gates, plus those tokens (phi_k (b, h, n, f),
        v (b, h, n, d), g (b, h, n)) each decayed to the last of them."""
        phi = phi_k * decay_after(g).exp().unsqueeze(-1)
        whole = g.sum(-1).exp()  # (b, h)
        return whole[..., None, None] * kv + phi.transpose(-1, -2) @ v, whole[..., None] * k_sum + phi.sum(2)

    def prefill_state(self, x):
        k, v = x["k"], x["v"]
        phi_k = without_sinks(self.feature_map_k(k), x["offset"], self.sinks)
        dtype = phi_k.dtype
        g = self.gate_proj(x["k_raw"]).to(dtype)
        b, h, L, f = phi_k.shape
        keep = min(L, window_reach(self.window_shape, self.window_size))
        leaving = L - keep
        v_rep = repeat_heads(v.to(dtype), h)
        zeros = phi_k.new_zeros(b, h, f, v.shape[-1]), phi_k.new_zeros(b, h, f)
        kv, k_sum = self.absorb(*zeros, phi_k[:, :, :leaving], v_rep[:, :, :leaving], g[:, :, :leaving])
        return {
            "k": k[:, :, leaving:].to(dtype),
            "phi_k": phi_k[:, :, leaving:],
            "v": v[:, :, leaving:].to(dtype),
            "g": g[:, :, leaving:],
            "kv": kv,
            "k_sum": k_sum,
            "pos": x["offset"] + L,
            **sink_state(k, v, x["offset"], self.sinks, dtype),
        }

    def step(self, state, x):
        h, t = self.num_heads, state["pos"]
        dtype = state["kv"].dtype
        m = state["k"].shape[2]
        phi_q = self.feature_map_q(x["q"])
        gates = torch.cat([state["g"], self.gate_proj(x["k_raw"]).to(dtype)], 2)  # (b, h, m+1)
        n, keys, phi_keys, values, inside = self.step_keys(state, x)
        # Decay of each cached key and the new one to this token; the sums before the cache decay
        # by every gate since them. Sinks get none (they are never linear keys).
        after = torch.cat([gates.new_zeros(gates.shape[0], h, n), decay_after(gates)], 2).exp()
        whole = gates.sum(-1).exp()[..., None, None]  # (b, h, 1, 1)
        scores = scaled_scores(x["q"], keys).masked_fill(~inside, float("-inf"))
        a_window = (scores - scores.amax(-1, keepdim=True)).exp() * self.gammas(dtype)
        a_cached_linear = ((phi_q @ phi_keys.transpose(-1, -2)) * after.unsqueeze(2)).masked_fill(inside, 0.0)
        a = a_window + a_cached_linear
        num = a @ repeat_heads(values, h) + whole * (phi_q @ state["kv"])
        den = a.sum(-1, keepdim=True) + whole * (phi_q @ state["k_sum"].unsqueeze(-1))
        # The token joins the cache (and the sinks, if it is one); what falls out of the window's
        # reach joins the decayed linear sums.
        sink_step(state, x["k"], x["v"], t, self.sinks)
        keys, phi_keys, values = keys[:, :, n:], phi_keys[:, :, n:], values[:, :, n:]
        keep = min(m + 1, window_reach(self.window_shape, self.window_size))
        leaving = m + 1 - keep
        state["kv"], state["k_sum"] = self.absorb(
            state["kv"],
            state["k_sum"],
            phi_keys[:, :, :leaving],
            repeat_heads(values[:, :, :leaving], h),
            gates[:, :, :leaving],
        )
        state["k"], state["phi_k"], state["v"] = keys[:, :, leaving:], phi_keys[:, :, leaving:], values[:, :, leaving:]
        state["g"] = gates[:, :, leaving:]
        state["pos"] = t + 1
        return num / den


def swa_attend(q, k, v, size, sinks, offset):
    """Causal softmax over the last `size` keys (the query's own included) and the first `sinks`."""
    L = q.shape[2]
    pos = torch.arange(offset, offset + L, device=q.device)
    window, _ = window_masks("sw", size, pos[:, None], pos[None, :], sinks)
    scores = scaled_scores(q, k).masked_fill(~window, float("-inf"))
    return scores.softmax(-1) @ repeat_heads(v.to(scores.dtype), q.shape[1])


def swa_state(k, v, size, sinks, offset, dtype):
    """The last size-1 keys and values, and the sinks'."""
    keep = min(k.shape[2], size - 1)
    return {
        "k": k[:, :, k.shape[2] - keep :].to(dtype),
        "v": v[:, :, v.shape[2] - keep :].to(dtype),
        **sink_state(k, v, offset, sinks, dtype),
    }


def swa_step(state, q, k, v, size, sinks, t):
    """One token (at position t) against the cache of the last size-1 keys and values and the sinks
    before them."""
    dtype = state["k"].dtype
    sink_k, sink_v = visible_sinks(state, "sw", size, t)
    keys = torch.cat([sink_k, state["k"], k.to(dtype)], 2)
    values = torch.cat([sink_v, state["v"], v.to(dtype)], 2)
    y = scaled_scores(q, keys).softmax(-1) @ repeat_heads(values, q.shape[1])
    sink_step(state, k, v, t, sinks)
    keys, values = keys[:, :, sink_k.shape[2] :], values[:, :, sink_k.shape[2] :]
    keep = min(keys.shape[2], size - 1)
    state["k"], state["v"] = keys[:, :, keys.shape[2] - keep :], values[:, :, values.shape[2] - keep :]
    return y


class SlidingWindowAttention(LinearizeAttention):
    """Softmax over a sliding window of `window_size` tokens and the first `sinks` tokens only."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        self.window_size = attention["window_size"]
        self.sinks = attention["sinks"]

    def forward_core(self, x):
        return swa_attend(x["q"], x["k"], x["v"], self.window_size, self.sinks, x["offset"])

    def prefill_state(self, x):
        return swa_state(x["k"], x["v"], self.window_size, self.sinks, x["offset"], compute_dtype(x["v"]))

    def step(self, state, x):
        return swa_step(state, x["q"], x["k"], x["v"], self.window_size, self.sinks, x["offset"])


GLA_CHUNK = 64


def gla_inputs(q_raw, k_raw, gate_normalizer):
    """Liger's GLA inputs from the projections before RoPE: softmax_d(q), softmax_d(k) and the
    log-gates logsigmoid(k) / gate_normalizer."""
    dtype = compute_dtype(q_raw)
    q, k = q_raw.to(dtype), k_raw.to(dtype)
    return q.softmax(-1), k.softmax(-1), F.logsigmoid(k) / gate_normalizer


def gla_chunked(q, k, v, g, state):
    """Gated linear attention S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = q_t S_t, from `state`
    (b, h, d_k, d_v), in chunks of GLA_CHUNK tokens: inside a chunk the masked (C, C, d_k) decays
    relative to the chunk's start (every exponent <= 0, so strongly decaying gates stay finite);
    across chunks the state. Returns the output (b, h, L, d_v) and the final state."""
    h = q.shape[1]
    dtype = q.dtype
    k, g = repeat_heads(k, h), repeat_heads(g, h)
    v = repeat_heads(v.to(dtype), h)
    outputs = []
    for c0 in range(0, q.shape[2], GLA_CHUNK):
        qc, kc, vc, gc = (t[:, :, c0 : c0 + GLA_CHUNK] for t in (q, k, v, g))
        C = qc.shape[2]
        cum = gc.cumsum(2)  # (b, h, C, d_k), non-increasing
        future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)[..., None]
        decay = (cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(future, float("-inf")).exp()
        a = (qc.unsqueeze(3) * kc.unsqueeze(2) * decay).sum(-1)  # (b, h, C, C)
        outputs.append(a @ vc + (qc * cum.exp()) @ state)
        last = cum[:, :, -1:]  # (b, h, 1, d_k)
        state = last.transpose(-1, -2).exp() * state + (kc * (last - cum).exp()).transpose(-1, -2) @ vc
    return torch.cat(outputs, 2), state


class LigerGlaAttention(LinearizeAttention):
    """Liger's gated linear attention alone (no new parameters)."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        self.gate_normalizer = attention["gate_normalizer"]

    def empty_state(self, x):
        q = x["q_raw"]
        dtype = compute_dtype(q)
        return torch.zeros(q.shape[0], self.num_heads, self.head_dim, x["v"].shape[-1], dtype=dtype, device=q.device)

    def gla(self, x, state):
        q, k, g = gla_inputs(x["q_raw"], x["k_raw"], self.gate_normalizer)
        return gla_chunked(q, k, x["v"], g, state)

    def forward_core(self, x):
        return self.gla(x, self.empty_state(x))[0]

    def prefill_state(self, x):
        return {"s": self.gla(x, self.empty_state(x))[1]}

    def step(self, state, x):
        y, state["s"] = self.gla(x, state["s"])
        return y


class LigerAttention(LigerGlaAttention):
    """Liger attention: 0.5 * sliding-window softmax (after RoPE) + 0.5 * GLA (before RoPE). Sinks
    join the window half only (the GLA half sums over every token anyway)."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        self.window_size = attention["window_size"]
        self.sinks = attention["sinks"]

    def forward_core(self, x):
        window = swa_attend(x["q"], x["k"], x["v"], self.window_size, self.sinks, x["offset"])
        return 0.5 * (window + super().forward_core(x))

    def prefill_state(self, x):
        state = swa_state(x["k"], x["v"], self.window_size, self.sinks, x["offset"], compute_dtype(x["v"]))
        state.update(super().prefill_state(x))
        return state

    def step(self, state, x):
        window = swa_step(state, x["q"], x["k"], x["v"], self.window_size, self.sinks, x["offset"])
        return 0.5 * (window + super().step(state, x))


def l2_normalize(x):
    """x / |x| over the last dim, with fla's epsilon (1e-6 under the root): a zero row stays zero."""
    return x / (x.square().sum(-1, keepdim=True) + 1e-6).sqrt()


class GatedDeltaNetAttention(LinearizeAttention):
    """Gated DeltaNet: the delta rule with a decay and write strength per head and token,
      S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,   o_t = q_t S_t,
    S (d_k, d_v) per query head, q and k unit rows (an optional SiLU, then the L2 norm; no
    1/sqrt(d)), read after RoPE with `rope` or before it. The gates come from u, the q, k and v
    heads before RoPE joined and scaled to unit norm:
      g = -exp(A_log) * softplus(u W_a^T + dt_bias),   beta = sigmoid(u W_b^T)."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        h = self.num_heads
        width = (h + 2 * self.num_kv_heads) * self.head_dim
        self.a_proj = nn.Parameter(torch.zeros(h, width))
        self.b_proj = nn.Parameter(torch.zeros(h, width))
        self.A_log = nn.Parameter(torch.zeros(h))
        self.dt_bias = nn.Parameter(torch.empty(h))
        init_delta_gates(self)
        self.rope = attention["rope"]
        self.qk_activation = attention["qk_activation"]

    def unit(self, x):
        x = x.to(compute_dtype(x))
        return l2_normalize(F.silu(x) if self.qk_activation == "silu" else x)

    def inputs(self, x):
        """Unit q (b, h, L, d) and k (b, h_kv, L, d), v, and the gates g, beta (b, h, L) in f32."""

        def flat(t):  # (b, n, L, d) -> (b, L, n * d)
            return t.float().transpose(1, 2).flatten(2)

        u = l2_normalize(torch.cat([flat(x["q_raw"]), flat(x["k_raw"]), flat(x["v"])], -1))  # (b, L, in)
        rate = F.softplus(u @ self.a_proj.float().t() + self.dt_bias.float())
        g = -(self.A_log.float().exp() * rate)
        beta = (u @ self.b_proj.float().t()).sigmoid()
        q, k = (x["q"], x["k"]) if self.rope else (x["q_raw"], x["k_raw"])
        return self.unit(q), self.unit(k), x["v"], g.transpose(1, 2), beta.transpose(1, 2)

    def run(self, x, state):
        """The delta rule token by token from `state` (b, h, d_k, d_v); returns outputs and state."""
        q, k, v, g, beta = self.inputs(x)
        dtype = q.dtype
        h = self.num_heads
        k, v = repeat_heads(k, h), repeat_heads(v.to(dtype), h)
        g, beta = g.to(dtype)[..., None], beta.to(dtype)[..., None]  # (b, h, L, 1)
        outputs = []
        for t in range(q.shape[2]):
            k_t = k[:, :, t : t + 1]  # (b, h, 1, d_k)
            decayed = g[:, :, t : t + 1].exp() * state
            # The correction replaces what the decayed state holds for k_t by v_t, at strength beta.
            delta = beta[:, :, t : t + 1] * (v[:, :, t : t + 1] - k_t @ decayed)  # (b, h, 1, d_v)
            state = decayed + k_t.transpose(-1, -2) @ delta
            outputs.append(q[:, :, t : t + 1] @ state)
        return torch.cat(outputs, 2), state

    def empty_state(self, x):
        v = x["v"]
        dtype = compute_dtype(v)
        return torch.zeros(v.shape[0], self.num_heads, self.head_dim, v.shape[-1], dtype=dtype, device=v.device)

    def forward_core(self, x):
        return self.run(x, self.empty_state(x))[0]

    def prefill_state(self, x):
        return {"s": self.run(x, self.empty_state(x))[1]}

    def step(self, state, x):
        y, state["s"] = self.run(x, state["s"])
        return y


class GdnWindowAttention(GatedDeltaNetAttention):
    """Gated DeltaNet behind a softmax window: the softmax over the last `window_size` tokens and
    the first `sinks` (sliding_window's output) plus a learned scale per head times the delta
    rule's readout of its state after token t - w, aged by the gates of the w tokens since:
      o_t = SWA_t + delta_scale_h * exp(g_{t-w+1} + ... + g_t) q_t S_{t-w}.
    S runs the delta rule (as GatedDeltaNetAttention's) over the tokens that have left the window;
    the sinks never write into it (their beta is zero). Here token by token: the window's tokens
    wait in `pending` until they leave it."""

    def __init__(self, config, layer_idx, attention):
        super().__init__(config, layer_idx, attention)
        self.window_size = attention["window_size"]
        self.sinks = attention["sinks"]
        self.delta_scale = nn.Parameter(torch.full((self.num_heads,), 0.1))

    def memory(self, x, state):
        """The delta term (b, h, L, d_v) of the new tokens at positions offset.., from `state` (s:
        the delta state after every token that left the window; pending: the window's tokens not
        yet written, their k, v, g and beta), which it updates."""
        q, k, v, g, beta = self.inputs(x)
        dtype = q.dtype
        h = self.num_heads
        k, v = repeat_heads(k, h), repeat_heads(v.to(dtype), h)
        g, beta = g.to(dtype), beta.to(dtype)  # (b, h, L)
        outputs = []
        for t in range(q.shape[2]):
            if x["offset"] + t < self.sinks:
                beta = beta.clone()
                beta[:, :, t] = 0
            token = {"k": k[:, :, t : t + 1], "v": v[:, :, t : t + 1], "g": g[:, :, t : t + 1], "beta": beta[:, :, t : t + 1]}
            pending = {name: torch.cat([state["pending"][name], token[name]], 2) for name in token}
            lag = pending["g"].sum(2)[..., None, None]  # (b, h, 1, 1): the w - 1 pending gates and this one
            outputs.append(lag.exp() * (q[:, :, t : t + 1] @ state["s"]))
            if pending["g"].shape[2] == self.window_size:
                # The oldest pending token leaves the window: written into S.
                k_j, v_j = pending["k"][:, :, :1], pending["v"][:, :, :1]
                decayed = pending["g"][:, :, :1, None].exp() * state["s"]
                delta = pending["beta"][:, :, :1, None] * (v_j - k_j @ decayed)
                state["s"] = decayed + k_j.transpose(-1, -2) @ delta
                pending = {name: p[:, :, 1:] for name, p in pending.items()}
            state["pending"] = pending
        y = torch.cat(outputs, 2)
        return self.delta_scale.to(dtype)[None, :, None, None] * y

    def empty_memory(self, x):
        v = x["v"]
        b, d = v.shape[0], self.head_dim
        dtype = compute_dtype(v)
        empty = lambda *size: torch.zeros(b, self.num_heads, *size, dtype=dtype, device=v.device)
        return {
            "s": empty(d, v.shape[-1]),
            "pending": {"k": empty(0, d), "v": empty(0, v.shape[-1]), "g": empty(0), "beta": empty(0)},
        }

    def window(self, x):
        return swa_attend(x["q"], x["k"], x["v"], self.window_size, self.sinks, x["offset"])

    def forward_core(self, x):
        return self.window(x) + self.memory(x, self.empty_memory(x))

    def prefill_state(self, x):
        state = swa_state(x["k"], x["v"], self.window_size, self.sinks, x["offset"], compute_dtype(x["v"]))
        memory = self.empty_memory(x)
        self.memory(x, memory)
        state["memory"] = memory
        return state

    def step(self, state, x):
        window = swa_step(state, x["q"], x["k"], x["v"], self.window_size, self.sinks, x["offset"])
        return window + self.memory(x, state["memory"])


def init_delta_gates(module):
    """linearize's untrained gates: W_a = W_b = 0, A_log = 0 and log-spaced time steps dt from 1e-3
    to 1e-1 over the heads (dt_bias = softplus^-1(dt))."""
    h = module.dt_bias.shape[0]
    frac = torch.arange(h, dtype=torch.float64) / max(h - 1, 1)
    dt = (math.log(1e-3) + frac * (math.log(1e-1) - math.log(1e-3))).exp()
    with torch.no_grad():
        module.a_proj.zero_()
        module.b_proj.zero_()
        module.A_log.zero_()
        module.dt_bias.copy_(dt.expm1().log())


# The attention class of each method a layer's config may name.
ATTENTION_CLASSES = {
    "softmax": SoftmaxAttention,
    "linear": LinearAttention,
    "lolcats": LolcatsAttention,
    "lizard": LizardAttention,
    "sliding_window": SlidingWindowAttention,
    "liger_gla": LigerGlaAttention,
    "liger": LigerAttention,
    "gated_deltanet": GatedDeltaNetAttention,
    "gdn_window": GdnWindowAttention,
}


# ----------------------------------------------------------------------------- model
class LinearizeCache:
    """The decoding state of every layer (a KV cache for softmax layers, the recurrent state and
    window cache for the others) and the number of tokens seen."""

    def __init__(self, num_layers):
        self.states = [None] * num_layers
        # The KV caches of the softmax heads of head-level hybrid layers.
        self.head_states = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx=0):
        return self.seen

    def reorder_cache(self, beam_idx):
        """Beam search: picks each state's sequences by `beam_idx`."""
        for state in self.states + self.head_states:
            for key, value in (state or {}).items():
                if torch.is_tensor(value):
                    state[key] = value.index_select(0, beam_idx.to(value.device))


class LinearizeDecoderLayer(nn.Module):
    """A pre-norm residual block; Gemma's also norms the attention and MLP outputs (its
    post_attention_layernorm is the attention output's norm, pre_feedforward_layernorm the MLP's
    input norm)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        attention = config.layer_attention(layer_idx)
        h = config.hidden_size
        self.local = config.is_local(layer_idx)
        self.gemma = config.gemma
        self.input_layernorm = rms_norm(config, h)
        self.self_attn = ATTENTION_CLASSES[attention["method"]](config, layer_idx, attention)
        self.post_attention_layernorm = rms_norm(config, h)
        if config.gemma:
            self.pre_feedforward_layernorm = rms_norm(config, h)
            self.post_feedforward_layernorm = rms_norm(config, h)
            self.mlp = Gemma3MLP(config)
        else:
            self.mlp = LinearizeMLP(config)

    def forward(self, x, cos, sin, offset, cache=None):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, offset, cache)
        if not self.gemma:
            h = x + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = x + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class LinearizePreTrainedModel(PreTrainedModel):
    config_class = LinearizeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LinearizeDecoderLayer"]
    # The decoding state is this model's own (recurrent states do not fit transformers' KV caches).
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # `generate` must not make a DynamicCache (transformers 5 does by default): the first
        # forward makes a LinearizeCache and returns it for the next step.
        return False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, LinearizeRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, Gemma3RMSNorm):
            module.weight.data.zero_()
        elif isinstance(module, HeadProjection):
            nn.init.kaiming_uniform_(module.W.data, a=math.sqrt(5))
            if module.b is not None:
                module.b.data.zero_()
        elif isinstance(module, LolcatsAttention):
            module.window_factors.data.fill_(-2.1972)
        elif isinstance(module, LizardGate):
            module.weight.data.zero_()
            module.bias.data.fill_(5.0)
        elif isinstance(module, GatedDeltaNetAttention):
            init_delta_gates(module)


def check_attention_mask(attention_mask, cache):
    """Tokens are never masked out: a recurrent state cannot skip a padded token. A mask is
    accepted when it keeps every token, or, in a pass that keeps no decoding state, when it only
    pads the end of a row (no real token attends to what follows it)."""
    if attention_mask is None or bool(attention_mask.all()):
        return
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    if cache is not None or not right_padded:
        raise ValueError(
            "LinearizeForCausalLM does not support padding inside or before the tokens (left padding, "
            "padded batches in generate): run one sequence per batch, or right-pad and pass use_cache=False to score"
        )


class LinearizeModel(LinearizePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LinearizeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = rms_norm(config, config.hidden_size)
        self.rotary_emb = LinearizeRotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        # Gemma's local layers rotate by a RoPE base of their own, unscaled.
        self.local_rotary_emb = (
            LinearizeRotaryEmbedding(config.head_dim, config.rope_local_base_freq, None) if config.gemma else None
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
            if self.config.gemma:
                # sqrt(hidden) rounded to the model dtype, as Gemma3TextScaledWordEmbedding does.
                inputs_embeds = inputs_embeds * torch.tensor(self.config.hidden_size**0.5).to(inputs_embeds.dtype)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = past_key_values
        if cache is None and use_cache:
            cache = LinearizeCache(len(self.layers))
        if cache is not None and not isinstance(cache, LinearizeCache):
            raise TypeError(f"past_key_values must be a LinearizeCache, got {type(cache).__name__}")
        check_attention_mask(attention_mask, cache)
        offset = cache.seen if cache is not None else 0
        L = inputs_embeds.shape[1]
        positions = torch.arange(offset, offset + L, device=inputs_embeds.device)
        rope = self.rotary_emb(positions, inputs_embeds.dtype)
        local_rope = rope if self.local_rotary_emb is None else self.local_rotary_emb(positions, inputs_embeds.dtype)
        x = inputs_embeds
        hidden_states = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            cos, sin = local_rope if layer.local else rope
            x = layer(x, cos, sin, offset, cache)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        if cache is not None:
            cache.seen += L
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class LinearizeForCausalLM(LinearizePreTrainedModel, GenerationMixin):
    # transformers 5 maps each tied weight to its source; 4 lists the tied weights.
    if int(transformers.__version__.split(".")[0]) >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = LinearizeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping if self.config.gemma else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states
        )
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        # The cache has seen the first `seen` tokens: only the rest goes in.
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.seen :]
            inputs = {"input_ids": input_ids}
        elif inputs_embeds is not None:
            inputs = {"inputs_embeds": inputs_embeds}
        else:
            inputs = {"input_ids": input_ids}
        inputs.update(
            {
                "past_key_values": past_key_values,
                "attention_mask": attention_mask,
                "use_cache": use_cache,
            }
        )
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


__all__ = ["LinearizeForCausalLM", "LinearizeModel", "LinearizePreTrainedModel", "LinearizeCache", "ATTENTION_CLASSES"]
