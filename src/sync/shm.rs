//! `shm`: the trainer (in this process or its own) writes each version into one of two
//! alternating `/dev/shm` files; generators in other processes map it zero-copy. Files left by
//! runs that died are removed when a run starts; this run's are removed when it ends.

use std::path::PathBuf;

use rlrun_generator::WeightUpdate;
use rlrun_trainer::TrainerActor;
use rlrun_weights_sync::shm as wshm;

use super::{Published, SyncBackend, WeightSync};
use crate::error::Result;

pub struct ShmSync {
    files: [PathBuf; 2],
    next: usize,
    checksums: bool,
}

impl ShmSync {
    pub fn new(checksums: bool) -> Self {
        let dir = wshm::default_dir();
        let n = wshm::remove_orphans(&dir);
        if n > 0 {
            tracing::info!("removed {n} shared-memory file(s) left by runs that are gone");
        }
        let prefix = format!("rlrun-{}-{}", std::process::id(), crate::util::timestamp());
        ShmSync {
            files: [0, 1].map(|i| dir.join(format!("{prefix}-{i}"))),
            next: 0,
            checksums,
        }
    }
}

impl WeightSync for ShmSync {
    fn backend(&self) -> SyncBackend {
        SyncBackend::Shm
    }

    fn publish(&mut self, trainer: &dyn TrainerActor) -> Result<Published> {
        // Double-buffered: a generator still mapping the last version keeps a valid file.
        let path = self.files[self.next].clone();
        self.next = 1 - self.next;
        let (r, report) = trainer.publish_weights(&path, self.checksums)?;
        Ok(Published {
            version: r.version,
            bytes: report.bytes,
            seconds: report.seconds,
            update: WeightUpdate::Shared(r),
        })
    }
}

impl Drop for ShmSync {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}
