//! Reading weights from safetensors (single file or sharded) and writing them back atomically.
//!
//! Files are memory-mapped; each tensor is copied from the mapping straight into its slot of the
//! flat parameter buffer on the target device, converting dtype on the way. Nothing reads a whole
//! file into RAM.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result, TorchContext};
use crate::params::{ParamLayout, Weights};

/// Something that holds named tensors in Hugging Face naming and layout.
pub trait TensorSource: Send + Sync {
    /// The file or directory, for messages.
    fn describe(&self) -> String;
    /// The file that holds (or should hold) `name`.
    fn file_of(&self, name: &str) -> PathBuf;
    /// Torch shape of `name`, or None when absent.
    fn shape(&self, name: &str) -> Option<Vec<i64>>;
    /// Copies `name` into `dst` (same shape), converting dtype and device.
    fn load_into(&self, name: &str, dst: &mut Tensor) -> Result<()>;
    /// Drops the pages of mapped files from this process's resident memory (they stay in the
    /// page cache and are read again on the next access): called after loading, so a model
    /// file kept open does not count as half a gigabyte of resident memory for the whole run.
    fn release_pages(&self) {}
}

/// `madvise(MADV_DONTNEED)` on a read-only file mapping: its pages leave this process's
/// resident set; the next read maps them again from the file (no data is lost).
pub(crate) fn release_mapped_pages(mmap: &Mmap) {
    // SAFETY: the mapping is private and read-only, so dropping its pages only means they are
    // read from the file again if touched; nothing holds references into it across this call
    // (loading copies the tensors out).
    let _ = unsafe { mmap.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
}

/// Reads every parameter of `layout` from `src` into a new flat buffer on `device` in `kind`.
pub fn load_weights(
    layout: Arc<ParamLayout>,
    src: &dyn TensorSource,
    kind: Kind,
    device: Device,
) -> Result<Weights> {
    let _guard = tch::no_grad_guard();
    let weights = Weights::empty(layout.clone(), kind, device)?;
    for p in layout.params() {
        let shape = src
            .shape(&p.name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: p.name.clone(),
                path: src.file_of(&p.name),
            })?;
        if shape != p.shape {
            return Err(ModelError::ShapeMismatch {
                name: p.name.clone(),
                path: src.file_of(&p.name),
                expected: p.shape.clone(),
                got: shape,
            });
        }
        let mut view = layout.param_view(&weights.flat, p)?;
        src.load_into(&p.name, &mut view)?;
    }
    Ok(weights)
}

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// Safetensors weights: `model.safetensors`, or shards listed by `model.safetensors.index.json`.
pub struct SafetensorsSource {
    origin: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, (usize, TensorInfo)>,
}

impl SafetensorsSource {
    /// Opens the weights of a model directory.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: index.clone(),
                source,
            })?;
            let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            Self::open_files(index, &paths)
        } else if single.exists() {
            Self::open_files(single.clone(), std::slice::from_ref(&single))
        } else {
            Err(ModelError::MissingFile {
                path: single,
                hint: " (nor model.safetensors.index.json)".into(),
            })
        }
    }

    /// Opens the given safetensors files; `origin` names the set in messages.
    pub fn open_files(origin: PathBuf, paths: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: read-only mapping of a model file that rlrun does not modify while reading.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
            let (n, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                let message = match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer => format!(
                        "the file is {} bytes, which does not match the size its header describes (truncated or corrupt)",
                        mmap.len()
                    ),
                    other => other.to_string(),
                };
                ModelError::Safetensors {
                    path: path.clone(),
                    message,
                }
            })?;
            for (name, info) in metadata.tensors() {
                tensors.insert(name, (shards.len(), info.clone()));
            }
            shards.push(Shard {
                path: path.clone(),
                mmap,
                data_start: 8 + n,
            });
        }
        Ok(SafetensorsSource {
            origin,
            shards,
            tensors,
        })
    }

    /// Names of all tensors.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }

    /// A CPU tensor over the mapped bytes of `name` (copied only when misaligned).
    fn host_tensor(&self, name: &str) -> Result<Tensor> {
        let (shard, info) = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                path: self.origin.clone(),
            })?;
        let shard = &self.shards[*shard];
        let kind = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            other => {
                return Err(ModelError::UnsupportedDtype {
                    name: name.to_string(),
                    path: shard.path.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let (a, b) = info.data_offsets;
        let bytes = &shard.mmap[shard.data_start + a..shard.data_start + b];
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let elt = kind.elt_size_in_bytes();
        let t = if (bytes.as_ptr() as usize).is_multiple_of(elt) {
            // SAFETY: `bytes` lives as long as `self` (the mapping); the tensor is only read
            // while this source is alive (callers copy out of it immediately).
            unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], kind, Device::Cpu) }
        } else {
            Tensor::f_from_data_size(bytes, &shape, kind)
        };
        t.ctx(|| format!("reading tensor `{name}` from {}", shard.path.display()))
    }

    /// A host copy of `name` in its stored dtype.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        Ok(self.host_tensor(name)?.f_detach_copy()?)
    }
}

impl TensorSource for SafetensorsSource {
    fn describe(&self) -> String {
        self.origin.display().to_string()
    }
    fn file_of(&self, name: &str) -> PathBuf {
        match self.tensors.get(name) {
            Some((s, _)) => self.shards[*s].path.clone(),
            None => self.origin.clone(),
        }
    }
    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.tensors
            .get(name)
            .map(|(_, i)| i.shape.iter().map(|&d| d as i64).collect())
    }
    fn load_into(&self, name: &str, dst: &mut Tensor) -> Result<()> {
        let src = self.host_tensor(name)?;
        dst.f_copy_(&src)
            .ctx(|| format!("copying `{name}` from {}", self.file_of(name).display()))
    }

    fn release_pages(&self) {
        for shard in &self.shards {
            release_mapped_pages(&shard.mmap);
        }
    }
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        other => {
            return Err(ModelError::Invalid(format!(
                "cannot write dtype {other:?} to safetensors"
            )))
        }
    })
}

/// Writes `tensors` to `path` in safetensors format, atomically: a temporary file in the same
/// directory is written, fsynced and renamed over `path`, so a crash leaves either the old file or
/// the new one, never a torn file.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).unwrap_or_default(),
        );
    }
    let mut offset = 0usize;
    let mut hosts = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let host = t
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .ctx(|| format!("preparing `{name}` for writing"))?;
        let nbytes = host.numel() * host.kind().elt_size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype_name(host.kind())?,
                "shape": host.size(),
                "data_offsets": [offset, offset + nbytes],
            }),
        );
        offset += nbytes;
        hosts.push((host, nbytes));
    }
    let mut header_bytes =
        serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    atomic_write(path, |f| {
        f.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        f.write_all(&header_bytes)?;
        for (host, nbytes) in &hosts {
            // SAFETY: `host` is a contiguous CPU tensor of exactly `nbytes` bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts(host.data_ptr() as *const u8, *nbytes) };
            f.write_all(bytes)?;
        }
        Ok(())
    })
}

/// Writes a file atomically: temp file in the same directory, fsync, rename, fsync the directory.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 22, &file);
            write(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}

/// Writes a JSON value atomically (pretty-printed).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::Invalid(e.to_string()))?;
    atomic_write(path, |f| f.write_all(text.as_bytes()))
}
