//! The Trainer actor interface the controller uses, and its in-process implementation.

use std::path::Path;
use std::sync::Mutex;

use rlrun_weights_sync::group::BroadcastHost;
use rlrun_weights_sync::net::WeightStore;
use rlrun_weights_sync::shm::WeightsRef;
use rlrun_weights_sync::SyncReport;
use tch::Tensor;

use crate::batch::{TrainBatch, TrainSequence};
use crate::error::{Result, TrainError};
use crate::trainer::{SeqValues, StepMetrics, Trainer};

/// What the controller needs from a trainer, wherever it runs.
pub trait TrainerActor: Send + Sync {
    /// One update on a rollout batch.
    fn train_step(&self, batch: TrainBatch) -> Result<StepMetrics>;
    /// Log-probs of response tokens under the current policy.
    fn compute_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues>;
    /// Log-probs under the frozen reference model.
    fn compute_ref_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues>;
    /// Critic values per response token.
    fn compute_values(&self, seqs: &[TrainSequence]) -> Result<SeqValues>;
    /// The policy's flat weight buffer (compute dtype) and its version, for generators in this
    /// process (a trainer in another process returns an error: use `publish_weights`).
    fn sync_weights(&self) -> Result<(u64, Tensor)>;
    /// Writes the policy's weights (compute dtype) into the shared-memory file `path` for
    /// generators in other processes; per-tensor checksums when `checksums`.
    fn publish_weights(&self, path: &Path, checksums: bool) -> Result<(WeightsRef, SyncReport)>;
    /// Keeps the policy's weights (compute dtype) in the trainer's weight store for generators
    /// to pull over the network (`net` sync); the reference names the store's address.
    fn publish_net(&self) -> Result<(WeightsRef, SyncReport)>;
    /// `nccl` sync: opens a sync group of `world` ranks for `epoch` with this trainer as rank 0,
    /// listening on `host` when the trainer is in this process (a trainer in another process
    /// listens on the host it is reached at); returns the address the generators join.
    fn open_group(&self, world: usize, epoch: u64, host: &str) -> Result<String>;
    /// Sends version `version` (the current one) to the group of `epoch`, whose generators
    /// receive at the same time (the first send waits for them to join).
    fn broadcast_weights(&self, epoch: u64, version: u64) -> Result<SyncReport>;
    fn version(&self) -> Result<u64>;
    /// Writes the trainer's state (weights, optimizer, counters) into an existing directory.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Restores what `save` wrote.
    fn load(&self, dir: &Path) -> Result<()>;
}

/// A trainer in this process.
pub struct LocalTrainer {
    inner: Mutex<Trainer>,
    /// `net` sync: the weight store the caller serves (see [`LocalTrainer::attach_store`]).
    store: Mutex<Option<WeightStore>>,
    /// `nccl` sync: the group this trainer broadcasts to (rank 0).
    group: Mutex<Option<BroadcastHost>>,
}

impl LocalTrainer {
    pub fn new(trainer: Trainer) -> Self {
        LocalTrainer {
            inner: Mutex::new(trainer),
            store: Mutex::new(None),
            group: Mutex::new(None),
        }
    }

    /// Publishes `net` versions into `store`, which the caller serves (an actor process serves
    /// it beside the trainer's service, on the same address).
    pub fn attach_store(&self, store: WeightStore) {
        if let Ok(mut s) = self.store.lock() {
            *s = Some(store);
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Trainer>> {
        self.inner
            .lock()
            .map_err(|_| TrainError::Invalid("the trainer panicked in an earlier call".into()))
    }
}

/// Runs `f`, a panic inside it turned into an error. tch panics instead of returning an error
/// when an op that takes a scalar fails (out of memory, say): it frees the scalar, which reads
/// the op's pending error, before the op's own check. Caught here, under the trainer's lock, the
/// failure is reported as torch's error and the lock is not poisoned.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let m = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        Err(TrainError::Invalid(format!(
            "libtorch (through a panic): {m}"
        )))
    })
}

impl TrainerActor for LocalTrainer {
    fn train_step(&self, batch: TrainBatch) -> Result<StepMetrics> {
        let mut t = self.lock()?;
        guarded(|| t.train_step(&batch))
    }
    fn compute_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        let t = self.lock()?;
        guarded(|| t.compute_logprobs(seqs))
    }
    fn compute_ref_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        let t = self.lock()?;
        guarded(|| t.compute_ref_logprobs(seqs))
    }
    fn compute_values(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        let t = self.lock()?;
        guarded(|| t.compute_values(seqs))
    }
    fn sync_weights(&self) -> Result<(u64, Tensor)> {
        let t = self.lock()?;
        Ok((t.version(), t.sync_buffer()?))
    }
    fn publish_weights(&self, path: &Path, checksums: bool) -> Result<(WeightsRef, SyncReport)> {
        let t = self.lock()?;
        let flat = t.sync_buffer()?;
        let ranges: Vec<(i64, i64)> = t
            .weights()
            .layout
            .params()
            .iter()
            .map(|p| (p.offset, p.numel))
            .collect();
        let (mut r, report) = rlrun_weights_sync::shm::write_to(
            path,
            t.version(),
            &flat,
            checksums.then_some(ranges.as_slice()),
        )
        .map_err(|e| TrainError::Invalid(format!("publishing weights: {e}")))?;
        r.adapters = t.lora().is_some();
        Ok((r, report))
    }
    fn publish_net(&self) -> Result<(WeightsRef, SyncReport)> {
        let store = self
            .store
            .lock()
            .map_err(|_| TrainError::Invalid("the weight store lock is poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                TrainError::Invalid(
                    "no weight store is served beside this trainer: a trainer in the controller's process publishes through the `net` backend's own store".into(),
                )
            })?;
        let t = self.lock()?;
        let (mut r, report) = store.publish(t.version(), &t.sync_buffer()?).map_err(|e| {
            TrainError::Invalid(format!("publishing weights to the weight store: {e}"))
        })?;
        r.adapters = t.lora().is_some();
        Ok((r, report))
    }
    fn open_group(&self, world: usize, epoch: u64, host: &str) -> Result<String> {
        let h = BroadcastHost::open(host, world, epoch)
            .map_err(|e| TrainError::Invalid(format!("opening the sync group: {e}")))?;
        let addr = h.addr().to_string();
        *self
            .group
            .lock()
            .map_err(|_| TrainError::Invalid("the sync group lock is poisoned".into()))? = Some(h);
        Ok(addr)
    }
    fn broadcast_weights(&self, epoch: u64, version: u64) -> Result<SyncReport> {
        let mut g = self
            .group
            .lock()
            .map_err(|_| TrainError::Invalid("the sync group lock is poisoned".into()))?;
        let host = g.as_mut().filter(|h| h.epoch() == epoch).ok_or_else(|| {
            TrainError::Invalid(format!("no sync group of epoch {epoch} is open"))
        })?;
        let t = self.lock()?;
        if t.version() != version {
            return Err(TrainError::Invalid(format!(
                "version {version} was to be broadcast, the trainer is at {}",
                t.version()
            )));
        }
        host.send(version, &t.sync_buffer()?)
            .map_err(|e| TrainError::Invalid(format!("broadcasting version {version}: {e}")))
    }
    fn version(&self) -> Result<u64> {
        Ok(self.lock()?.version())
    }
    fn save(&self, dir: &Path) -> Result<()> {
        self.lock()?.save(dir)
    }
    fn load(&self, dir: &Path) -> Result<()> {
        self.lock()?.load(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_a_call_is_an_error() {
        let e = guarded::<()>(|| panic!("DefaultCPUAllocator: can't allocate memory")).unwrap_err();
        assert!(e.to_string().contains("can't allocate memory"), "{e}");
        assert_eq!(guarded(|| Ok(3)).unwrap(), 3);
    }
}
