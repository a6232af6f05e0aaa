//! Data parallelism across trainer processes: each rank back-propagates its share of every
//! mini-batch's micro-batches (balanced by tokens) with the loss normalised over the whole
//! mini-batch, then the ranks sum their gradients ([`Collective::all_reduce_sum`]) and take the
//! same optimizer step, so a run at world size N computes what world size 1 does (up to the order
//! of floating-point sums).
//!
//! The group is `rlrun_weights_sync::group`: rank 0 listens at the rendezvous address, the others
//! connect; on CPU a sum goes through rank 0 over TCP in buckets, added in rank order so every rank
//! gets bitwise the same result; on CUDA the gradients go through NCCL (its id handed over the
//! same connections), the TCP connections carrying the metrics. Every wait has a timeout and fails
//! naming the peer instead of hanging.

use std::time::Duration;

use rlrun_weights_sync::group::Group;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::{Result, TrainError};

/// This trainer's place in a data-parallel group (`TrainerConfig::data_parallel`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataParallel {
    pub rank: usize,
    pub world: usize,
    /// Where rank 0 listens for the others (host:port).
    pub rendezvous: String,
}

/// How long any wait for a peer may take (joining, or one bucket).
const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// A connected data-parallel group.
pub struct Collective(Group);

fn err(e: rlrun_weights_sync::SyncError) -> TrainError {
    TrainError::Invalid(format!("data parallel: {e}"))
}

impl Collective {
    /// Joins the group of `dp` (rank 0 accepts the others; the others retry until rank 0 listens)
    /// within `PEER_TIMEOUT`; on a CUDA `device` the gradient sums go through NCCL.
    pub fn join(dp: &DataParallel, device: Device) -> Result<Self> {
        let mut g = Group::join(dp.rank, dp.world, &dp.rendezvous, PEER_TIMEOUT).map_err(err)?;
        g.settle_transport(device).map_err(err)?;
        Ok(Collective(g))
    }

    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    pub fn world(&self) -> usize {
        self.0.world()
    }

    /// Sums `t` (a contiguous f32 tensor) over the ranks, in place; every rank gets the same bits.
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let _g = tch::no_grad_guard();
        self.0.all_reduce_sum(t).map_err(err)
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    pub fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.0.all_gather(bytes).map_err(err)
    }
}

/// The micro-batches (by index into `micro_tokens`) rank `rank` of `world` takes: each goes to
/// the rank with the fewest tokens so far (ties: the lower rank), in order.
pub fn share(micro_tokens: &[usize], rank: usize, world: usize) -> Vec<usize> {
    let mut load = vec![0usize; world.max(1)];
    let mut mine = Vec::new();
    for (i, &t) in micro_tokens.iter().enumerate() {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += t;
        if r == rank {
            mine.push(i);
        }
    }
    mine
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_balance_tokens_and_cover_every_micro_batch_once() {
        let tokens = [100, 10, 10, 10, 90, 5];
        let a = share(&tokens, 0, 2);
        let b = share(&tokens, 1, 2);
        assert_eq!(a, vec![0, 5]);
        assert_eq!(b, vec![1, 2, 3, 4]);
        assert_eq!(share(&tokens, 0, 1), (0..6).collect::<Vec<_>>());
    }
}
