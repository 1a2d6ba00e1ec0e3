//! Local softmax windows (LoLCATs `sw` / `tk`, Liger's sliding window), the sink tokens that
//! stay visible beside them, and the blocked key layout through which chunked forms reach them in
//! O(L * (C + w)).
//!
//! Sinks (StreamingLLM): with `sinks = N`, key `s < N` is a softmax key of every query `t >= s`,
//! whether or not the window holds it, and never a linear key, so no key is counted twice. A
//! chunked call appends the N sink keys to every local block; a sink that the query's window also
//! holds is masked there (the window already counts it). For a query at `t` the sinks outside its
//! window are exactly those before [`Window::start`]`(t)`, a prefix, which is what decoding reads.
use crate::error::{config, Error, Result};
use crate::tensors::{ceil_div, constant_matrix, grouped_matmul, pad_seq, Matrix};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Which keys a query attends to with softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowShape {
    /// The last `size` tokens, the query included.
    Sw,
    /// "Terrace": the query's block of `size` tokens plus the previous block. Blocks are aligned to
    /// absolute position 0, so a prefix computed in one call and continued in another sees the same
    /// blocks. (LoLCATs' training masks align blocks to the end of the sequence instead; the two
    /// agree whenever the length is a multiple of `size`.)
    Tk,
}

impl WindowShape {
    /// The name recipes use for it (`sw`, `tk`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sw => "sw",
            Self::Tk => "tk",
        }
    }
}

/// A window shape and its size `w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub shape: WindowShape,
    pub size: i64,
}

impl Window {
    pub fn sliding(size: i64) -> Self {
        Self {
            shape: WindowShape::Sw,
            size,
        }
    }

    pub fn terrace(size: i64) -> Self {
        Self {
            shape: WindowShape::Tk,
            size,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.size < 1 {
            return Err(config(
                "window size",
                format!("must be >= 1, got {}", self.size),
            ));
        }
        Ok(())
    }

    /// The largest `t - s` of a key `s` inside the window of query `t`: how many earlier tokens a
    /// decoder must keep in its window cache.
    pub fn reach(&self) -> i64 {
        match self.shape {
            WindowShape::Sw => self.size - 1,
            WindowShape::Tk => 2 * self.size - 1,
        }
    }

    /// Checks a decoder's window cache of `m` tokens at position `pos`: it can hold no more than
    /// the window reaches back, nor more tokens than were seen.
    pub fn check_cache(&self, m: i64, pos: i64) -> Result<()> {
        if m > self.reach() || m > pos {
            return Err(Error::Value {
                tensor: "state.k",
                message: format!(
                    "window cache of {m} tokens at position {pos}; the window keeps at most {}",
                    self.reach()
                ),
            });
        }
        Ok(())
    }

    /// Whether key position `s` lies in the window of query position `t` (both absolute, `s <= t`).
    pub fn contains(&self, t: i64, s: i64) -> bool {
        match self.shape {
            WindowShape::Sw => t - s < self.size,
            WindowShape::Tk => s >= (t / self.size - 1) * self.size,
        }
    }

    /// The first key position inside the window of query `t` (0 when the window reaches the
    /// start): the keys before it are linear keys, or sinks.
    pub fn start(&self, t: i64) -> i64 {
        let start = match self.shape {
            WindowShape::Sw => t - self.size + 1,
            WindowShape::Tk => (t / self.size - 1) * self.size,
        };
        start.max(0)
    }

    /// Whether keys lie inside the window of queries, for broadcastable i64 position tensors
    /// (causality not applied).
    fn inside(&self, q_pos: &Tensor, k_pos: &Tensor) -> Tensor {
        match self.shape {
            WindowShape::Sw => (q_pos - k_pos).lt(self.size),
            WindowShape::Tk => {
                let block_start = q_pos.floor_divide_scalar(self.size) * self.size;
                k_pos.ge_tensor(&(block_start - self.size))
            }
        }
    }

    /// Boolean masks `(window, linear)` for broadcastable i64 position tensors: `window` marks
    /// causal keys inside the window, `linear` causal keys before it.
    pub fn masks(&self, q_pos: &Tensor, k_pos: &Tensor) -> (Tensor, Tensor) {
        self.masks_with_sinks(q_pos, k_pos, 0)
    }

    /// [`Self::masks`] with the first `sinks` keys moved from the linear to the softmax side:
    /// `window` marks causal keys inside the window or before position `sinks`, `linear` the
    /// other causal keys.
    pub fn masks_with_sinks(&self, q_pos: &Tensor, k_pos: &Tensor, sinks: i64) -> (Tensor, Tensor) {
        let causal = k_pos.le_tensor(q_pos);
        let softmax = self.inside(q_pos, k_pos).logical_or(&k_pos.lt(sinks));
        let window = causal.logical_and(&softmax);
        let linear = causal.logical_and(&softmax.logical_not());
        (window, linear)
    }
}

/// Validates a sink count (config key `sinks`).
pub fn validate_sinks(sinks: i64) -> Result<()> {
    if sinks < 0 {
        return Err(config("sinks", format!("must be >= 0, got {sinks}")));
    }
    Ok(())
}

/// The keys and values of the sink tokens seen so far, (b, h_k, n, d) and (b, h_v, n, d_v) at
/// their own head counts, `n = min(tokens seen, sinks)`: what a decoder keeps of the first tokens
/// beside its window cache.
#[derive(Debug)]
pub struct SinkCache {
    pub k: Tensor,
    pub v: Tensor,
}

impl SinkCache {
    /// Sink tokens held.
    pub fn len(&self) -> i64 {
        self.k.size()[2]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No sink yet, for keys (b, h_k, ·, d) and values (b, h_v, ·, d_v).
    pub(crate) fn empty(k_shape: [i64; 3], v_shape: [i64; 3], opts: (Kind, Device)) -> Self {
        let empty = |[b, h, d]: [i64; 3]| Tensor::zeros([b, h, 0, d], opts);
        Self {
            k: empty(k_shape),
            v: empty(v_shape),
        }
    }

    pub fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self {
            k: f(&self.k),
            v: f(&self.v),
        }
    }

    /// Checks the cache against the call: shapes, and `min(pos, sinks)` tokens.
    pub(crate) fn check(
        &self,
        k_shape: [i64; 3],
        v_shape: [i64; 3],
        pos: i64,
        sinks: i64,
    ) -> Result<()> {
        let n = pos.min(sinks);
        for (name, t, [b, h, d]) in [
            ("state.sinks.k", &self.k, k_shape),
            ("state.sinks.v", &self.v, v_shape),
        ] {
            if t.size() != [b, h, n, d] {
                return Err(crate::tensors::shape(
                    name,
                    &format!(
                        "{:?} (the first {n} of {pos} tokens, sinks {sinks})",
                        [b, h, n, d]
                    ),
                    t,
                ));
            }
        }
        Ok(())
    }

    /// The cache checked against the call ([`Self::check`]) and converted to `kind`.
    pub(crate) fn checked(
        &self,
        k_shape: [i64; 3],
        v_shape: [i64; 3],
        pos: i64,
        sinks: i64,
        kind: Kind,
    ) -> Result<Self> {
        self.check(k_shape, v_shape, pos, sinks)?;
        Ok(Self {
            k: self.k.to_kind(kind),
            v: self.v.to_kind(kind),
        })
    }

    /// The cache after the tokens `k`, `v` (b, ·, len, ·) starting at position `pos`: those before
    /// position `sinks` join it.
    pub(crate) fn advance(&self, k: &Tensor, v: &Tensor, pos: i64, sinks: i64) -> Self {
        let joining = (sinks - pos).clamp(0, k.size()[2]);
        if joining == 0 {
            return self.map_tensors(&Tensor::shallow_clone);
        }
        Self {
            k: Tensor::cat(&[&self.k, &k.narrow(2, 0, joining)], 2),
            v: Tensor::cat(&[&self.v, &v.narrow(2, 0, joining)], 2),
        }
    }

    /// The sinks a query at position `t` sees as separate keys: those before its window's start
    /// (the later ones are in its window), `(k, v)` narrowed to that prefix.
    pub(crate) fn visible(&self, window: &Window, t: i64) -> (Tensor, Tensor) {
        let n = self.len().min(window.start(t));
        (self.k.narrow(2, 0, n), self.v.narrow(2, 0, n))
    }
}

/// `phi_k` (b, h, len, f) of tokens starting at position `pos` with the rows of sink positions
/// (`< sinks`) zeroed: a sink is never a linear key, so its features enter no linear sum.
pub(crate) fn without_sinks(phi_k: &Tensor, pos: i64, sinks: i64) -> Tensor {
    let len = phi_k.size()[2];
    let n = (sinks - pos).clamp(0, len);
    if n == 0 {
        return phi_k.shallow_clone();
    }
    let zeros = phi_k.narrow(2, 0, n).zeros_like();
    Tensor::cat(&[zeros, phi_k.narrow(2, n, len - n)], 2)
}

/// A full window cache (`reach` tokens along dim 2) is a ring: the token at position `p` lies in
/// slot `p mod reach`, so that a decoding step writes its token over the one leaving the window,
/// in place, and no step copies the cache. A cache still filling lies in order, oldest first.
/// The ring of the full cache `ordered` whose last token is at position `pos - 1`.
pub(crate) fn to_ring(ordered: &Tensor, pos: i64) -> Tensor {
    let reach = ordered.size()[2];
    if reach == 0 {
        return ordered.shallow_clone();
    }
    // Slot (pos - reach + i) mod reach = (pos + i) mod reach takes token i.
    ordered.roll([pos % reach], [2])
}

/// The full cache `ring` ([`to_ring`]) in order, oldest first, before the token at `pos`.
pub(crate) fn from_ring(ring: &Tensor, pos: i64) -> Tensor {
    let reach = ring.size()[2];
    if reach == 0 {
        return ring.shallow_clone();
    }
    ring.roll([-(pos % reach)], [2])
}

/// A state's window cache (b, h, m, d) for a whole-sequence call, in order and in `kind`: a full
/// cache (`m == reach`) is a ring ([`to_ring`]) before the token at `pos`.
pub(crate) fn cache_in_order(cache: &Tensor, kind: Kind, reach: i64, pos: i64) -> Tensor {
    let cache = cache.to_kind(kind);
    match cache.size()[2] == reach {
        true => from_ring(&cache, pos),
        false => cache,
    }
}

/// A decoding step's attention scores (b, h, 1, n+m+1) of query `q` (b, h, 1, d) over the
/// visible sinks (n), the window cache (m, in its slots' order) and the step's own key, each
/// read at its own head count.
pub(crate) fn step_scores(q: &Tensor, sink_k: &Tensor, cache_k: &Tensor, k: &Tensor) -> Tensor {
    let head_dim = *q.size().last().expect("q has a head dimension");
    Tensor::cat(
        &[
            grouped_matmul(q, &sink_k.transpose(-1, -2)),
            grouped_matmul(q, &cache_k.transpose(-1, -2)),
            grouped_matmul(q, &k.transpose(-1, -2)),
        ],
        -1,
    ) / (head_dim as f64).sqrt()
}

/// The absolute positions of a decoding step's query (1,) and keys (m+1,): the `m` cached tokens
/// in their slots' order (in order while the cache fills, a ring once it holds `reach`), then the
/// query's own token at `t`. With `position` (`t` as an int64 scalar on the device) they are
/// built from it rather than from the host's `t`, so that a CUDA graph capturing the step stays
/// right when replayed at later positions; either way nothing is copied from the host.
pub(crate) fn step_positions(
    m: i64,
    reach: i64,
    t: i64,
    position: Option<&Tensor>,
    device: Device,
) -> (Tensor, Tensor) {
    let opts = (Kind::Int64, device);
    let slots = Tensor::arange(m, opts);
    let ring = m == reach && m > 0;
    let (cached, now) = match position {
        Some(p) if ring => ((slots - p).remainder(reach) + p - reach, p.reshape([1])),
        Some(p) => (slots - m + p, p.reshape([1])),
        None if ring => (
            (slots - t).remainder(reach) + (t - reach),
            Tensor::arange_start(t, t + 1, opts),
        ),
        None => (slots + (t - m), Tensor::arange_start(t, t + 1, opts)),
    };
    let keys = Tensor::cat(&[&cached, &now], 0);
    (now, keys)
}

/// The slot of a full ring ([`to_ring`]) that the token at `t` takes from the one leaving the
/// window (`t - reach`): `t mod reach`, from the host's count or, for CUDA graphs, from the
/// device's `position`.
pub(crate) enum RingSlot {
    Host(i64),
    Device(Tensor),
}

impl RingSlot {
    pub fn of(reach: i64, t: i64, position: Option<&Tensor>) -> Self {
        match position {
            Some(p) => Self::Device(p.remainder(reach).reshape([1])),
            None => Self::Host(t % reach),
        }
    }

    /// The slot's token of `cache` (b, ·, reach, ·) or (b, ·, reach): a view, or a gather of
    /// one token.
    pub fn read(&self, cache: &Tensor) -> Tensor {
        match self {
            Self::Host(i) => cache.narrow(2, *i, 1),
            Self::Device(i) => cache.index_select(2, i),
        }
    }

    /// Writes `token` (one token along dim 2) into the slot of `cache`, in place.
    pub fn write(&self, cache: &mut Tensor, token: &Tensor) {
        match self {
            Self::Host(i) => cache.narrow(2, *i, 1).copy_(token),
            Self::Device(i) => {
                let _ = cache.index_copy_(2, i, token);
            }
        }
    }
}

/// Layout of one chunked call: the new tokens' queries cut into `chunks` chunks of `chunk`
/// tokens; the keys `[cached ; new]` placed into slots so that query chunk `j` finds every key
/// its windows can reach in the local block of slots `[j*C, j*C + (history+1)*C)`. Slot `u` holds
/// absolute position `pos0 - history*C + u`; slots before the cache and after the new tokens are
/// zero padding.
pub(crate) struct LocalBlocks {
    pub chunk: i64,
    pub history: i64,
    pub chunks: i64,
    pub len: i64,
    pub cached: i64,
    pub pos0: i64,
}

impl LocalBlocks {
    /// `len` new tokens starting at absolute position `pos0`, after `cached` cached tokens.
    pub fn new(window: &Window, chunk: i64, len: i64, cached: i64, pos0: i64) -> Result<Self> {
        if chunk < 1 {
            return Err(config("chunk size", format!("must be >= 1, got {chunk}")));
        }
        let history = ceil_div(window.reach(), chunk);
        if cached > window.reach() || cached > pos0 {
            return Err(config(
                "state",
                format!(
                    "window cache holds {cached} tokens at position {pos0}; a window of reach {} \
                     keeps at most that many",
                    window.reach()
                ),
            ));
        }
        Ok(Self {
            chunk,
            history,
            chunks: ceil_div(len, chunk),
            len,
            cached,
            pos0,
        })
    }

    pub fn block_len(&self) -> i64 {
        (self.history + 1) * self.chunk
    }

    fn slots(&self) -> i64 {
        (self.history + self.chunks) * self.chunk
    }

    /// `[cached ; new]` keys (b, h, cached+len, x) -> slots (b, h, (history+chunks)*C, x).
    pub fn slot_keys(&self, ext: &Tensor) -> Tensor {
        let front = self.history * self.chunk - self.cached;
        pad_seq(ext, front, self.slots() - front - self.cached - self.len)
    }

    /// Slots (b, h, S, x) -> local blocks (b, h, chunks, block_len, x), contiguous: the
    /// `history + 1` chunk-shifted views of the slots joined along the block. (An overlapping
    /// `unfold` view would be copied by the matmul anyway, and its backward is a slow scatter;
    /// the join's backward is views.)
    pub fn local(&self, slots: &Tensor) -> Tensor {
        let s = slots.size();
        let chunked = slots.reshape([s[0], s[1], self.history + self.chunks, self.chunk, s[3]]);
        let shifted: Vec<Tensor> = (0..=self.history)
            .map(|i| chunked.narrow(2, i, self.chunks))
            .collect();
        Tensor::cat(&shifted, 3)
    }

    /// A call without cache: its query chunks (b, h, chunks, C, x) -> the same local blocks as
    /// [`Self::local`] of its slots, block j = chunks j − history, .., j (zeros before the
    /// first), by one matmul with the stacked 0/1 shift matrices ((history+1)·chunks, chunks),
    /// exact, whose backward is one matmul, then one copy into the block layout.
    pub fn local_from_chunks(&self, chunks: &Tensor) -> Tensor {
        let s = chunks.size();
        let (n, hist) = (self.chunks, self.history);
        let shifts = constant_matrix(Matrix::Shifts { n, hist }, chunks.kind(), chunks.device());
        shifts
            .matmul(&chunks.reshape([s[0], s[1], n, -1])) // (b, h, (hist+1)·n, C·x)
            .reshape([s[0], s[1], hist + 1, n, s[3], s[4]])
            .permute([0, 1, 3, 2, 4, 5])
            .reshape([s[0], s[1], n, (hist + 1) * s[3], s[4]])
    }

    /// The first `chunks` chunks of the slots (b, h, S, x) -> (b, h, chunks, C, x): the keys lying
    /// before each query chunk's local block are exactly the chunks before it.
    pub fn slot_chunks(&self, slots: &Tensor) -> Tensor {
        let s = slots.size();
        slots.narrow(2, 0, self.chunks * self.chunk).reshape([
            s[0],
            s[1],
            self.chunks,
            self.chunk,
            s[3],
        ])
    }

    /// New tokens (b, h, len, x) -> zero-padded query chunks (b, h, chunks, C, x).
    pub fn query_chunks(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        pad_seq(x, 0, self.chunks * self.chunk - self.len).reshape([
            s[0],
            s[1],
            self.chunks,
            self.chunk,
            s[3],
        ])
    }

    /// Query chunks (b, h, chunks, C, x) -> (b, h, len, x).
    pub fn unchunk(&self, y: &Tensor) -> Tensor {
        let s = y.size();
        y.reshape([s[0], s[1], self.chunks * self.chunk, s[4]])
            .narrow(2, 0, self.len)
    }

    /// Absolute positions of the query chunks' tokens (chunks, C, 1).
    fn query_positions(&self, device: Device) -> Tensor {
        let (n, c) = (self.chunks, self.chunk);
        (Tensor::arange(n * c, (Kind::Int64, device)) + self.pos0).reshape([n, c, 1])
    }

    /// `(window, linear)` masks of shape (chunks, C, block_len); padding slots before the cache
    /// are excluded. Padding after the new tokens lies after every real query, so causality
    /// excludes it, while each padded query still sees itself (no empty softmax rows). Keys
    /// before position `sinks` are in neither mask: [`Self::sink_mask`] covers them.
    pub fn masks(&self, window: &Window, sinks: i64, device: Device) -> (Tensor, Tensor) {
        let opts = (Kind::Int64, device);
        let (n, c, k) = (self.chunks, self.chunk, self.block_len());
        let q_pos = self.query_positions(device);
        let first_slot = self.pos0 - self.history * c;
        let k_pos = (Tensor::arange(n, opts).reshape([n, 1, 1]) * c
            + Tensor::arange(k, opts).reshape([1, 1, k]))
            + first_slot;
        let (win, lin) = window.masks(&q_pos, &k_pos);
        let real = k_pos.ge(self.pos0 - self.cached);
        let lin = lin.logical_and(&k_pos.ge(sinks));
        (win.logical_and(&real), lin.logical_and(&real))
    }

    /// Which of the `n` sink keys (positions 0..n), appended to every local block
    /// ([`Self::with_sinks`]), each query sees: those before its window's start (chunks, C, n).
    pub fn sink_mask(&self, window: &Window, n: i64, device: Device) -> Tensor {
        let q_pos = self.query_positions(device);
        let k_pos = Tensor::arange(n, (Kind::Int64, device)).reshape([1, 1, n]);
        let (_, before_window) = window.masks(&q_pos, &k_pos);
        before_window
    }

    /// `(window, linear)` masks (chunks, C, block_len + n) over the local blocks with the `n`
    /// sink rows appended ([`Self::with_sinks`]): a sink row is a softmax key of the queries
    /// whose window lies past it, never a linear one.
    pub fn masks_with_sink_rows(
        &self,
        window: &Window,
        sinks: i64,
        n: i64,
        device: Device,
    ) -> (Tensor, Tensor) {
        let (win, lin) = self.masks(window, sinks, device);
        if n == 0 {
            return (win, lin);
        }
        let sink = self.sink_mask(window, n, device); // (chunks, C, n)
        let lin = Tensor::cat(&[lin, sink.zeros_like()], 2);
        (Tensor::cat(&[win, sink], 2), lin)
    }

    /// Local blocks (b, h, chunks, K, x) with the sink rows (b, h, n, x) appended to each:
    /// (b, h, chunks, K + n, x).
    pub fn with_sinks(&self, blocks: &Tensor, sinks: &Tensor) -> Tensor {
        let s = sinks.size();
        let per_chunk = sinks
            .unsqueeze(2)
            .expand([s[0], s[1], self.chunks, s[2], s[3]], false);
        Tensor::cat(&[blocks, &per_chunk.to_kind(blocks.kind())], 3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense_masks(window: &Window, len: i64) -> (Vec<Vec<bool>>, Vec<Vec<bool>>) {
        let pos = Tensor::arange(len, (Kind::Int64, Device::Cpu));
        let (win, lin) = window.masks(&pos.reshape([len, 1]), &pos.reshape([1, len]));
        let rows = |m: Tensor| {
            let m = m.to_kind(Kind::Int64);
            (0..len)
                .map(|t| (0..len).map(|s| m.int64_value(&[t, s]) != 0).collect())
                .collect()
        };
        (rows(win), rows(lin))
    }

    fn parse(rows: &[&str]) -> Vec<Vec<bool>> {
        rows.iter()
            .map(|r| r.chars().map(|c| c == '1').collect())
            .collect()
    }

    #[test]
    fn sliding_window_masks_match_lolcats() {
        // LoLCATs `sw` get_masks: window = tril(0) - tril(-w), linear = tril(-w).
        let (win, lin) = dense_masks(&Window::sliding(2), 5);
        assert_eq!(win, parse(&["10000", "11000", "01100", "00110", "00011"]));
        assert_eq!(lin, parse(&["00000", "00000", "10000", "11000", "11100"]));
    }

    #[test]
    fn terrace_window_masks_match_lolcats_at_multiples_of_the_block() {
        // LoLCATs `tk` get_masks for q_len = k_len = 6, w = 2 (block_diag + roll(-w), tril).
        let (win, lin) = dense_masks(&Window::terrace(2), 6);
        assert_eq!(
            win,
            parse(&["100000", "110000", "111000", "111100", "001110", "001111"])
        );
        assert_eq!(
            lin,
            parse(&["000000", "000000", "000000", "000000", "110000", "110000"])
        );
    }

    #[test]
    fn contains_agrees_with_masks_and_reach() {
        for window in [Window::sliding(3), Window::terrace(3), Window::sliding(1)] {
            let (win, _) = dense_masks(&window, 12);
            for t in 0..12 {
                for s in 0..=t {
                    assert_eq!(win[t as usize][s as usize], window.contains(t, s));
                    if window.contains(t, s) {
                        assert!(t - s <= window.reach());
                    }
                }
            }
        }
    }
}
