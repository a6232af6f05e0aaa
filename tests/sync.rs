//! The `WeightSync` trait: each built-in backend moves the trainer's weights into a generator and
//! reports the same figures, and a backend written outside the crate plugs in the same way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rlrun::sync::{self, InProcessSync, Published, SyncBackend, WeightSync};
use rlrun_generator::{EngineConfig, GeneratorActor};
use rlrun_model::{Kind, ModelFiles};
use rlrun_trainer::{TrainerActor, TrainerConfig};
use tch::Device;

fn actors() -> (
    rlrun_trainer::LocalTrainer,
    rlrun_generator::LocalGenerator,
    u64,
) {
    let files = ModelFiles::open(&rlrun_testkit::fixtures().join("tiny-qwen2")).unwrap();
    let trainer = rlrun::actors::build_trainer(
        &files,
        Kind::Float,
        Device::Cpu,
        TrainerConfig::default(),
        false,
    )
    .unwrap();
    let tokenizer = Arc::new(files.tokenizer.clone());
    let generator = rlrun::actors::build_generator(
        &files,
        tokenizer,
        Kind::Float,
        Device::Cpu,
        EngineConfig::default(),
    )
    .unwrap();
    let bytes = files.layout().numel() as u64 * 4;
    (trainer, generator, bytes)
}

#[test]
fn every_backend_moves_the_weights_and_reports_them() {
    for backend in [SyncBackend::InProcess, SyncBackend::Shm] {
        let (trainer, generator, bytes) = actors();
        let mut s = sync::build(backend, true).unwrap();
        assert_eq!(s.backend(), backend);
        let out = sync::sync(s.as_mut(), &trainer, &generator).unwrap();
        assert_eq!(out.backend, backend);
        assert_eq!(out.version, trainer.version().unwrap());
        assert_eq!(generator.stats().unwrap().policy_version, out.version);
        assert_eq!(out.bytes, bytes, "{backend:?}");
        assert!(out.seconds > 0.0 && out.gb_per_s() > 0.0);
        let m = out.metrics();
        for k in ["sync/bytes", "sync/seconds", "sync/gb_per_s", "time/sync_s"] {
            assert!(m.contains_key(k), "{k} missing for {backend:?}");
        }
        assert_eq!(
            m["sync/backend_shm"],
            f64::from(u8::from(backend == SyncBackend::Shm))
        );
    }
}

#[test]
fn auto_resolves_by_placement() {
    assert_eq!(SyncBackend::Auto.resolve(true), SyncBackend::InProcess);
    assert_eq!(SyncBackend::Auto.resolve(false), SyncBackend::Shm);
    assert_eq!(SyncBackend::Shm.resolve(true), SyncBackend::Shm);
    assert!(sync::build(SyncBackend::Auto, false).is_err());
}

/// A backend from user code: in-process, counting its publishes and applies.
struct Counting {
    inner: InProcessSync,
    publishes: Arc<AtomicUsize>,
    applies: Arc<AtomicUsize>,
}

impl WeightSync for Counting {
    fn backend(&self) -> SyncBackend {
        self.inner.backend()
    }
    fn publish(&mut self, trainer: &dyn TrainerActor) -> rlrun::Result<Published> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        self.inner.publish(trainer)
    }
    fn apply(&self, generator: &dyn GeneratorActor, p: Published) -> rlrun::Result<()> {
        self.applies.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(generator, p)
    }
}

#[test]
fn a_backend_written_outside_the_crate_plugs_in() {
    let (trainer, generator, bytes) = actors();
    let (publishes, applies) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut s = Counting {
        inner: InProcessSync,
        publishes: publishes.clone(),
        applies: applies.clone(),
    };
    for _ in 0..2 {
        let out = sync::sync(&mut s, &trainer, &generator).unwrap();
        assert_eq!(out.bytes, bytes);
    }
    assert_eq!(publishes.load(Ordering::SeqCst), 2);
    assert_eq!(applies.load(Ordering::SeqCst), 2);
}
