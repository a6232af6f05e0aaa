//! Shared-memory weight sync between processes on one machine.
//!
//! The sender writes the flat buffer once into a file under `/dev/shm` (a tmpfs: RAM, no disk)
//! and hands out a [`WeightsRef`] (path, version, dtype, size, optional checksums). Each receiver
//! maps the file privately (copy-on-write) and wraps the mapping as a tensor: no copy. Two files
//! alternate, so a version is written only after every receiver has moved off the file it
//! overwrites (the controller waits for every generator's acknowledgment before the next sync).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use memmap2::{Mmap, MmapMut, MmapOptions};
use tch::{Device, Kind, Tensor};

use crate::{checksums, Result, SyncError, SyncReport};

/// A published version of the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsRef {
    pub version: u64,
    pub path: PathBuf,
    pub numel: u64,
    pub kind: Kind,
    /// Per-range CRC32C, when integrity checking is on.
    pub checksums: Vec<u32>,
    /// The buffer holds LoRA adapters (the receiver keeps its base weights), not the full model.
    pub adapters: bool,
    /// `net` sync: the weight store to pull the version from (`path` unused); `None`: the
    /// shared-memory file at `path`.
    pub source: Option<String>,
    /// `nccl` sync: the trainer broadcasts this version in this group (`path`, `source` unused).
    pub group: Option<crate::group::GroupRef>,
}

impl WeightsRef {
    /// Where the version is, for messages: the weight store's address or the file.
    pub fn location(&self) -> String {
        match (&self.group, &self.source) {
            (Some(g), _) => format!("the sync group at {} (epoch {})", g.addr, g.epoch),
            (None, Some(addr)) => format!("weight store {addr}"),
            (None, None) => self.path.display().to_string(),
        }
    }
}

pub fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

pub fn kind_from_name(s: &str) -> Option<Kind> {
    match s {
        "f32" => Some(Kind::Float),
        "bf16" => Some(Kind::BFloat16),
        "f16" => Some(Kind::Half),
        _ => None,
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The default directory for shared-memory files (`/dev/shm`, else the temp dir).
pub fn default_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// Removes `rlrun-<pid>-*` files in `dir` whose process is gone (a run killed before it could
/// clean up would otherwise leave its weights in RAM-backed `/dev/shm`); returns how many.
pub fn remove_orphans(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("rlrun-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Writes versions of a flat buffer into two alternating shared-memory files.
pub struct ShmPublisher {
    files: [PathBuf; 2],
    next: usize,
}

impl ShmPublisher {
    /// Files `<dir>/<prefix>-0` and `-1` (removed on drop).
    pub fn new(dir: &Path, prefix: &str) -> Self {
        ShmPublisher {
            files: [
                dir.join(format!("{prefix}-0")),
                dir.join(format!("{prefix}-1")),
            ],
            next: 0,
        }
    }

    /// The file the next publish writes.
    pub fn next_path(&self) -> &Path {
        &self.files[self.next]
    }

    /// Writes `flat` (any device) as `version`; `ranges` (element ranges) get checksums when given.
    pub fn publish(
        &mut self,
        version: u64,
        flat: &Tensor,
        ranges: Option<&[(i64, i64)]>,
    ) -> Result<(WeightsRef, SyncReport)> {
        let path = self.files[self.next].clone();
        self.next = 1 - self.next;
        let r = write_to(&path, version, flat, ranges)?;
        Ok(r)
    }
}

impl Drop for ShmPublisher {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Writes `flat` into the shared-memory file `path` (created or resized).
pub fn write_to(
    path: &Path,
    version: u64,
    flat: &Tensor,
    ranges: Option<&[(i64, i64)]>,
) -> Result<(WeightsRef, SyncReport)> {
    let t0 = Instant::now();
    let kind = flat.kind();
    let numel = flat.numel();
    let nbytes = numel * kind.elt_size_in_bytes();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path))?;
    file.set_len(nbytes as u64).map_err(io(path))?;
    let sums = if flat.device() == Device::Cpu && flat.is_contiguous() {
        // A CPU buffer goes in with one pwrite: straight into the tmpfs pages, without the page
        // faults a fresh mapping of the file costs the writer (about half the time for 0.5 GB).
        // SAFETY: a contiguous CPU tensor of `numel` elements, alive for this borrow.
        let bytes = unsafe { std::slice::from_raw_parts(flat.data_ptr() as *const u8, nbytes) };
        use std::os::unix::fs::FileExt;
        file.write_all_at(bytes, 0).map_err(io(path))?;
        match ranges {
            Some(r) => checksums(bytes, r, kind.elt_size_in_bytes()),
            None => Vec::new(),
        }
    } else {
        // A device buffer is copied (device to host) straight into a mapping of the file.
        // SAFETY: the file was just sized; only this process writes it while the mapping lives.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io(path))?;
        {
            let _g = tch::no_grad_guard();
            // SAFETY: `map` is `nbytes` long and outlives `dst`, which is dropped before it.
            let mut dst = unsafe {
                Tensor::f_from_blob(map.as_mut_ptr(), &[numel as i64], &[], kind, Device::Cpu)?
            };
            dst.f_copy_(&flat.f_reshape([-1])?)?;
        }
        match ranges {
            Some(r) => checksums(&map, r, kind.elt_size_in_bytes()),
            None => Vec::new(),
        }
    };
    Ok((
        WeightsRef {
            version,
            path: path.to_path_buf(),
            numel: numel as u64,
            kind,
            checksums: sums,
            adapters: false,
            source: None,
            group: None,
        },
        SyncReport {
            bytes: nbytes as u64,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// A received version of the weights (mapped from shared memory, or pulled into a buffer of its
/// own): `tensor` is valid while this lives.
pub struct MappedWeights {
    pub tensor: Tensor,
    _map: Option<(MmapMut, File)>,
}

// SAFETY: the mapping is owned and only read through `tensor`; tch tensors are Send.
unsafe impl Send for MappedWeights {}

impl MappedWeights {
    /// A version in a tensor that owns its memory.
    pub fn owned(tensor: Tensor) -> Self {
        MappedWeights { tensor, _map: None }
    }

    /// The buffer, when it is one of its own (not a mapping), to be reused.
    pub fn into_spare(self) -> Option<Tensor> {
        self._map.is_none().then_some(self.tensor)
    }
}

/// Maps a published version zero-copy (private, copy-on-write), verifying its checksums over
/// `ranges` when it carries them.
pub fn map(r: &WeightsRef, ranges: Option<&[(i64, i64)]>) -> Result<(MappedWeights, SyncReport)> {
    let t0 = Instant::now();
    let path = &r.path;
    let file = File::open(path).map_err(io(path))?;
    let nbytes = r.numel as usize * r.kind.elt_size_in_bytes();
    let len = file.metadata().map_err(io(path))?.len() as usize;
    if len != nbytes {
        return Err(SyncError::Invalid {
            path: path.clone(),
            message: format!("file has {len} bytes, expected {nbytes}"),
        });
    }
    // SAFETY: private mapping; the sender does not write this file again until every receiver
    // acknowledged a later version (double buffering, see the module docs).
    let mut map = unsafe { MmapOptions::new().map_copy(&file) }.map_err(io(path))?;
    if !r.checksums.is_empty() {
        let ranges = ranges.ok_or_else(|| SyncError::Invalid {
            path: path.clone(),
            message: "checksums given but no tensor ranges to check them against".into(),
        })?;
        let got = checksums(&map, ranges, r.kind.elt_size_in_bytes());
        if let Some(i) = got.iter().zip(&r.checksums).position(|(a, b)| a != b) {
            return Err(SyncError::Invalid {
                path: path.clone(),
                message: format!("checksum mismatch in tensor {i} of version {}", r.version),
            });
        }
    }
    // SAFETY: `map` lives in the returned struct as long as the tensor.
    let tensor = unsafe {
        Tensor::f_from_blob(
            map.as_mut_ptr(),
            &[r.numel as i64],
            &[],
            r.kind,
            Device::Cpu,
        )?
    };
    Ok((
        MappedWeights {
            tensor,
            _map: Some((map, file)),
        },
        SyncReport {
            bytes: nbytes as u64,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

/// Reads a file mapping to make sure its pages are resident (for fair timing).
pub fn touch(m: &Mmap) -> u64 {
    m.iter().step_by(4096).map(|&b| b as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_and_map_round_trip_with_checksums() {
        let dir = tempfile_dir();
        let mut p = ShmPublisher::new(&dir, "rt");
        let w = Tensor::randn([1000], (Kind::Float, Device::Cpu));
        let ranges = [(0, 10), (10, 990)];
        let (r, rep) = p.publish(3, &w, Some(&ranges)).unwrap();
        assert_eq!(rep.bytes, 4000);
        assert_eq!(r.checksums.len(), 2);
        let (m, _) = map(&r, Some(&ranges)).unwrap();
        assert_eq!((&m.tensor - &w).abs().max().double_value(&[]), 0.0);
        // The next publish goes to the other file; the mapped version is untouched.
        let w2 = &w * 2.0;
        let (r2, _) = p.publish(4, &w2, None).unwrap();
        assert_ne!(r2.path, r.path);
        assert_eq!((&m.tensor - &w).abs().max().double_value(&[]), 0.0);
        // Corruption is detected.
        let mut bad = r.clone();
        bad.checksums[1] ^= 1;
        let e = map(&bad, Some(&ranges)).err().unwrap().to_string();
        assert!(e.contains("checksum mismatch in tensor 1"), "{e}");
        // A truncated file is an error naming it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&r2.path)
            .unwrap()
            .set_len(8)
            .unwrap();
        let e = map(&r2, None).err().unwrap().to_string();
        assert!(e.contains("expected 4000"), "{e}");
    }

    #[test]
    fn orphans_of_dead_processes_are_removed_and_nothing_else() {
        let dir = tempfile_dir().join("orphans");
        std::fs::create_dir_all(&dir).unwrap();
        let dead = dir.join("rlrun-999999999-20260101-000000-0");
        let ours = dir.join(format!("rlrun-{}-20260101-000000-0", std::process::id()));
        let other = dir.join("not-ours-123");
        for f in [&dead, &ours, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        assert_eq!(remove_orphans(&dir), 1);
        assert!(!dead.exists() && ours.exists() && other.exists());
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("rlrun-shm-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
