//! The swappable attention core of a layer (what turns q, k, v into the output before o_proj),
//! and the teacher: causal softmax attention with a KV cache. Passes without earlier context go
//! through libtorch's fused scaled-dot-product attention; continuing from a cache uses a grouped
//! product over the cache in place (see [`grouped_attention`] for why).
use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

/// Everything the attention core of one layer sees for L new tokens.
pub struct MixerInput<'a> {
    pub q: &'a Tensor, // (b, h, L, d) after q_norm (qwen3) and RoPE
    pub k: &'a Tensor, // (b, h_kv, L, d) after k_norm and RoPE
    pub v: &'a Tensor, // (b, h_kv, L, d)
    /// (b, h, L, d) after q_norm, before RoPE (Liger's feature maps use these).
    pub q_raw: &'a Tensor,
    /// (b, h_kv, L, d) after k_norm, before RoPE.
    pub k_raw: &'a Tensor,
    /// Absolute position of the first of the L tokens.
    pub offset: i64,
    /// `offset` as an int64 scalar on the device, given when the step is captured into a CUDA
    /// graph: a host value would be frozen into the captured kernels, so a mixer whose step
    /// depends on the absolute position reads it from here, or refuses to be captured.
    pub position: Option<&'a Tensor>,
}

/// A mixer's decoding state for one layer (a KV cache, a recurrent state, ...); only the mixer
/// that made it knows its type.
pub type MixerState = Box<dyn std::any::Any + Send>;

pub trait Mixer: Send {
    /// (b, h, L, d) attention output before o_proj. With `state`, continue from it and update it
    /// (prefill or one-token decode); without, a fresh causal pass over the L tokens.
    fn forward(&self, input: &MixerInput, state: Option<&mut MixerState>) -> Result<Tensor>;

    fn new_state(&self, batch: i64) -> Result<MixerState>;

    /// A state on `device` in which each sequence of `state` is repeated `times` times (sequence
    /// `i` becomes `i * times .. (i + 1) * times`), with room for `reserve` more tokens where the
    /// state grows: one prompt's state forked into several continuations, or moved.
    fn fork_state(
        &self,
        state: &MixerState,
        times: i64,
        reserve: i64,
        device: Device,
    ) -> Result<MixerState> {
        let _ = (state, times, reserve, device);
        bail!("{} cannot fork a decoding state", self.name())
    }

    /// Whether the one-token steps from `state` on can be captured into a CUDA graph and
    /// replayed at later positions: the state keeps its tensors' shapes from step to step (a
    /// window cache is full), the step updates them in place and it reads positions from
    /// [`MixerInput::position`].
    fn step_capturable(&self, state: &MixerState) -> bool {
        let _ = state;
        false
    }

    /// The tensors `state` holds, in a fixed order (a CUDA graph replays steps that update the
    /// tensors it was captured with in place).
    fn state_tensors(&self, state: &MixerState) -> Result<Vec<Tensor>> {
        let _ = state;
        bail!("{} cannot list its decoding state's tensors", self.name())
    }

    /// Bytes of memory `state` holds (reserved room included).
    fn state_bytes(&self, state: &MixerState) -> Result<u64> {
        let _ = state;
        bail!("{} cannot measure a decoding state", self.name())
    }

    /// Short method name for reports, e.g. "softmax", "lolcats-sw".
    fn name(&self) -> String;
}

/// Causal softmax attention, scaled by 1/sqrt(d), over all earlier keys or the last
/// `sliding_window` keys (the query's own included, as Mistral's `sliding_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftmaxMixer {
    sliding_window: Option<i64>,
}

impl SoftmaxMixer {
    pub fn new(sliding_window: Option<i64>) -> Self {
        Self { sliding_window }
    }

    pub fn sliding_window(&self) -> Option<i64> {
        self.sliding_window
    }

    /// A causal pass over tokens with no earlier context.
    fn fresh(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let len = q.size()[2];
        match self.sliding_window {
            Some(w) if len > w => {
                let mask = allowed(0, 0, len, len, Some(w), q.device());
                sdpa(q, k, v, Some(&mask), false)
            }
            // The causal flag, not a mask, so that the fused (flash / cuDNN) kernels run on GPU.
            _ => sdpa(q, k, v, None, true),
        }
    }
}

impl Mixer for SoftmaxMixer {
    fn forward(&self, input: &MixerInput, state: Option<&mut MixerState>) -> Result<Tensor> {
        let Some(state) = state else {
            return Ok(self.fresh(input.q, input.k, input.v));
        };
        ensure!(
            input.position.is_none(),
            "softmax attention's KV cache grows by a token per step: its decoding cannot be \
             captured into a CUDA graph"
        );
        let cache = state
            .downcast_mut::<KvCache>()
            .context("softmax attention was given a decoding state made by another mixer")?;
        ensure!(
            cache.seen() == input.offset,
            "KV cache holds {} tokens but the new tokens start at position {}",
            cache.seen(),
            input.offset
        );
        let y = if cache.is_empty() {
            cache.append(input.k, input.v)?;
            self.fresh(input.q, input.k, input.v)
        } else {
            cache.append(input.k, input.v)?;
            // (b, h_kv, T, d) each; never empty here, the new tokens were just appended.
            let (keys, values) = cache.keys_values().context("empty KV cache")?;
            let (len, held) = (input.q.size()[2], keys.size()[2]);
            if len == 1 {
                // One query sees the last w held keys (all without a window), itself included:
                // no mask needed.
                let keep = self.sliding_window.map_or(held, |w| w.min(held));
                let (k, v) = (
                    keys.narrow(2, held - keep, keep),
                    values.narrow(2, held - keep, keep),
                );
                grouped_attention(input.q, &k, &v, None)
            } else {
                let (first, window) = (cache.first_position(), self.sliding_window);
                let mask = allowed(input.offset, first, len, held, window, input.q.device());
                // A prefill chunk after earlier ones: few calls, each with a new key length, so
                // the fused kernels' set-up cost does not matter while the (L x T) f32 scores of
                // a grouped product would (gigabytes at long contexts). The memory-efficient
                // kernel takes a mask but not GQA, hence the repeated heads.
                let heads = input.q.size()[1];
                let (keys, values) = (repeat_heads(&keys, heads), repeat_heads(&values, heads));
                sdpa(input.q, &keys, &values, Some(&mask), false)
            }
        };
        if let Some(w) = self.sliding_window {
            // The next query, at position seen, needs keys after seen - w.
            cache.keep_last(w - 1);
            // A long prefill grew the buffers to its length: the window's cache holds at most
            // 2w tokens between compactions, so memory stays O(w) at any context.
            cache.limit_capacity(2 * w);
        }
        Ok(y)
    }

    fn new_state(&self, batch: i64) -> Result<MixerState> {
        Ok(Box::new(KvCache::new(batch)))
    }

    fn fork_state(
        &self,
        state: &MixerState,
        times: i64,
        reserve: i64,
        device: Device,
    ) -> Result<MixerState> {
        let cache = state
            .downcast_ref::<KvCache>()
            .context("softmax attention was given a decoding state made by another mixer")?;
        Ok(Box::new(cache.fork(times, reserve, device)?))
    }

    fn state_bytes(&self, state: &MixerState) -> Result<u64> {
        let cache = state
            .downcast_ref::<KvCache>()
            .context("softmax attention was given a decoding state made by another mixer")?;
        Ok(cache.bytes())
    }

    fn name(&self) -> String {
        match self.sliding_window {
            Some(w) => format!("softmax-sw{w}"),
            None => "softmax".into(),
        }
    }
}

/// libtorch's fused attention; GQA heads are shared inside the kernel (no repeat of k, v), and
/// the softmax is accumulated in fp32 whatever the input dtype.
fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, is_causal: bool) -> Tensor {
    let gqa = q.size()[1] != k.size()[1];
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, None, gqa)
}

/// x (b, h_kv, T, d) with each head repeated for the h / h_kv query heads that share it.
fn repeat_heads(x: &Tensor, heads: i64) -> Tensor {
    let have = x.size()[1];
    if have == heads {
        return x.shallow_clone();
    }
    x.repeat_interleave_self_int(heads / have, 1, None)
}

/// Softmax attention of q (b, h, L, d) over k, v (b, h_kv, T, d), with the h / h_kv query heads
/// of each KV head batched together as rows of one product, so the cache is read in place (no
/// repeated or converted copy of it). Used when continuing from a cache: libtorch's fused kernels
/// would pick cuDNN on Hopper, which builds a new graph (milliseconds) for every new key length,
/// i.e. at every decoding step. Scores and softmax are f32, as in the fused kernels.
fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let [b, h, len, d] = q.size()[..] else {
        unreachable!("q is (b, h, L, d)")
    };
    let (hkv, keys) = (k.size()[1], k.size()[2]);
    let rows = h / hkv * len;
    let q = q.reshape([b * hkv, rows, d]); // query heads of KV head j are j*g .. j*g+g-1
    let k = k.reshape([b * hkv, keys, d]);
    let v = v.reshape([b * hkv, keys, d]);
    let scores = scores_f32(&q, &k) * (1.0 / (d as f64).sqrt()); // (b*h_kv, g*L, T)
    let scores = match mask {
        // The (L, T) mask repeated for each of the g heads stacked along the rows.
        Some(mask) => {
            scores.masked_fill(&mask.repeat([h / hkv, 1]).logical_not(), f64::NEG_INFINITY)
        }
        None => scores,
    };
    let probs = scores.softmax(-1, Kind::Float).to_kind(v.kind());
    probs.bmm(&v).view([b, h, len, d])
}

/// q (n, a, d) k (n, T, d)^T -> (n, a, T) in f32. CUDA multiplies low-precision inputs into f32
/// directly; elsewhere they are widened first.
fn scores_f32(q: &Tensor, k: &Tensor) -> Tensor {
    let kt = k.transpose(1, 2);
    match (q.kind(), q.device()) {
        (Kind::Float, _) => q.bmm(&kt),
        (_, Device::Cuda(_)) => q.bmm_dtype(&kt, Kind::Float),
        _ => q.to_kind(Kind::Float).bmm(&kt.to_kind(Kind::Float)),
    }
}

/// (Lq, Lk) bool mask, true where query `q0 + i` may see key `k0 + j`: causal, and within the
/// last `window` positions when there is one.
fn allowed(q0: i64, k0: i64, lq: i64, lk: i64, window: Option<i64>, device: Device) -> Tensor {
    let qpos = Tensor::arange_start(q0, q0 + lq, (Kind::Int64, device)).unsqueeze(1); // (Lq, 1)
    let kpos = Tensor::arange_start(k0, k0 + lk, (Kind::Int64, device)).unsqueeze(0); // (1, Lk)
    let causal = kpos.le_tensor(&qpos);
    match window {
        Some(w) => causal.logical_and(&kpos.gt_tensor(&(qpos - w))),
        None => causal,
    }
}

/// Keys and values of the tokens seen so far, in buffers that grow by doubling so that appending
/// one token does not copy the whole cache.
pub struct KvCache {
    batch: i64,
    k: Option<Tensor>, // (b, h_kv, capacity, d)
    v: Option<Tensor>, // (b, h_kv, capacity, d)
    len: i64,
    /// Absolute position of buffer slot 0 (nonzero once old tokens are dropped).
    first: i64,
}

impl KvCache {
    pub fn new(batch: i64) -> Self {
        Self {
            batch,
            k: None,
            v: None,
            len: 0,
            first: 0,
        }
    }

    /// How many tokens the cache has been given (dropped ones included).
    pub fn seen(&self) -> i64 {
        self.first + self.len
    }

    /// No tokens held (none seen yet, or all dropped).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Absolute position of the oldest token held.
    pub fn first_position(&self) -> i64 {
        self.first
    }

    /// The held keys and values, (b, h_kv, T, d) each; `None` before any token arrived.
    pub fn keys_values(&self) -> Option<(Tensor, Tensor)> {
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Some((k.narrow(2, 0, self.len), v.narrow(2, 0, self.len))),
            _ => None,
        }
    }

    /// Appends `k`, `v` (b, h_kv, L, d).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let size = k.size();
        ensure!(
            size.len() == 4 && size == v.size(),
            "KV cache: keys {size:?} and values {:?} must both be (b, h_kv, L, d)",
            v.size()
        );
        if size[0] != self.batch {
            bail!(
                "KV cache made for batch {} was given a batch of {}",
                self.batch,
                size[0]
            );
        }
        let add = size[2];
        let capacity = self.k.as_ref().map_or(0, |k| k.size()[2]);
        if self.len + add > capacity {
            let new_capacity = (2 * capacity).max(self.len + add).max(16);
            self.k = Some(grown(self.k.as_ref(), self.len, k, new_capacity));
            self.v = Some(grown(self.v.as_ref(), self.len, v, new_capacity));
        }
        for (buffer, new) in [(&self.k, k), (&self.v, v)] {
            if let Some(buffer) = buffer {
                buffer.narrow(2, self.len, add).copy_(new);
            }
        }
        self.len += add;
        Ok(())
    }

    /// This cache on `device` with each sequence repeated `times` times and room for `reserve`
    /// more tokens before it grows.
    pub fn fork(&self, times: i64, reserve: i64, device: Device) -> Result<Self> {
        ensure!(
            times >= 1 && reserve >= 0,
            "KV cache fork: times {times} must be >= 1 and reserve {reserve} >= 0"
        );
        let capacity = (self.len + reserve).max(1);
        let copy = |buffer: &Option<Tensor>| {
            buffer.as_ref().map(|b| {
                let s = b.size();
                let out = Tensor::empty([s[0], times, s[1], capacity, s[3]], (b.kind(), device));
                // Broadcast into the copies: no `times`-fold temporary of the source.
                out.narrow(3, 0, self.len)
                    .copy_(&b.narrow(2, 0, self.len).unsqueeze(1));
                out.view([s[0] * times, s[1], capacity, s[3]])
            })
        };
        Ok(Self {
            batch: self.batch * times,
            k: copy(&self.k),
            v: copy(&self.v),
            len: self.len,
            first: self.first,
        })
    }

    /// Bytes of the key and value buffers, reserved slots included.
    pub fn bytes(&self) -> u64 {
        [&self.k, &self.v]
            .into_iter()
            .flatten()
            .map(tensor_bytes)
            .sum()
    }

    /// Reallocates the buffers to `capacity` slots when they are larger and the held tokens
    /// fit.
    fn limit_capacity(&mut self, capacity: i64) {
        let (Some(k), Some(v)) = (&self.k, &self.v) else {
            return;
        };
        if k.size()[2] <= capacity || self.len > capacity {
            return;
        }
        let (k, v) = (
            grown(Some(k), self.len, k, capacity),
            grown(Some(v), self.len, v, capacity),
        );
        (self.k, self.v) = (Some(k), Some(v));
    }

    /// Drops all but the last `keep` tokens. Compacts only once at least `keep` tokens are
    /// droppable, so each token is moved O(1) times on average.
    pub fn keep_last(&mut self, keep: i64) {
        let drop = self.len - keep;
        if drop <= 0 || (keep > 0 && drop < keep) {
            return;
        }
        if keep > 0 {
            for buffer in [&self.k, &self.v].into_iter().flatten() {
                // Source and destination may overlap: copy the kept tokens out first.
                let kept = buffer.narrow(2, drop, keep).contiguous();
                buffer.narrow(2, 0, keep).copy_(&kept);
            }
        }
        self.first += drop;
        self.len = keep;
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// A buffer of `capacity` slots holding the first `len` slots of `old`, shaped and typed like
/// `like` (b, h_kv, L, d).
fn grown(old: Option<&Tensor>, len: i64, like: &Tensor, capacity: i64) -> Tensor {
    let s = like.size();
    let buffer = Tensor::empty([s[0], s[1], capacity, s[3]], (like.kind(), like.device()));
    if let Some(old) = old {
        buffer.narrow(2, 0, len).copy_(&old.narrow(2, 0, len));
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: [i64; 4]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// softmax(q k^T / sqrt(d) + mask) v written out with GQA heads repeated.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<i64>) -> Tensor {
        let (h, hkv, l, d) = (q.size()[1], k.size()[1], q.size()[2], q.size()[3]);
        let k = k.repeat_interleave_self_int(h / hkv, 1, None);
        let v = v.repeat_interleave_self_int(h / hkv, 1, None);
        let scores = q.matmul(&k.transpose(-2, -1)) / (d as f64).sqrt();
        let mut mask = vec![f32::NEG_INFINITY; (l * l) as usize];
        for t in 0..l {
            for s in 0..=t {
                if window.is_none_or(|w| s > t - w) {
                    mask[(t * l + s) as usize] = 0.0;
                }
            }
        }
        let mask = Tensor::from_slice(&mask).view([l, l]);
        (scores + mask).softmax(-1, Kind::Float).matmul(&v)
    }

    fn input<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor, offset: i64) -> MixerInput<'a> {
        MixerInput {
            q,
            k,
            v,
            q_raw: q,
            k_raw: k,
            offset,
            position: None,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Full pass and cached passes in uneven chunks (prefill, multi-token continuation with a
    /// mask, single-token steps) against the naive reference.
    fn check(window: Option<i64>) {
        let (q, k, v) = (
            randn([2, 4, 11, 8]),
            randn([2, 2, 11, 8]),
            randn([2, 2, 11, 8]),
        );
        let mixer = SoftmaxMixer::new(window);
        let want = naive(&q, &k, &v, window);
        let full = mixer.forward(&input(&q, &k, &v, 0), None).unwrap();
        assert!(
            max_diff(&full, &want) < 1e-5,
            "full pass, window {window:?}"
        );

        let mut state = mixer.new_state(2).unwrap();
        let mut outs = Vec::new();
        let mut start = 0;
        for len in [4, 3, 1, 1, 2] {
            let (qc, kc, vc) = (
                q.narrow(2, start, len),
                k.narrow(2, start, len),
                v.narrow(2, start, len),
            );
            outs.push(
                mixer
                    .forward(&input(&qc, &kc, &vc, start), Some(&mut state))
                    .unwrap(),
            );
            start += len;
        }
        let cached = Tensor::cat(&outs, 2);
        assert!(max_diff(&cached, &want) < 1e-5, "cached, window {window:?}");
        let held = state.downcast_ref::<KvCache>().unwrap();
        assert_eq!(held.seen(), 11);
        if let Some(w) = window {
            assert!(
                held.len < 2 * w + 4,
                "window {w}: cache holds {} tokens",
                held.len
            );
        }
    }

    #[test]
    fn causal_matches_naive_full_and_cached() {
        check(None);
    }

    #[test]
    fn sliding_window_matches_naive_full_and_cached() {
        check(Some(3));
        check(Some(1));
    }

    #[test]
    fn bf16_cached_decoding_stays_close_to_f32() {
        let (q, k, v) = (
            randn([1, 4, 6, 8]),
            randn([1, 2, 6, 8]),
            randn([1, 2, 6, 8]),
        );
        let want = naive(&q, &k, &v, None);
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let (q, k, v) = (bf(&q), bf(&k), bf(&v));
        let mixer = SoftmaxMixer::new(None);
        let mut state = mixer.new_state(1).unwrap();
        let mut outs = Vec::new();
        for (start, len) in [(0, 3), (3, 2), (5, 1)] {
            let (qc, kc, vc) = (
                q.narrow(2, start, len),
                k.narrow(2, start, len),
                v.narrow(2, start, len),
            );
            outs.push(
                mixer
                    .forward(&input(&qc, &kc, &vc, start), Some(&mut state))
                    .unwrap(),
            );
        }
        let got = Tensor::cat(&outs, 2);
        assert_eq!(got.kind(), Kind::BFloat16);
        assert!(max_diff(&got.to_kind(Kind::Float), &want) < 3e-2);
    }

    #[test]
    fn misuse_of_state_is_an_error() {
        let mixer = SoftmaxMixer::new(None);
        let (q, k, v) = (
            randn([1, 2, 3, 4]),
            randn([1, 2, 3, 4]),
            randn([1, 2, 3, 4]),
        );
        let mut state = mixer.new_state(1).unwrap();
        let e = mixer
            .forward(&input(&q, &k, &v, 5), Some(&mut state))
            .unwrap_err();
        assert!(e.to_string().contains("start at position 5"), "{e}");
        let mut other: MixerState = Box::new(0u8);
        let e = mixer
            .forward(&input(&q, &k, &v, 0), Some(&mut other))
            .unwrap_err();
        assert!(e.to_string().contains("another mixer"), "{e}");
        let mut state = mixer.new_state(3).unwrap();
        let e = mixer
            .forward(&input(&q, &k, &v, 0), Some(&mut state))
            .unwrap_err();
        assert!(e.to_string().contains("batch 3"), "{e}");
    }
}
