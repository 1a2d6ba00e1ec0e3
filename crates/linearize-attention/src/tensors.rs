//! Shape checks, GQA head expansion and the dtypes (fp32 sums, input-dtype matmul operands) shared
//! by every kernel.
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Sizes of a `(batch, heads, len, dim)` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dims {
    pub batch: i64,
    pub heads: i64,
    pub len: i64,
    pub dim: i64,
}

impl Dims {
    pub fn of(tensor: &'static str, t: &Tensor) -> Result<Self> {
        match t.size()[..] {
            [batch, heads, len, dim] if batch > 0 && heads > 0 && len > 0 && dim > 0 => Ok(Self {
                batch,
                heads,
                len,
                dim,
            }),
            _ => Err(shape(tensor, "(batch, heads, len, dim), all >= 1", t)),
        }
    }

    /// Checks that this is a single token (decoding step).
    pub fn check_single(&self, tensor: &'static str, t: &Tensor) -> Result<()> {
        if self.len != 1 {
            return Err(shape(tensor, "one token per step (len 1)", t));
        }
        Ok(())
    }

    /// Checks that `other` (named `tensor`) lines up with `self` for batch and length, and that its
    /// heads divide `self.heads` (GQA).
    pub fn check_companion(&self, tensor: &'static str, other: &Tensor) -> Result<Self> {
        let o = Self::of(tensor, other)?;
        if o.batch != self.batch || o.len != self.len || o.heads == 0 || self.heads % o.heads != 0 {
            let expected = format!(
                "(batch {}, heads dividing {}, len {}, dim)",
                self.batch, self.heads, self.len
            );
            return Err(shape(tensor, &expected, other));
        }
        Ok(o)
    }

    pub fn check_dim(&self, tensor: &'static str, t: &Tensor, dim: i64) -> Result<()> {
        if self.dim != dim {
            return Err(shape(tensor, &format!("last dim {dim}"), t));
        }
        Ok(())
    }
}

pub(crate) fn shape(tensor: &'static str, expected: &str, got: &Tensor) -> Error {
    Error::Shape {
        tensor,
        expected: expected.to_string(),
        got: got.size(),
    }
}

/// The dtype kernels accumulate in: f64 stays f64, everything else runs in f32.
pub(crate) fn compute_kind(tensor: &'static str, t: &Tensor) -> Result<Kind> {
    match t.kind() {
        Kind::Double => Ok(Kind::Double),
        Kind::Float | Kind::Half | Kind::BFloat16 => Ok(Kind::Float),
        got => Err(Error::Dtype { tensor, got }),
    }
}

/// The dtypes of one chunked call. Running sums across chunks, cumulative gates, softmax maxima
/// and exponentials, normalisers and divisions are carried in `acc` (f32; f64 for f64 inputs).
/// Matmul operands are `operand`: the input dtype for f16 / bf16, so that GEMMs run on tensor
/// cores (cuBLAS accumulates f16 / bf16 products in f32; only the result is rounded), as
/// flash-linear-attention does; `acc` otherwise, which leaves f32 and f64 inputs exactly as they
/// were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Precision {
    pub acc: Kind,
    pub operand: Kind,
}

impl Precision {
    /// The precision for inputs in `t`'s dtype (`tensor` names it in errors).
    pub fn of(tensor: &'static str, t: &Tensor) -> Result<Self> {
        let acc = compute_kind(tensor, t)?;
        let operand = match t.kind() {
            Kind::Half | Kind::BFloat16 => t.kind(),
            _ => acc,
        };
        Ok(Self { acc, operand })
    }

    /// Everything in `kind`: for the recurrent forms, bound by launch latency rather than by GEMM
    /// throughput, so low-precision operands would cost accuracy and gain nothing.
    pub fn uniform(kind: Kind) -> Self {
        Self {
            acc: kind,
            operand: kind,
        }
    }

    /// `a @ b` (batched, broadcasting) on operands cast to `operand`, returned in `operand`:
    /// for results that only feed other matmuls or elementwise operations that read them in
    /// `acc` on the fly.
    pub fn mm_operand(&self, a: &Tensor, b: &Tensor) -> Tensor {
        a.to_kind(self.operand).matmul(&b.to_kind(self.operand))
    }

    /// `a @ b` (batched, broadcasting) on operands cast to `operand` (f32 accumulations such as
    /// attention weights included, as FLA casts P before P·V), returned in `acc`.
    pub fn mm(&self, a: &Tensor, b: &Tensor) -> Tensor {
        a.to_kind(self.operand)
            .matmul(&b.to_kind(self.operand))
            .to_kind(self.acc)
    }

    /// [`Self::mm`] with `state` (.., k, m) a running sum over the sequence, which grows with its
    /// length: f16 (max 65504) would overflow where bf16 (f32's range) does not, so for f16 each
    /// (k, m) matrix is scaled to a max of one for the cast and the product scaled back in `acc`.
    /// The scale is a constant to autograd: the function does not depend on it.
    pub fn mm_state(&self, a: &Tensor, state: &Tensor) -> Tensor {
        if self.operand != Kind::Half {
            return self.mm(a, state);
        }
        let scale = state
            .abs()
            .amax([-2i64, -1].as_slice(), true)
            .clamp_min(f64::from(f32::MIN_POSITIVE))
            .detach(); // (.., 1, 1)
        self.mm(a, &(state / &scale)) * scale
    }
}

/// Repeats the heads (dim 1) of `x` so that it has `heads` heads; head `i` of the result is head
/// `i / (heads / x_heads)` of `x`, the grouping of Hugging Face's `repeat_kv`.
pub(crate) fn repeat_heads(x: &Tensor, heads: i64) -> Tensor {
    let size = x.size();
    let have = size[1];
    if have == heads {
        return x.shallow_clone();
    }
    let group = heads / have;
    let mut expanded = size.clone();
    expanded.insert(2, group);
    let mut merged = size;
    merged[1] = heads;
    x.unsqueeze(2).expand(&expanded, false).reshape(&merged)
}

/// `a @ b` for `a` (b, h, l, m) and `b` (b, h_b, m, n) whose head `j` serves the heads of `a`
/// that [`repeat_heads`] would give it, without repeating `b`: (b, h, l, n). A decoding step
/// reads its window cache this way rather than through a repeated copy of it.
pub(crate) fn grouped_matmul(a: &Tensor, b: &Tensor) -> Tensor {
    let (sa, hb) = (a.size(), b.size()[1]);
    let (batch, heads, len) = (sa[0], sa[1], sa[2]);
    a.reshape([batch, hb, heads / hb * len, sa[3]])
        .matmul(b)
        .reshape([batch, heads, len, -1])
}

/// Whether autograd records a decoding step, given tensors it computed (or read): it may then
/// need the step's state as it was (the recurrent forms serve as references for gradients), so
/// the step builds its new state out of place rather than updating it in place, which would
/// invalidate what the backward pass saved. Under `no_grad` (decoding) nothing is recorded.
pub(crate) fn tracked(tensors: &[&Tensor]) -> bool {
    tensors.iter().any(|t| t.requires_grad())
}

/// `x` in `kind` with its heads repeated to `heads`.
pub(crate) fn prepare(x: &Tensor, kind: Kind, heads: i64) -> Tensor {
    repeat_heads(&x.to_kind(kind), heads)
}

/// Zero-pads dim 2 (sequence) of `x` with `front` and `back` slots.
pub(crate) fn pad_seq(x: &Tensor, front: i64, back: i64) -> Tensor {
    if front == 0 && back == 0 {
        return x.shallow_clone();
    }
    x.constant_pad_nd([0, 0, front, back])
}

pub(crate) fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// Sums along dim 2 of `x` (b, h, n, ..) of the entries at least `offset` places earlier (zero
/// for the first `offset`), as one matmul by the (n, n) matrix of ones below its `offset`-th
/// subdiagonal: products of the 0/1 matrix are exact, the sums accumulate in f32 for f16 / bf16
/// and come back in `x`'s dtype, and the backward is one matmul too.
pub(crate) fn prefix_sums(x: &Tensor, offset: i64) -> Tensor {
    let size = x.size();
    let n = size[2];
    constant_matrix(Matrix::Prefix { n, offset }, x.kind(), x.device())
        .matmul(&x.reshape([size[0], size[1], n, -1]))
        .reshape(size)
}

/// Constant 0/1 matrices of the chunked forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Matrix {
    /// (n, n): ones below the `offset`-th subdiagonal.
    Prefix { n: i64, offset: i64 },
    /// ((hist+1)·n, n): block p shifts by `hist − p` rows (ones on that subdiagonal).
    Shifts { n: i64, hist: i64 },
}

thread_local! {
    /// Every layer of every call asks for the same few matrices: building one takes several
    /// kernel launches, which small models cannot hide.
    static MATRICES: RefCell<HashMap<(Matrix, Kind, Device), Tensor>> = RefCell::new(HashMap::new());
}

/// The matrix `m` in `kind` on `device`, built once per thread.
pub(crate) fn constant_matrix(m: Matrix, kind: Kind, device: Device) -> Tensor {
    MATRICES.with(|cache| {
        cache
            .borrow_mut()
            .entry((m, kind, device))
            .or_insert_with(|| {
                tch::no_grad(|| match m {
                    Matrix::Prefix { n, offset } => {
                        Tensor::ones([n, n], (kind, device)).tril(-offset)
                    }
                    Matrix::Shifts { n, hist } => {
                        let ones = Tensor::ones([n, n], (kind, device));
                        let bands: Vec<Tensor> = (0..=hist)
                            .map(|p| ones.tril(p - hist).triu(p - hist))
                            .collect();
                        Tensor::cat(&bands, 0)
                    }
                })
            })
            .shallow_clone()
    })
}

/// Sums of all earlier entries along `dim` (zero for the first), accumulated and returned in
/// `kind`. The zero is joined before the scan, in `x`'s dtype, so a bf16 `x` is read once by a
/// scan that writes f32 (no separate conversion pass), and the join's backward is a view.
pub(crate) fn exclusive_cumsum(x: &Tensor, dim: i64, kind: Kind) -> Tensor {
    let n = x.size()[dim as usize];
    Tensor::cat(
        &[x.narrow(dim, 0, 1).zeros_like(), x.narrow(dim, 0, n - 1)],
        dim,
    )
    .cumsum(dim, kind)
}
