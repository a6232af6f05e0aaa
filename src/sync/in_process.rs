//! `in-process`: trainer and generator share this process; the generator copies the trainer's
//! flat buffer (one copy, no serialization).

use std::time::Instant;

use rlrun_generator::WeightUpdate;
use rlrun_trainer::TrainerActor;

use super::{Published, SyncBackend, WeightSync};
use crate::error::Result;

/// `adapters`: the trainer trains LoRA adapters, and the buffer it hands out is theirs.
pub struct InProcessSync {
    pub adapters: bool,
}

impl WeightSync for InProcessSync {
    fn backend(&self) -> SyncBackend {
        SyncBackend::InProcess
    }

    fn publish(&mut self, trainer: &dyn TrainerActor) -> Result<Published> {
        let t = Instant::now();
        let (version, flat) = trainer.sync_weights()?;
        let bytes = flat.numel() as u64 * flat.kind().elt_size_in_bytes() as u64;
        Ok(Published {
            version,
            bytes,
            seconds: t.elapsed().as_secs_f64(),
            update: if self.adapters {
                WeightUpdate::Adapters(flat)
            } else {
                WeightUpdate::Flat(flat)
            },
        })
    }
}
