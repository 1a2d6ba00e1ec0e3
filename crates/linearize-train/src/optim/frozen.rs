//! Proof that frozen weights stay frozen: a digest of each tensor's bytes taken before training,
//! checked afterwards together with the absence of gradients.
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

struct Entry {
    name: String,
    tensor: Tensor,
    kind: Kind,
    shape: Vec<i64>,
    digest: [u8; 32],
}

/// SHA-256 digests of tensors that must not change. Holding digests, not copies, keeps the cost
/// at one pass over the weights whatever the model size.
pub struct FrozenSnapshot {
    entries: Vec<Entry>,
}

impl FrozenSnapshot {
    /// Records the current bytes of every tensor in `named`.
    pub fn capture(named: &[(String, Tensor)]) -> Result<Self> {
        let entries = named
            .iter()
            .map(|(name, tensor)| {
                Ok(Entry {
                    name: name.clone(),
                    tensor: tensor.shallow_clone(),
                    kind: tensor.kind(),
                    shape: tensor.size(),
                    digest: digest(tensor).with_context(|| format!("reading frozen '{name}'"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Fails, naming every offender, if a tensor changed dtype, shape or any bit, or holds a
    /// gradient (it took part in a backward pass as if trainable).
    pub fn verify(&self) -> Result<()> {
        let mut problems = Vec::new();
        for entry in &self.entries {
            let tensor = &entry.tensor;
            if tensor.grad().defined() {
                problems.push(format!("'{}' received a gradient", entry.name));
            }
            if tensor.kind() != entry.kind || tensor.size() != entry.shape {
                problems.push(format!(
                    "'{}' changed from {:?} {:?} to {:?} {:?}",
                    entry.name,
                    entry.kind,
                    entry.shape,
                    tensor.kind(),
                    tensor.size()
                ));
            } else if digest(tensor)? != entry.digest {
                problems.push(format!("'{}' changed value", entry.name));
            }
        }
        if !problems.is_empty() {
            bail!("frozen tensors were modified: {}", problems.join("; "));
        }
        Ok(())
    }
}

fn digest(tensor: &Tensor) -> Result<[u8; 32]> {
    let tensor = tensor
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    let mut bytes = vec![0u8; tensor.numel() * tensor.kind().elt_size_in_bytes()];
    tensor.f_copy_data_u8(&mut bytes, tensor.numel())?;
    Ok(Sha256::digest(&bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(tensors: &[&Tensor]) -> Vec<(String, Tensor)> {
        tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("t{i}"), t.shallow_clone()))
            .collect()
    }

    #[test]
    fn untouched_tensors_verify() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_kind(Kind::BFloat16);
        let b = Tensor::from_slice(&[4.0f32]);
        let snapshot = FrozenSnapshot::capture(&named(&[&a, &b])).unwrap();
        let _ = (&a * 2.0).sum(Kind::Float);
        snapshot.verify().unwrap();
        assert_eq!(snapshot.len(), 2);
    }

    #[test]
    fn one_ulp_change_is_caught() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let snapshot = FrozenSnapshot::capture(&named(&[&a])).unwrap();
        let next = f32::from_bits(2.0f32.to_bits() + 1);
        let _ = a.narrow(0, 1, 1).fill_(f64::from(next));
        let err = snapshot.verify().unwrap_err().to_string();
        assert!(err.contains("'t0' changed value"), "{err}");
    }

    #[test]
    fn gradient_on_frozen_tensor_is_caught() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let snapshot = FrozenSnapshot::capture(&named(&[&a])).unwrap();
        (&a * 3.0).sum(Kind::Float).backward();
        let err = snapshot.verify().unwrap_err().to_string();
        assert!(err.contains("'t0' received a gradient"), "{err}");
    }
}
