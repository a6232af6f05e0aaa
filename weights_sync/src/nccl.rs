//! NCCL through cudarc (loaded at run time, so the same binary runs without a GPU): a
//! communicator, and bucketed broadcast and sum of a CUDA tensor on torch's default stream (tch has
//! no stream API; NCCL on the default stream needs no extra synchronisation). Every wait has a
//! timeout: a collective that does not finish aborts the communicator with an error naming the
//! group instead of hanging.
//!
//! Finding the library: cudarc looks for `libnccl.so` (and versioned names up to `.so.13`), while
//! torch ships `nvidia/nccl/lib/libnccl.so.2` beside its own `torch/lib`. [`load`] finds torch's
//! copy from this process's mapped libtorch and links it as `torch/lib/libnccl.so`, a directory
//! the binary's run path (and the GPU machines' `LD_LIBRARY_PATH`) already names.
//!
//! Verified here: loading and the version on a CPU machine. A communicator and collectives run
//! only on a GPU (world size 1 in `rlrun selftest`); several GPUs have never been available.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use crate::{Result, SyncError};

fn err(m: impl Into<String>) -> SyncError {
    SyncError::Net {
        addr: "nccl".into(),
        message: m.into(),
    }
}

/// The directory of the libtorch this process has mapped (`.../site-packages/torch/lib`).
fn torch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so") || p.ends_with("/libc10.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

/// Loads NCCL (linking torch's copy where cudarc looks, if needed); returns its version code
/// (e.g. 22805 for 2.28.5).
pub fn load() -> Result<i32> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        let dir = torch_lib_dir().ok_or_else(|| err("libtorch is not mapped in this process"))?;
        let theirs = dir.join("../../nvidia/nccl/lib/libnccl.so.2");
        if !theirs.exists() {
            return Err(err(format!(
                "no libnccl.so on the library path and none beside torch ({})",
                theirs.display()
            )));
        }
        let link = dir.join("libnccl.so");
        if !link.exists() {
            std::os::unix::fs::symlink(&theirs, &link).map_err(|e| {
                err(format!(
                    "linking torch's NCCL where it is looked for: ln -s {} {}: {e}",
                    theirs.display(),
                    link.display()
                ))
            })?;
        }
        // SAFETY: as above.
        if !unsafe { sys::is_culib_present() } {
            return Err(err(format!(
                "{} exists but is not found: put {} on LD_LIBRARY_PATH",
                link.display(),
                dir.display()
            )));
        }
    }
    result::get_nccl_version().map_err(|e| err(format!("ncclGetVersion: {e:?}")))
}

/// A group's id (made by one rank, handed to the others, e.g. over gRPC).
pub fn unique_id() -> Result<Vec<u8>> {
    load()?;
    let id = result::get_uniqueid().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn nccl_type(k: Kind) -> Result<sys::ncclDataType_t> {
    Ok(match k {
        Kind::Float => sys::ncclDataType_t::ncclFloat32,
        Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
        Kind::Half => sys::ncclDataType_t::ncclFloat16,
        other => return Err(err(format!("no NCCL type for {other:?}"))),
    })
}

/// One rank's communicator.
pub struct Comm {
    comm: sys::ncclComm_t,
    pub rank: usize,
    pub world: usize,
    device: Device,
    timeout: Duration,
}

// SAFETY: the communicator is used by one thread at a time (&mut or owned calls only).
unsafe impl Send for Comm {}

impl Comm {
    /// Joins group `id` as `rank` of `world` on `device` (non-blocking init, polled until
    /// `timeout`).
    pub fn init(
        id: &[u8],
        world: usize,
        rank: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        load()?;
        let Device::Cuda(ordinal) = device else {
            return Err(err("NCCL needs a CUDA device"));
        };
        let mut uid = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != uid.internal.len() {
            return Err(err(format!("a unique id has 128 bytes, got {}", id.len())));
        }
        for (d, &s) in uid.internal.iter_mut().zip(id) {
            *d = s as _;
        }
        // Make the device current for this thread (NCCL binds the communicator to it).
        let _ = Tensor::f_zeros([1], (Kind::Float, device)).map_err(SyncError::Torch)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is a valid 128-byte id.
        unsafe { result::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }.map_err(
            |e| {
                err(format!(
                    "ncclCommInitRank (rank {rank} of {world}, cuda:{ordinal}): {e:?}"
                ))
            },
        )?;
        Ok(Comm {
            comm,
            rank,
            world,
            device,
            timeout,
        })
    }

    /// Waits for the collectives queued on the default stream, aborting after the timeout.
    fn wait(&self, what: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if state != sys::ncclResult_t::ncclSuccess && state != sys::ncclResult_t::ncclInProgress
            {
                return Err(err(format!("{what}: NCCL reported {state:?}")));
            }
            // SAFETY: querying the legacy default stream.
            let done = unsafe { cudarc::runtime::sys::cudaStreamQuery(std::ptr::null_mut()) };
            if done == cudarc::runtime::sys::cudaError::cudaSuccess {
                return Ok(());
            }
            if Instant::now() > deadline {
                // SAFETY: aborting a live communicator; it is not used again (its Drop skips it).
                unsafe {
                    let _ = result::comm_abort(self.comm);
                }
                return Err(err(format!(
                    "{what} did not finish within {:?} (rank {} of {}): communicator aborted; a peer is gone or stuck",
                    self.timeout, self.rank, self.world
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn check(&self, t: &Tensor) -> Result<(usize, sys::ncclDataType_t)> {
        if t.device() != self.device || !t.is_contiguous() {
            return Err(err(format!(
                "a contiguous tensor on {:?} is needed, got {:?}",
                self.device,
                t.device()
            )));
        }
        Ok((t.kind().elt_size_in_bytes(), nccl_type(t.kind())?))
    }

    /// Runs the in-place collective `op(pointer, count, type)` over `t` in buckets of
    /// `bucket_bytes`, then waits for them all.
    fn in_buckets(
        &self,
        what: &str,
        t: &Tensor,
        bucket_bytes: usize,
        op: impl Fn(*mut std::ffi::c_void, usize, sys::ncclDataType_t) -> Result<()>,
    ) -> Result<()> {
        let (elt, ty) = self.check(t)?;
        let n = t.numel();
        let per = (bucket_bytes / elt).max(1);
        let base = t.data_ptr() as *mut u8;
        for start in (0..n).step_by(per) {
            // SAFETY: a bucket inside `t`'s device memory.
            let p = unsafe { base.add(start * elt) } as *mut std::ffi::c_void;
            op(p, per.min(n - start), ty)?;
        }
        self.wait(what)
    }

    /// Broadcasts `t` from `root` to every rank in buckets of `bucket_bytes`.
    pub fn broadcast(&self, t: &Tensor, root: usize, bucket_bytes: usize) -> Result<()> {
        self.in_buckets("broadcast", t, bucket_bytes, |p, count, ty| {
            // SAFETY: in place on a bucket of a live device tensor, on the default stream.
            unsafe {
                result::broadcast(
                    p,
                    p,
                    count,
                    ty,
                    root as i32,
                    self.comm,
                    std::ptr::null_mut(),
                )
            }
            .map(|_| ())
            .map_err(|e| err(format!("ncclBroadcast: {e:?}")))
        })
    }

    /// Sums `t` over the ranks, in place, in buckets of `bucket_bytes`.
    pub fn all_reduce_sum(&self, t: &Tensor, bucket_bytes: usize) -> Result<()> {
        self.in_buckets("all-reduce", t, bucket_bytes, |p, count, ty| {
            let sum = sys::ncclRedOp_t::ncclSum;
            // SAFETY: in place on a bucket of a live device tensor, on the default stream.
            unsafe { result::all_reduce(p, p, count, ty, sum, self.comm, std::ptr::null_mut()) }
                .map(|_| ())
                .map_err(|e| err(format!("ncclAllReduce: {e:?}")))
        })
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: a communicator this value owns.
        unsafe {
            let _ = result::comm_destroy(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_s_nccl_loads_on_a_machine_without_a_gpu() {
        // libtorch is mapped once a tensor exists.
        let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let v = load().unwrap();
        // torch 2.11 ships NCCL 2.28 (cudarc's nccl-02028 bindings).
        assert!((22800..22900).contains(&v), "NCCL version code {v}");
    }
}
