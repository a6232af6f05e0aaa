//! `nccl`: the trainer broadcasts each version to its generators as one group (the trainer is
//! rank 0 of generators plus one): through NCCL when the trainer's weights are on CUDA, over the
//! group's TCP connections on CPU (how the tests run it). The trainer makes the group and the
//! controller hands its address (and, inside the group, the NCCL id) to every generator in the
//! weight update; every wait has a timeout. Each version is also kept in the trainer's weight
//! store (`net`): a sync whose broadcast fails (a generator died or restarted: the group no longer
//! matches) falls back to every generator pulling it from there, and the next sync builds a new
//! group.

use rlrun_generator::{GeneratorActor, WeightUpdate};
use rlrun_trainer::TrainerActor;
use rlrun_weights_sync::group::GroupRef;

use super::{NetSync, Published, SyncBackend, WeightSync};
use crate::error::{Error, Result};

pub struct NcclSync {
    /// Keeps each version for generators outside the group, and the fallback.
    net: NetSync,
    /// Generators in the group (world - 1).
    generators: usize,
    /// Where a trainer in this process listens for the group.
    host: String,
    /// The open group's epoch and address (`None`: open a new one at the next sync).
    group: Option<(u64, String)>,
    epochs: u64,
    /// The last sync went over `net` instead.
    fell_back: bool,
}

impl NcclSync {
    pub fn new(net: NetSync, generators: usize, host: String) -> Result<Self> {
        if generators == 0 {
            return Err(Error::Usage(
                "sync.backend = \"nccl\" broadcasts to generator processes: place the generators in processes (placement.generator_processes, generator_addresses or a cluster)".into(),
            ));
        }
        Ok(NcclSync {
            net,
            generators,
            host,
            group: None,
            epochs: 0,
            fell_back: false,
        })
    }

    /// Broadcasts `published` in the group (opening one first when there is none).
    fn broadcast(
        &mut self,
        trainer: &dyn TrainerActor,
        generator: &dyn GeneratorActor,
        published: &Published,
    ) -> Result<()> {
        let WeightUpdate::Shared(r) = &published.update else {
            unreachable!("the net backend publishes references");
        };
        let world = self.generators + 1;
        if self.group.is_none() {
            self.epochs += 1;
            let addr = trainer.open_group(world, self.epochs, &self.host)?;
            self.group = Some((self.epochs, addr));
        }
        let (epoch, addr) = self.group.clone().expect("opened above");
        let mut r = r.clone();
        r.group = Some(GroupRef {
            addr,
            world,
            epoch,
            rank: 1, // a pool sets each member's
        });
        let version = published.version;
        let (sent, received) = std::thread::scope(|s| {
            let sent = s.spawn(|| trainer.broadcast_weights(epoch, version));
            let received = generator.update_weights(version, WeightUpdate::Shared(r));
            (sent.join(), received)
        });
        received?;
        sent.map_err(|_| Error::Usage("the broadcast panicked".into()))??;
        Ok(())
    }
}

impl WeightSync for NcclSync {
    fn backend(&self) -> SyncBackend {
        if self.fell_back {
            SyncBackend::Net
        } else {
            SyncBackend::Nccl
        }
    }

    fn publish(&mut self, trainer: &dyn TrainerActor) -> Result<Published> {
        self.net.publish(trainer)
    }

    fn apply(
        &mut self,
        trainer: &dyn TrainerActor,
        generator: &dyn GeneratorActor,
        published: Published,
    ) -> Result<()> {
        match self.broadcast(trainer, generator, &published) {
            Ok(()) => {
                self.fell_back = false;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(
                    "nccl sync of version {}: {e:#}; the generators pull it over the network, and the next sync builds a new group",
                    published.version
                );
                self.group = None;
                self.fell_back = true;
                generator.update_weights(published.version, published.update)?;
                Ok(())
            }
        }
    }
}
