//! Hugging Face safetensors checkpoints (one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`), memory-mapped, and loading them into a `VarStore` whose
//! variable names are the checkpoint's tensor names.
use crate::relative_path::join_inside;
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    /// Index into [`Checkpoint::files`].
    file: usize,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// An opened checkpoint: every shard mapped and its header checked, tensors indexed by name.
pub struct Checkpoint {
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
    /// Which of the stored tensors are read under which names, when not all as stored (see
    /// [`Checkpoint::renamed`]); said in errors.
    view: Option<String>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` and its shards when the
    /// index exists, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        if index_path.is_file() {
            Self::open_sharded(dir, &index_path)
        } else if single_path.is_file() {
            let mut ckpt = Self {
                files: Vec::new(),
                maps: Vec::new(),
                tensors: BTreeMap::new(),
                view: None,
            };
            ckpt.add_file(single_path)?;
            Ok(ckpt)
        } else {
            let other = ["pytorch_model.bin", "model.pt", "consolidated.00.pth"]
                .into_iter()
                .find(|f| dir.join(f).exists())
                .map(|f| format!(" (found {f}: only safetensors checkpoints are read)"))
                .unwrap_or_default();
            bail!(
                "no {SINGLE_FILE} or {INDEX_FILE} in {}{other}",
                dir.display()
            )
        }
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path)
            .with_context(|| format!("reading {}", index_path.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index_path.display()))?;
        let weight_map: BTreeMap<String, String> = index
            .get("weight_map")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| {
                anyhow!(
                    "{}: no `weight_map` object of tensor name -> file",
                    index_path.display()
                )
            })?;
        let mut ckpt = Self {
            files: Vec::new(),
            maps: Vec::new(),
            tensors: BTreeMap::new(),
            view: None,
        };
        // Shard names come from the index: each must stay inside the checkpoint's directory.
        let mut shards = BTreeMap::new();
        for (tensor, file) in &weight_map {
            let path = join_inside(dir, file)
                .map_err(|e| anyhow!("{}: weight_map entry {tensor}: {e}", index_path.display()))?;
            shards.insert(file.as_str(), path);
        }
        for path in shards.values() {
            ckpt.add_file(path.clone())?;
        }
        for (tensor, file) in &weight_map {
            let found = ckpt.tensors.get(tensor).map(|info| &ckpt.files[info.file]);
            if found != shards.get(file.as_str()) {
                bail!(
                    "{}: maps {tensor} to {file}, which does not contain it",
                    index_path.display()
                );
            }
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the map is read-only; like every safetensors reader, we rely on the checkpoint
        // not being rewritten while it is open.
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            anyhow!(
                "{} is not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        })?;
        let data_start = 8 + header_len;
        let index = self.files.len();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let entry = TensorInfo {
                dtype: info.dtype,
                shape: info.shape.iter().map(|&d| d as i64).collect(),
                file: index,
                start: data_start + start,
                end: data_start + end,
            };
            if let Some(prev) = self.tensors.insert(name.clone(), entry) {
                bail!(
                    "tensor {name} is in both {} and {}",
                    self.files[prev.file].display(),
                    path.display()
                );
            }
        }
        self.files.push(path);
        self.maps.push(map);
        Ok(())
    }

    /// The checkpoint with its tensors under other names: `rename` gives a stored name's new
    /// name, or `None` to leave the tensor out. `view` says in errors which tensors are read
    /// under which names. Returns the checkpoint and how many tensors were left out.
    pub fn renamed(
        self,
        view: &str,
        rename: impl Fn(&str) -> Result<Option<String>>,
    ) -> Result<(Self, usize)> {
        let mut tensors = BTreeMap::new();
        let mut stored_as = BTreeMap::new();
        let mut left_out = 0;
        for (name, info) in self.tensors {
            let file = self.files[info.file].display();
            let Some(new) = rename(&name).with_context(|| format!("tensor {name} in {file}"))?
            else {
                left_out += 1;
                continue;
            };
            if let Some(other) = stored_as.insert(new.clone(), name.clone()) {
                bail!("{file}: tensors {other} and {name} are both read as {new} ({view})");
            }
            tensors.insert(new, info);
        }
        let ckpt = Self {
            files: self.files,
            maps: self.maps,
            tensors,
            view: Some(view.to_owned()),
        };
        Ok((ckpt, left_out))
    }

    /// The checkpoint's files, in the order [`TensorInfo`] refers to them.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.info(name).map(|i| self.files[i.file].as_path())
    }

    /// Bytes of tensor data on disk (headers excluded).
    pub fn data_bytes(&self) -> usize {
        self.tensors.values().map(|i| i.end - i.start).sum()
    }

    /// How many elements are stored in each dtype.
    pub fn dtype_counts(&self) -> BTreeMap<String, i64> {
        let mut counts = BTreeMap::new();
        for info in self.tensors.values() {
            *counts.entry(format!("{:?}", info.dtype)).or_default() += info.numel();
        }
        counts
    }

    /// Tensor `name` converted to `kind` on `device`.
    pub fn tensor(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        Ok(self.read(name)?.f_to_device(device)?.f_to_kind(kind)?)
    }

    /// Tensor `name` as stored (its file's dtype), on the CPU.
    fn read(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("no tensor {name} in {}", self.describe()))?;
        let kind = stored_kind(info.dtype).ok_or_else(|| {
            anyhow!(
                "tensor {name} in {} has dtype {:?}; expected F32, BF16 or F16",
                self.files[info.file].display(),
                info.dtype
            )
        })?;
        let bytes = &self.maps[info.file][info.start..info.end];
        Ok(Tensor::f_from_data_size(bytes, &info.shape, kind)?)
    }

    fn describe(&self) -> String {
        let files = match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} ({} shards)",
                many[0]
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(INDEX_FILE)
                    .display(),
                many.len()
            ),
        };
        match &self.view {
            Some(view) => format!("{files} ({view})"),
            None => files,
        }
    }
}

fn stored_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        _ => None,
    }
}

/// What to do with a checkpoint tensor that matches no parameter: `Ok(true)` to ignore it (e.g.
/// `lm_head.weight` of a tied model), `Ok(false)` to report it as unexpected, `Err` when it is
/// known but wrong (the error is reported with the tensor's file).
pub type ExtraTensorPolicy<'a> = &'a dyn Fn(&str, &[i64]) -> Result<bool>;

/// Checks that `ckpt` holds exactly the tensors `expected` (name -> shape) asks for, in a
/// supported dtype; unmatched checkpoint tensors go through `extra`. All problems are reported
/// in one error.
pub fn check(
    ckpt: &Checkpoint,
    expected: &BTreeMap<String, Vec<i64>>,
    extra: ExtraTensorPolicy,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in expected {
        match ckpt.info(name) {
            None => problems.push(format!(
                "missing tensor {name} (shape {shape:?}) in {}",
                ckpt.describe()
            )),
            Some(info) => {
                let file = ckpt.files[info.file].display();
                if &info.shape != shape {
                    problems.push(format!(
                        "tensor {name} in {file} has shape {:?}, the model expects {shape:?}",
                        info.shape
                    ));
                }
                if stored_kind(info.dtype).is_none() {
                    problems.push(format!(
                        "tensor {name} in {file} has dtype {:?}; expected F32, BF16 or F16",
                        info.dtype
                    ));
                }
            }
        }
    }
    for name in ckpt.names().filter(|n| !expected.contains_key(*n)) {
        let info = &ckpt.tensors[name];
        let file = ckpt.files[info.file].display();
        match extra(name, &info.shape) {
            Ok(true) => tracing::debug!("ignoring checkpoint tensor {name} in {file}"),
            Ok(false) => problems.push(format!(
                "unexpected tensor {name} (shape {:?}) in {file}: the model has no such parameter",
                info.shape
            )),
            Err(e) => problems.push(format!("tensor {name} in {file}: {e}")),
        }
    }
    match problems.len() {
        0 => Ok(()),
        1 => bail!("{}", problems[0]),
        n if n <= MAX_LISTED_PROBLEMS => {
            bail!("{n} problems with the checkpoint: {}", problems.join("; "))
        }
        n => bail!(
            "{n} problems with the checkpoint: {}; and {} more",
            problems[..MAX_LISTED_PROBLEMS].join("; "),
            n - MAX_LISTED_PROBLEMS
        ),
    }
}

/// Problems a checkpoint error lists; a checkpoint of 300,000 stray tensors gives a readable
/// line, not megabytes.
const MAX_LISTED_PROBLEMS: usize = 20;

/// Fills every variable of `vs` from the checkpoint tensor of the same name, converting to the
/// variable's dtype and device. The checkpoint must match the store exactly (see [`check`]).
pub fn fill_var_store(
    vs: &nn::VarStore,
    ckpt: &Checkpoint,
    extra: ExtraTensorPolicy,
) -> Result<()> {
    let vars: HashMap<String, Tensor> = vs.variables();
    let expected: BTreeMap<String, Vec<i64>> = vars
        .iter()
        .map(|(name, t)| (name.clone(), t.size()))
        .collect();
    check(ckpt, &expected, extra)?;
    tracing::info!(
        "loading {} tensors ({:.1} MB) from {}",
        expected.len(),
        ckpt.data_bytes() as f64 / 1e6,
        ckpt.describe()
    );
    tch::no_grad(|| -> Result<()> {
        for name in expected.keys() {
            let src = ckpt.read(name)?;
            // One copy does the dtype conversion and the host-to-device transfer.
            vars[name].shallow_clone().f_copy_(&src).with_context(|| {
                format!(
                    "copying {name} from {}",
                    ckpt.file_of(name).unwrap_or(Path::new("?")).display()
                )
            })?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, tensors: &[(&str, Tensor)]) {
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        Tensor::write_safetensors(&named, path).unwrap();
    }

    fn expected(entries: &[(&str, &[i64])]) -> BTreeMap<String, Vec<i64>> {
        entries
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    fn no_extras(_: &str, _: &[i64]) -> Result<bool> {
        Ok(false)
    }

    #[test]
    fn loads_and_converts_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::randn([3, 2], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([4], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
        write(
            &dir.path().join(SINGLE_FILE),
            &[("a", a.copy()), ("b", b.copy())],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(ckpt.info("b").unwrap().dtype, Dtype::BF16);
        assert!(ckpt
            .tensor("a", Kind::Float, Device::Cpu)
            .unwrap()
            .equal(&a));
        let b32 = ckpt.tensor("b", Kind::Float, Device::Cpu).unwrap();
        assert_eq!(b32.kind(), Kind::Float);
        assert!(b32.equal(&b.to_kind(Kind::Float)));

        // A store that does not match: both problems reported, nothing written.
        let vs = nn::VarStore::new(Device::Cpu);
        let va = vs.root().zeros("a", &[3, 2]);
        let _ = vs.root().sub("x").zeros("b", &[4]);
        let e = fill_var_store(&vs, &ckpt, &no_extras)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing tensor x.b") && e.contains("unexpected tensor b"),
            "{e}"
        );
        assert!(va.equal(&Tensor::zeros([3, 2], (Kind::Float, Device::Cpu))));

        // A bf16 store filled from the f32 tensor, with `b` tolerated as an extra.
        let mut vs = nn::VarStore::new(Device::Cpu);
        vs.set_kind(Kind::BFloat16);
        let va = vs.root().zeros("a", &[3, 2]);
        fill_var_store(&vs, &ckpt, &|n, _| Ok(n == "b")).unwrap();
        assert_eq!(va.kind(), Kind::BFloat16);
        assert!(va.equal(&a.to_kind(Kind::BFloat16)));
    }

    #[test]
    fn sharded_index_is_followed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let t = || Tensor::ones([2], (Kind::Float, Device::Cpu));
        write(&dir.path().join("s1.safetensors"), &[("a", t())]);
        write(
            &dir.path().join("s2.safetensors"),
            &[("b", t()), ("c", t())],
        );
        let index = serde_json::json!({"metadata": {}, "weight_map":
            {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.files().len(), 2);
        assert_eq!(
            ckpt.file_of("c").unwrap(),
            dir.path().join("s2.safetensors")
        );
        check(
            &ckpt,
            &expected(&[("a", &[2]), ("b", &[2]), ("c", &[2])]),
            &no_extras,
        )
        .unwrap();

        let index =
            serde_json::json!({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("maps a to s2.safetensors"), "{e}");
    }

    #[test]
    fn renamed_views_drop_rename_and_refuse_collisions() {
        let dir = tempfile::tempdir().unwrap();
        let t = || Tensor::ones([2], (Kind::Float, Device::Cpu));
        write(
            &dir.path().join(SINGLE_FILE),
            &[("lm.a", t()), ("lm.b", t()), ("vision.c", t())],
        );
        let strip = |n: &str| Ok(n.strip_prefix("lm.").map(str::to_owned));
        let (ckpt, left_out) = Checkpoint::open(dir.path())
            .unwrap()
            .renamed("the lm. tensors", strip)
            .unwrap();
        assert_eq!(left_out, 1);
        assert_eq!(ckpt.names().collect::<Vec<_>>(), ["a", "b"]);
        assert!(ckpt
            .tensor("b", Kind::Float, Device::Cpu)
            .unwrap()
            .equal(&t()));
        let e = check(&ckpt, &expected(&[("a", &[2]), ("d", &[2])]), &|n, _| {
            Ok(n == "b")
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("missing tensor d") && e.contains("(the lm. tensors)"),
            "{e}"
        );

        let e = Checkpoint::open(dir.path())
            .unwrap()
            .renamed("one name", |_| Ok(Some("x".into())))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("both read as x") && e.contains("lm.a"), "{e}");
    }

    #[test]
    fn a_flood_of_unexpected_tensors_gives_a_short_error() {
        let dir = tempfile::tempdir().unwrap();
        let named: Vec<(String, Tensor)> = (0..5000)
            .map(|i| {
                (
                    format!("stray.{i}"),
                    Tensor::zeros([1], (Kind::Float, Device::Cpu)),
                )
            })
            .collect();
        let refs: Vec<(&str, Tensor)> = named
            .iter()
            .map(|(n, t)| (n.as_str(), t.shallow_clone()))
            .collect();
        write(&dir.path().join(SINGLE_FILE), &refs);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let e = check(&ckpt, &expected(&[]), &no_extras)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("5000 problems") && e.ends_with("and 4980 more"),
            "{e}"
        );
        assert!(e.len() < 5000, "{} bytes", e.len());
    }

    #[test]
    fn shard_names_outside_the_directory_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        let outside = root.path().join("outside.safetensors");
        write(
            &outside,
            &[("a", Tensor::ones([2], (Kind::Float, Device::Cpu)))],
        );
        for (entry, why) in [
            ("../outside.safetensors", "leaves its directory"),
            (outside.to_str().unwrap(), "is absolute"),
        ] {
            let index = serde_json::json!({"weight_map": {"a": entry}});
            std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
            let e = format!("{:#}", Checkpoint::open(&dir).err().unwrap());
            assert!(
                e.contains(INDEX_FILE) && e.contains("weight_map entry a") && e.contains(why),
                "{entry}: {e}"
            );
        }
    }

    #[test]
    fn shape_and_dtype_problems_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join(SINGLE_FILE),
            &[
                ("w", Tensor::zeros([3, 4], (Kind::Float, Device::Cpu))),
                ("i", Tensor::zeros([2], (Kind::Int64, Device::Cpu))),
            ],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let e = check(&ckpt, &expected(&[("w", &[4, 3]), ("i", &[2])]), &no_extras)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor w in") && e.contains("[3, 4]") && e.contains("[4, 3]"),
            "{e}"
        );
        assert!(e.contains("tensor i in") && e.contains("I64"), "{e}");
        assert!(e.contains(SINGLE_FILE), "{e}");
    }

    #[test]
    fn missing_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(
            e.contains("no model.safetensors") && e.contains("pytorch_model.bin"),
            "{e}"
        );

        let path = dir.path().join(SINGLE_FILE);
        write(
            &path,
            &[("w", Tensor::zeros([64], (Kind::Float, Device::Cpu)))],
        );
        let bytes = std::fs::read(&path).unwrap();
        for cut in [bytes.len() - 10, 20, 3, 0] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains("truncated"),
                "{cut}: {e}"
            );
        }
    }
}
