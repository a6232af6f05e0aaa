//! `net`: each version is kept in a weight store and generators anywhere pull it as a stream of
//! checksummed chunks, swapping to it once it is whole. The store is the trainer's: served on the
//! trainer actor's own address when the trainer has its own process, else by this process on
//! `sync.listen` (loopback by default). A generator that restarts is sent the current reference
//! and pulls that version again.

use rlrun_generator::WeightUpdate;
use rlrun_trainer::TrainerActor;
use rlrun_weights_sync::net::{StoreServer, WeightStore};

use super::{Published, SyncBackend, WeightSync};
use crate::error::{Error, Result};

pub struct NetSync {
    /// The store this process serves for a trainer in this process (`None`: the trainer's
    /// process serves its own).
    local: Option<(WeightStore, StoreServer)>,
    adapters: bool,
}

impl NetSync {
    /// For a trainer in another process: it keeps the versions, generators pull from it.
    pub fn remote() -> Self {
        NetSync {
            local: None,
            adapters: false,
        }
    }

    /// For a trainer in this process: a store served on `listen` (a token is required beyond
    /// loopback); `adapters`: the trainer trains LoRA adapters, and only they move.
    pub fn serve(listen: &str, token: Option<String>, adapters: bool) -> Result<Self> {
        let store = WeightStore::new();
        let server = StoreServer::start(&store, listen, token)
            .map_err(|e| Error::Usage(format!("sync.listen: {e}")))?;
        tracing::info!("weight store (net sync) serving on {}", server.addr());
        Ok(NetSync {
            local: Some((store, server)),
            adapters,
        })
    }
}

impl WeightSync for NetSync {
    fn backend(&self) -> SyncBackend {
        SyncBackend::Net
    }

    fn publish(&mut self, trainer: &dyn TrainerActor) -> Result<Published> {
        let (r, report) = match &self.local {
            Some((store, server)) => {
                let (version, flat) = trainer.sync_weights()?;
                let (mut r, report) = store.publish(version, &flat)?;
                r.adapters = self.adapters;
                r.source = Some(server.addr().to_string());
                (r, report)
            }
            None => trainer.publish_net()?,
        };
        Ok(Published {
            version: r.version,
            bytes: report.bytes,
            seconds: report.seconds,
            update: WeightUpdate::Shared(r),
        })
    }
}
