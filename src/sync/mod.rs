//! Weight sync: how the trainer's weights reach the generators, behind one trait.
//!
//! A sync is two halves: [`WeightSync::publish`] takes the trainer's current weights as a new
//! version (a flat buffer in this process, a file in shared memory, a weight store's version),
//! and [`WeightSync::apply`] makes a generator serve it (mapping, pulling, or receiving the
//! trainer's broadcast). Both halves report what
//! they moved; [`sync`] runs them and returns one [`SyncOutcome`] with bytes, seconds and GB/s.
//!
//! The backend is chosen once, from the recipe's `sync.backend` and the placement
//! ([`SyncBackend::resolve`]); [`build`] makes it. Adding a backend is one module here and one
//! value of [`SyncBackend`].

mod in_process;
mod nccl;
mod net;
mod shm;

use std::collections::BTreeMap;
use std::time::Instant;

use rlrun_generator::{GeneratorActor, WeightUpdate};
use rlrun_trainer::TrainerActor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use in_process::InProcessSync;
pub use nccl::NcclSync;
pub use net::NetSync;
pub use shm::ShmSync;

/// `sync.backend` in a recipe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncBackend {
    /// `in-process` when trainer and generator share this process, else `shm`.
    #[default]
    Auto,
    /// The generator copies the trainer's flat buffer (one process).
    InProcess,
    /// Written once into a `/dev/shm` file, mapped zero-copy by each generator (one machine).
    Shm,
    /// Kept by the trainer's weight store, pulled by each generator as a gRPC stream of
    /// checksummed chunks (any machine).
    Net,
    /// Broadcast by the trainer to its generators as one group: NCCL on CUDA, the group's TCP
    /// connections on CPU; kept in the weight store too, for generators outside the group.
    Nccl,
}

impl SyncBackend {
    /// The concrete backend for a placement (`Auto` resolved; never returns `Auto`).
    pub fn resolve(self, actors_share_process: bool) -> SyncBackend {
        match self {
            SyncBackend::Auto if actors_share_process => SyncBackend::InProcess,
            SyncBackend::Auto => SyncBackend::Shm,
            b => b,
        }
    }

    /// The recipe name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncBackend::Auto => "auto",
            SyncBackend::InProcess => "in-process",
            SyncBackend::Shm => "shm",
            SyncBackend::Net => "net",
            SyncBackend::Nccl => "nccl",
        }
    }
}

/// A published version, ready to be applied to generators.
pub struct Published {
    pub version: u64,
    /// Bytes the publish moved (the flat buffer's size).
    pub bytes: u64,
    /// Seconds the publish took (in the trainer, wherever it runs).
    pub seconds: f64,
    /// What the generator receives.
    pub update: WeightUpdate,
}

/// Moves the trainer's weights to the generators.
pub trait WeightSync: Send + Sync {
    /// Which backend this is (for metrics and logs).
    fn backend(&self) -> SyncBackend;
    /// Takes the trainer's current weights as a new version.
    fn publish(&mut self, trainer: &dyn TrainerActor) -> Result<Published>;
    /// Makes `generator` (one actor or a pool) serve `published`; returns once it does.
    fn apply(
        &mut self,
        _trainer: &dyn TrainerActor,
        generator: &dyn GeneratorActor,
        published: Published,
    ) -> Result<()> {
        generator.update_weights(published.version, published.update)?;
        Ok(())
    }
}

/// What one sync did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncOutcome {
    pub backend: SyncBackend,
    pub version: u64,
    pub bytes: u64,
    pub publish_s: f64,
    pub apply_s: f64,
    /// Wall time of the whole sync.
    pub seconds: f64,
}

impl SyncOutcome {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-9) / 1e9
    }

    /// `sync/*` metrics (and `time/sync_s`).
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        m.insert("sync/bytes".into(), self.bytes as f64);
        m.insert("sync/seconds".into(), self.seconds);
        m.insert("sync/gb_per_s".into(), self.gb_per_s());
        m.insert("sync/publish_s".into(), self.publish_s);
        m.insert("sync/update_s".into(), self.apply_s);
        m.insert(
            "sync/backend_shm".into(),
            f64::from(u8::from(self.backend == SyncBackend::Shm)),
        );
        m.insert(
            "sync/backend_net".into(),
            f64::from(u8::from(self.backend == SyncBackend::Net)),
        );
        m.insert(
            "sync/backend_nccl".into(),
            f64::from(u8::from(self.backend == SyncBackend::Nccl)),
        );
        m.insert("time/sync_s".into(), self.seconds);
        m
    }
}

/// Publishes the trainer's weights and applies them to `generator`.
pub fn sync(
    backend: &mut dyn WeightSync,
    trainer: &dyn TrainerActor,
    generator: &dyn GeneratorActor,
) -> Result<SyncOutcome> {
    let t = Instant::now();
    let published = backend.publish(trainer)?;
    let (version, bytes, publish_s) = (published.version, published.bytes, published.seconds);
    let t_apply = Instant::now();
    if let Err(e) = backend.apply(trainer, generator, published) {
        // A generator that could not take the version may have lost its source (`net` pulls
        // from the trainer's process): when the trainer is gone, that is the error to report.
        trainer.version()?;
        return Err(e);
    }
    Ok(SyncOutcome {
        backend: backend.backend(),
        version,
        bytes,
        publish_s,
        apply_s: t_apply.elapsed().as_secs_f64(),
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// What a backend needs to know besides its kind.
#[derive(Debug, Clone, Default)]
pub struct SyncOptions {
    /// Per-tensor checksums verified by the receiver, where the backend has them.
    pub checksums: bool,
    /// The trainer trains LoRA adapters, and only they move.
    pub adapters: bool,
    /// `net` with the trainer in this process: serve its weight store on this address (with
    /// `token`); `None`: the trainer's own process serves it.
    pub serve_store: Option<String>,
    pub token: Option<String>,
    /// Generator processes (`nccl`: the group's size less the trainer).
    pub generators: usize,
    /// `nccl` with the trainer in this process: the host its group listens on.
    pub group_host: String,
}

/// Makes the backend `backend` (already resolved) for a run.
pub fn build(backend: SyncBackend, o: &SyncOptions) -> Result<Box<dyn WeightSync>> {
    Ok(match backend {
        SyncBackend::InProcess => Box::new(InProcessSync {
            adapters: o.adapters,
        }),
        SyncBackend::Shm => Box::new(ShmSync::new(o.checksums)),
        SyncBackend::Net => Box::new(net_sync(o)?),
        SyncBackend::Nccl => Box::new(NcclSync::new(
            net_sync(o)?,
            o.generators,
            o.group_host.clone(),
        )?),
        SyncBackend::Auto => {
            return Err(Error::Usage(
                "sync backend `auto` must be resolved against the placement first".into(),
            ))
        }
    })
}

fn net_sync(o: &SyncOptions) -> Result<NetSync> {
    Ok(match &o.serve_store {
        Some(listen) => NetSync::serve(listen, o.token.clone(), o.adapters)?,
        None => NetSync::remote(),
    })
}
