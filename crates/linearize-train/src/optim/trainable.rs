//! The named set of tensors a stage trains: counts, global gradient norm, clipping, resume.
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashSet;
use tch::nn::VarStore;
use tch::Tensor;

/// Named trainable tensors (leaf tensors with `requires_grad`), in a fixed order. Cloning shares
/// the tensors.
#[derive(Debug)]
pub struct Trainable {
    params: Vec<(String, Tensor)>,
}

impl Clone for Trainable {
    fn clone(&self) -> Self {
        let params = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        Self { params }
    }
}

impl Trainable {
    /// Checks that names are unique and every tensor is a floating-point tensor requiring grad.
    pub fn new(params: Vec<(String, Tensor)>) -> Result<Self> {
        ensure!(!params.is_empty(), "no trainable parameters");
        let mut seen = HashSet::with_capacity(params.len());
        for (name, tensor) in &params {
            ensure!(
                seen.insert(name.as_str()),
                "trainable parameter '{name}' is listed twice"
            );
            ensure!(
                tensor.is_floating_point(),
                "trainable parameter '{name}' has dtype {:?}, expected a float type",
                tensor.kind()
            );
            ensure!(
                tensor.requires_grad(),
                "trainable parameter '{name}' does not require grad"
            );
        }
        Ok(Self { params })
    }

    /// The variables of `vs` that require grad, sorted by name (the order is stable across runs,
    /// which the optimizer state relies on).
    pub fn from_var_store(vs: &VarStore) -> Result<Self> {
        let mut params: Vec<_> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(params)
    }

    pub fn named(&self) -> &[(String, Tensor)] {
        &self.params
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn num_tensors(&self) -> usize {
        self.params.len()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|(_, t)| t.numel()).sum()
    }

    /// Global L2 norm of the accumulated gradients, computed in fp32; tensors without a gradient
    /// count as zero.
    pub fn grad_norm(&self) -> Result<f64> {
        tch::no_grad(|| {
            let mut norms = Vec::with_capacity(self.params.len());
            for (name, param) in &self.params {
                let grad = param.grad();
                if grad.defined() {
                    let norm = grad
                        .f_to_kind(tch::Kind::Float)
                        .and_then(|g| g.f_norm())
                        .with_context(|| format!("gradient norm of '{name}'"))?;
                    let device = norms.first().map_or(norm.device(), |n: &Tensor| n.device());
                    norms.push(norm.f_to_device(device)?);
                }
            }
            if norms.is_empty() {
                return Ok(0.0);
            }
            Ok(Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?)
        })
    }

    /// Scales the gradients so that their global norm is at most `max_norm` (like torch's
    /// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1) and returns the norm
    /// before clipping. A non-finite norm leaves the gradients untouched; the caller should skip
    /// the optimizer step then.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<f64> {
        ensure!(max_norm > 0.0, "max_grad_norm must be > 0, got {max_norm}");
        let norm = self.grad_norm()?;
        let factor = max_norm / (norm + 1e-6);
        if norm.is_finite() && factor < 1.0 {
            tch::no_grad(|| {
                for (name, param) in &self.params {
                    let mut grad = param.grad();
                    if grad.defined() {
                        let _ = grad
                            .f_mul_scalar_(factor)
                            .with_context(|| format!("clipping the gradient of '{name}'"))?;
                    }
                }
                anyhow::Ok(())
            })?;
        }
        Ok(norm)
    }

    /// Averages the accumulated gradients over the data-parallel ranks of `group` (bucketed
    /// all-reduce), so that every rank applies the same update: the gradient of the mean loss
    /// over the global batch. A parameter that got no gradient on this rank contributes zeros
    /// (its gradient is materialised first, so every rank reduces the same tensors).
    pub fn average_gradients(&self, group: &linearize_dist::ProcessGroup) -> Result<()> {
        if !group.is_distributed() {
            return Ok(());
        }
        let mut grads = Vec::with_capacity(self.params.len());
        for (name, param) in &self.params {
            let mut grad = param.grad();
            if !grad.defined() {
                // d(0 * sum(p))/dp = 0: allocates a zero gradient the autograd way.
                (param.sum(param.kind()) * 0.0)
                    .f_backward()
                    .with_context(|| format!("zero gradient of '{name}'"))?;
                grad = param.grad();
            }
            grads.push(grad);
        }
        group
            .all_reduce_mean(&mut grads)
            .context("averaging the gradients across ranks")
    }

    /// Sets every accumulated gradient to zero (gradients stay allocated, so a parameter that
    /// gets no gradient in a step is still updated from its moments, as with torch's
    /// `zero_grad(set_to_none=False)`).
    pub fn zero_grad(&self) {
        for (_, param) in &self.params {
            param.shallow_clone().zero_grad();
        }
    }

    /// Copies saved values into the parameters (resume); every parameter must be given, with its
    /// shape, and nothing else. Values are cast to the parameter's dtype and device.
    pub fn load(&self, named: &[(String, Tensor)]) -> Result<()> {
        for (name, tensor) in named {
            let Some(param) = self.get(name) else {
                bail!("saved parameter '{name}' is not a trainable parameter of this model");
            };
            ensure!(
                param.size() == tensor.size(),
                "saved parameter '{name}' has shape {:?}, expected {:?}",
                tensor.size(),
                param.size()
            );
        }
        for (name, _) in &self.params {
            ensure!(
                named.iter().any(|(n, _)| n == name),
                "saved parameters lack trainable parameter '{name}'"
            );
        }
        tch::no_grad(|| {
            for (name, tensor) in named {
                if let Some(param) = self.get(name) {
                    param
                        .shallow_clone()
                        .f_copy_(tensor)
                        .with_context(|| format!("restoring parameter '{name}'"))?;
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    #[test]
    fn grad_norm_is_global_and_clipping_scales_to_max() {
        let a = param(&[1.0, 2.0]);
        let b = param(&[3.0]);
        let t = Trainable::new(vec![
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ])
        .unwrap();
        // d/dx sum(x * c) = c: gradients [3, 4] and [12] have global norm 13.
        (a.dot(&Tensor::from_slice(&[3.0f32, 4.0])) + (&b * 12.0).sum(Kind::Float)).backward();
        assert!((t.grad_norm().unwrap() - 13.0).abs() < 1e-5);
        let before = t.clip_grad_norm(6.5).unwrap();
        assert!((before - 13.0).abs() < 1e-5);
        assert!((t.grad_norm().unwrap() - 6.5).abs() < 1e-4);
        let ga = Vec::<f32>::try_from(a.grad()).unwrap();
        assert!((ga[0] - 1.5).abs() < 1e-4 && (ga[1] - 2.0).abs() < 1e-4);
        // Below the threshold nothing changes.
        assert!((t.clip_grad_norm(100.0).unwrap() - 6.5).abs() < 1e-4);
        assert!((t.grad_norm().unwrap() - 6.5).abs() < 1e-4);
        t.zero_grad();
        assert_eq!(t.grad_norm().unwrap(), 0.0);
        assert_eq!(t.num_elements(), 3);
    }

    #[test]
    fn rejects_duplicates_frozen_and_integer_tensors() {
        let err = |params: Vec<(String, Tensor)>| Trainable::new(params).unwrap_err().to_string();
        assert!(err(vec![
            ("a".into(), param(&[1.0])),
            ("a".into(), param(&[1.0]))
        ])
        .contains("twice"));
        assert!(err(vec![("f".into(), Tensor::from_slice(&[1.0f32]))]).contains("does not require"));
        assert!(err(vec![("i".into(), Tensor::from_slice(&[1i64]))]).contains("Int64"));
        assert!(err(vec![]).contains("no trainable"));
    }

    #[test]
    fn from_var_store_takes_trainable_variables_sorted() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _z = root.zeros("z", &[2]);
        let _a = root.zeros("a", &[3]);
        let _frozen = root.zeros_no_train("frozen", &[4]);
        let t = Trainable::from_var_store(&vs).unwrap();
        let names: Vec<_> = t.named().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "z"]);
        assert_eq!(t.num_elements(), 5);
    }

    #[test]
    fn load_checks_names_and_shapes_then_copies() {
        let t = Trainable::new(vec![("w".into(), param(&[0.0, 0.0]))]).unwrap();
        let err = t
            .load(&[("w".into(), Tensor::from_slice(&[1.0f32]))])
            .unwrap_err();
        assert!(err.to_string().contains("shape [1], expected [2]"), "{err}");
        let err = t
            .load(&[("v".into(), Tensor::from_slice(&[1.0f32, 2.0]))])
            .unwrap_err();
        assert!(err.to_string().contains("'v'"), "{err}");
        assert!(t
            .load(&[])
            .unwrap_err()
            .to_string()
            .contains("lack trainable parameter 'w'"));
        t.load(&[("w".into(), Tensor::from_slice(&[1.0f64, 2.0]))])
            .unwrap();
        assert_eq!(
            Vec::<f32>::try_from(t.get("w").unwrap()).unwrap(),
            [1.0, 2.0]
        );
    }
}
