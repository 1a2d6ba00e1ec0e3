//! A linear projection x W^T + b with an optional trainable adapter added to its output (LoRA
//! plugs in here), and how the parameters of new modules are filled.
use tch::{nn, Tensor};

/// Something added to a [`Linear`]'s output, computed from the same input.
pub trait LinearAdapter: Send {
    /// The term added to x W^T + b, same shape as the output.
    fn delta(&self, x: &Tensor) -> Tensor;

    /// `y + delta(x)` for the layer's output `y` (x W^T + b); adapters may fold the sum into
    /// their last product.
    fn add_delta(&self, x: &Tensor, y: Tensor) -> Tensor {
        y + self.delta(x)
    }

    /// The (out, in) matrix dW with delta(x) = x dW^T, when the adapter is linear in x; lets
    /// [`Linear::merge_adapter`] fold it into the weight.
    fn weight_delta(&self) -> Option<Tensor> {
        None
    }
}

/// How the parameters of a newly built module are filled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    /// HF's `_init_weights`: weights N(0, std), biases 0, norm scales 1.
    Random { std: f64 },
    /// Allocated but not written, for parameters that a checkpoint fills right after.
    Uninit,
}

impl ParamInit {
    /// Registers the parameter `name` under `path` (trainable, so `VarStore::freeze` and
    /// `unfreeze` reach it), filled by `random` unless uninitialised.
    pub(crate) fn var(self, path: &nn::Path, name: &str, dims: &[i64], random: nn::Init) -> Tensor {
        match self {
            ParamInit::Random { .. } => path.var(name, dims, random),
            ParamInit::Uninit => path.add(
                name,
                Tensor::empty(dims, (path.kind(), path.device())),
                true,
            ),
        }
    }

    /// The initialiser of a weight matrix or embedding.
    pub(crate) fn normal(self) -> nn::Init {
        match self {
            ParamInit::Random { std } => nn::Init::Randn {
                mean: 0.0,
                stdev: std,
            },
            ParamInit::Uninit => nn::Init::Const(0.0),
        }
    }
}

pub struct Linear {
    weight: Tensor,       // (out, in)
    bias: Option<Tensor>, // (out,)
    adapter: Option<Box<dyn LinearAdapter>>,
}

impl Linear {
    /// A projection whose parameters are `weight` (and `bias`) under `path`.
    pub fn new(path: &nn::Path, in_dim: i64, out_dim: i64, bias: bool, init: ParamInit) -> Self {
        let weight = init.var(path, "weight", &[out_dim, in_dim], init.normal());
        let bias = bias.then(|| init.var(path, "bias", &[out_dim], nn::Init::Const(0.0)));
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// A projection that uses an existing (out, in) weight, e.g. the input embedding of a model
    /// with tied embeddings.
    pub fn shared(weight: &Tensor) -> Self {
        Self {
            weight: weight.shallow_clone(),
            bias: None,
            adapter: None,
        }
    }

    /// x (..., in) -> (..., out).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.adapter {
            Some(adapter) => adapter.add_delta(x, y),
            None => y,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_dim(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_dim(&self) -> i64 {
        self.weight.size()[0]
    }

    /// Installs `adapter`, returning the one it replaces.
    pub fn set_adapter(
        &mut self,
        adapter: Box<dyn LinearAdapter>,
    ) -> Option<Box<dyn LinearAdapter>> {
        self.adapter.replace(adapter)
    }

    pub fn take_adapter(&mut self) -> Option<Box<dyn LinearAdapter>> {
        self.adapter.take()
    }

    pub fn adapter(&self) -> Option<&dyn LinearAdapter> {
        self.adapter.as_deref()
    }

    /// Folds the adapter into the weight in place (W += dW, in W's dtype) and removes it, so the
    /// weight variable itself holds the merged value. Returns false, keeping the adapter, when
    /// it cannot be written as a matrix.
    pub fn merge_adapter(&mut self) -> bool {
        let Some(delta) = self.adapter.as_ref().and_then(|a| a.weight_delta()) else {
            return false;
        };
        tch::no_grad(|| {
            let mut w = self.weight.shallow_clone();
            let _ = w.g_add_(
                &delta
                    .to_kind(self.weight.kind())
                    .to_device(self.weight.device()),
            );
        });
        self.adapter = None;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A fixed low-rank dW = B A, the shape LoRA will have.
    struct LowRank {
        a: Tensor, // (r, in)
        b: Tensor, // (out, r)
    }

    impl LinearAdapter for LowRank {
        fn delta(&self, x: &Tensor) -> Tensor {
            x.matmul(&self.a.tr()).matmul(&self.b.tr())
        }
        fn weight_delta(&self) -> Option<Tensor> {
            Some(self.b.matmul(&self.a))
        }
    }

    struct Opaque;

    impl LinearAdapter for Opaque {
        fn delta(&self, x: &Tensor) -> Tensor {
            x.sum_dim_intlist(-1, true, None).relu().repeat([1, 3])
        }
    }

    fn linear(vs: &nn::VarStore) -> Linear {
        Linear::new(
            &vs.root().sub("proj"),
            4,
            3,
            true,
            ParamInit::Random { std: 1.0 },
        )
    }

    #[test]
    fn forward_is_x_wt_plus_b_plus_delta() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut lin = linear(&vs);
        let _ = tch::no_grad(|| {
            lin.bias
                .as_ref()
                .unwrap()
                .shallow_clone()
                .uniform_(-1.0, 1.0)
        });
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let plain = x.matmul(&lin.weight().tr()) + lin.bias().unwrap();
        assert!(lin.forward(&x).allclose(&plain, 1e-6, 1e-6, false));

        let a = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3, 2], (Kind::Float, Device::Cpu));
        assert!(lin
            .set_adapter(Box::new(LowRank {
                a: a.copy(),
                b: b.copy()
            }))
            .is_none());
        let with = &plain + x.matmul(&b.matmul(&a).tr());
        assert!(lin.forward(&x).allclose(&with, 1e-5, 1e-5, false));
        assert!(lin.take_adapter().is_some());
        assert!(lin.forward(&x).allclose(&plain, 1e-6, 1e-6, false));
    }

    #[test]
    fn merge_writes_the_variable_and_keeps_the_output() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut lin = linear(&vs);
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let a = Tensor::randn([2, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3, 2], (Kind::Float, Device::Cpu));
        lin.set_adapter(Box::new(LowRank { a, b }));
        let before = lin.forward(&x);
        assert!(lin.merge_adapter());
        assert!(lin.adapter().is_none());
        assert!(lin.forward(&x).allclose(&before, 1e-5, 1e-5, false));
        let stored = vs.variables()["proj.weight"].shallow_clone();
        assert!(stored.equal(lin.weight()));

        lin.set_adapter(Box::new(Opaque));
        assert!(!lin.merge_adapter());
        assert!(lin.adapter().is_some());
    }

    #[test]
    fn parameters_are_registered_under_hf_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Linear::new(&vs.root().sub("q_proj"), 4, 3, true, ParamInit::Uninit);
        let vars = vs.variables();
        assert_eq!(vars["q_proj.weight"].size(), [3, 4]);
        assert_eq!(vars["q_proj.bias"].size(), [3]);
    }
}
