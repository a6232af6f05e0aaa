//! The `WeightSync` trait: each built-in backend moves the trainer's weights into a generator and
//! reports the same figures, and a backend written outside the crate plugs in the same way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rlrun::sync::{self, InProcessSync, Published, SyncBackend, SyncOptions, WeightSync};
use rlrun_generator::{EngineConfig, GeneratorActor};
use rlrun_generator::{Request, SamplingParams};
use rlrun_model::{Kind, LoraConfig, ModelFiles, Weights};
use rlrun_trainer::{OptimConfig, TrainBatch, TrainSequence, TrainerActor, TrainerConfig};
use tch::Device;

fn actors() -> (
    rlrun_trainer::LocalTrainer,
    rlrun_generator::LocalGenerator,
    u64,
) {
    let (t, g, _) = actors_with(None);
    let files = ModelFiles::open(&rlrun_testkit::fixtures().join("tiny-qwen2")).unwrap();
    (t, g, files.layout().numel() as u64 * 4)
}

/// A trainer and a generator of tiny-qwen2 in this process (training LoRA adapters when `lora`,
/// sharing one base), and the model files.
fn actors_with(
    lora: Option<LoraConfig>,
) -> (
    rlrun_trainer::LocalTrainer,
    rlrun_generator::LocalGenerator,
    ModelFiles,
) {
    let files = ModelFiles::open(&rlrun_testkit::fixtures().join("tiny-qwen2")).unwrap();
    let base = lora
        .as_ref()
        .map(|_| files.load_weights(Kind::Float, Device::Cpu).unwrap());
    let trainer = rlrun::actors::build_trainer(
        &files,
        Kind::Float,
        Device::Cpu,
        TrainerConfig {
            lora: lora.clone(),
            optim: OptimConfig {
                lr: 1e-2,
                ..Default::default()
            },
            ..Default::default()
        },
        false,
        base.as_ref().map(Weights::shallow_clone),
    )
    .unwrap();
    let tokenizer = Arc::new(files.tokenizer.clone());
    let generator = rlrun::actors::build_generator(
        &files,
        tokenizer,
        Kind::Float,
        Device::Cpu,
        EngineConfig {
            lora,
            ..Default::default()
        },
        base,
    )
    .unwrap();
    (trainer, generator, files)
}

/// Options of a run whose trainer is in this process (`net`: this process serves the store).
fn options(checksums: bool, adapters: bool) -> SyncOptions {
    SyncOptions {
        checksums,
        adapters,
        serve_store: Some("127.0.0.1:0".into()),
        token: None,
        generators: 1,
        group_host: "127.0.0.1".into(),
    }
}

#[test]
fn every_backend_moves_the_weights_and_reports_them() {
    for backend in [
        SyncBackend::InProcess,
        SyncBackend::Shm,
        SyncBackend::Net,
        SyncBackend::Nccl,
    ] {
        let (trainer, generator, bytes) = actors();
        let mut s = sync::build(backend, &options(true, false)).unwrap();
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
        assert_eq!(
            m["sync/backend_net"],
            f64::from(u8::from(backend == SyncBackend::Net))
        );
        assert_eq!(
            m["sync/backend_nccl"],
            f64::from(u8::from(backend == SyncBackend::Nccl))
        );
    }
}

#[test]
fn auto_resolves_by_placement() {
    assert_eq!(SyncBackend::Auto.resolve(true), SyncBackend::InProcess);
    assert_eq!(SyncBackend::Auto.resolve(false), SyncBackend::Shm);
    assert_eq!(SyncBackend::Shm.resolve(true), SyncBackend::Shm);
    assert!(sync::build(SyncBackend::Auto, &SyncOptions::default()).is_err());
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
    fn apply(
        &mut self,
        trainer: &dyn TrainerActor,
        generator: &dyn GeneratorActor,
        p: Published,
    ) -> rlrun::Result<()> {
        self.applies.fetch_add(1, Ordering::SeqCst);
        self.inner.apply(trainer, generator, p)
    }
}

#[test]
fn a_backend_written_outside_the_crate_plugs_in() {
    let (trainer, generator, bytes) = actors();
    let (publishes, applies) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut s = Counting {
        inner: InProcessSync { adapters: false },
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

/// Greedy completions of a few prompts with the generator's log-probs, as training sequences.
fn rollouts(generator: &dyn GeneratorActor, vocab: i64) -> Vec<TrainSequence> {
    let reqs = (0..4)
        .map(|i| Request {
            id: i,
            prompt: (0..5)
                .map(|j| 3 + (i as i64 * 7 + j * 11) % (vocab - 3))
                .collect(),
            params: SamplingParams {
                temperature: 0.0,
                max_tokens: 6,
                stop_token_ids: Some(vec![]),
                ..SamplingParams::default()
            },
            key: None,
        })
        .collect::<Vec<_>>();
    let prompts: Vec<Vec<i64>> = reqs.iter().map(|r| r.prompt.clone()).collect();
    let mut out: Vec<_> = generator
        .generate(reqs)
        .unwrap()
        .iter()
        .map(|c| c.unwrap())
        .collect();
    out.sort_by_key(|c| c.request_id);
    out.into_iter()
        .map(|c| TrainSequence {
            prompt: prompts[c.request_id as usize].clone(),
            advantages: (0..c.token_ids.len())
                .map(|j| {
                    if (c.request_id as usize + j).is_multiple_of(2) {
                        1.0
                    } else {
                        -0.5
                    }
                })
                .collect(),
            behavior_logprobs: Some(c.logprobs.clone()),
            response: c.token_ids,
            ..Default::default()
        })
        .collect()
}

/// With LoRA only the adapters move (in-process, through shared memory and the network), and after a sync
/// the generator's log-probs are the trainer's, whether it applies the adapters in its forward
/// or merges them into its weights.
#[test]
fn lora_sync_moves_only_the_adapters() {
    for (backend, merge) in [
        (SyncBackend::InProcess, false),
        (SyncBackend::Shm, false),
        (SyncBackend::InProcess, true),
        (SyncBackend::Shm, true),
        (SyncBackend::Net, false),
    ] {
        let lora = LoraConfig {
            rank: 4,
            merge,
            ..Default::default()
        };
        let (trainer, generator, files) = actors_with(Some(lora.clone()));
        let adapter_bytes = lora.layout(&files.config).numel() as u64 * 4;
        let seqs = rollouts(&generator, files.config.vocab_size);
        for _ in 0..2 {
            trainer
                .train_step(TrainBatch {
                    sequences: seqs.clone(),
                    max_response_len: 6,
                })
                .unwrap();
        }
        let mut s = sync::build(backend, &options(true, true)).unwrap();
        let out = sync::sync(s.as_mut(), &trainer, &generator).unwrap();
        assert_eq!(out.bytes, adapter_bytes, "{backend:?}");
        assert!(out.bytes * 4 < files.layout().numel() as u64 * 4);
        // The generator now samples from the trained policy: its log-probs of its own new
        // completions are the trainer's.
        let after = rollouts(&generator, files.config.vocab_size);
        let ours = trainer.compute_logprobs(&after).unwrap();
        let mut worst: f32 = 0.0;
        for (s, lp) in after.iter().zip(&ours) {
            for (a, b) in s.behavior_logprobs.as_ref().unwrap().iter().zip(lp) {
                worst = worst.max((a - b).abs());
            }
        }
        assert!(
            worst < 1e-4,
            "{backend:?}, merge {merge}: generator vs trainer log-probs {worst:e}"
        );
        // And they differ from the base's (the reference, with LoRA): the adapters did arrive.
        let base = trainer.compute_ref_logprobs(&after).unwrap();
        let moved = after.iter().zip(&base).any(|(s, lp)| {
            s.behavior_logprobs
                .as_ref()
                .unwrap()
                .iter()
                .zip(lp)
                .any(|(a, b)| (a - b).abs() > 1e-3)
        });
        assert!(
            moved,
            "{backend:?}, merge {merge}: the generator still runs the base"
        );
        // Full weights are refused by an engine that applies adapters.
        let full = generator.update_weights(
            9,
            rlrun_generator::WeightUpdate::Flat(
                files.load_weights(Kind::Float, Device::Cpu).unwrap().flat,
            ),
        );
        assert!(full.unwrap_err().to_string().contains("adapters"));
    }
}
