//! The Generator actor: owns an [`Engine`] on its own thread and serves `generate` (streaming
//! completions as they finish), `update_weights`, `abort`, `stats` and `health`.
//!
//! [`GeneratorActor`] is the interface the controller uses; [`LocalGenerator`] implements it in
//! process, and a gRPC client implements it for actors in other processes.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::{Completion, Engine, EngineStats, Request, WeightUpdate};
use crate::error::{GenError, Result};

/// A stream of completions; it ends after the last completion of the submitted requests.
pub type CompletionStream = Receiver<Result<Completion>>;

/// What the controller needs from a generator, wherever it runs.
pub trait GeneratorActor: Send + Sync {
    /// Queues `requests`; their completions arrive on the returned stream as they finish.
    fn generate(&self, requests: Vec<Request>) -> Result<CompletionStream>;
    /// New weights tagged with `version`, applied between decode steps (see [`crate::UpdatePolicy`]).
    /// Returns once they are applied.
    fn update_weights(&self, version: u64, update: WeightUpdate) -> Result<()>;
    /// Aborts requests; their unfinished samples complete with reason `Abort`.
    fn abort(&self, request_ids: Vec<u64>) -> Result<()>;
    fn stats(&self) -> Result<EngineStats>;
    /// Ok when the actor is alive and serving.
    fn health(&self) -> Result<()>;
    /// Frees the KV cache if idle (see [`Engine::release_cache`]); the bytes freed. Actors in
    /// other processes keep theirs (they do not share the trainer's device memory).
    fn release_cache(&self) -> Result<u64> {
        Ok(0)
    }
}

/// A shared actor is an actor (the controller and a pool's driver threads hold the same one).
impl<T: GeneratorActor + ?Sized> GeneratorActor for std::sync::Arc<T> {
    fn generate(&self, requests: Vec<Request>) -> Result<CompletionStream> {
        (**self).generate(requests)
    }
    fn update_weights(&self, version: u64, update: WeightUpdate) -> Result<()> {
        (**self).update_weights(version, update)
    }
    fn abort(&self, request_ids: Vec<u64>) -> Result<()> {
        (**self).abort(request_ids)
    }
    fn stats(&self) -> Result<EngineStats> {
        (**self).stats()
    }
    fn health(&self) -> Result<()> {
        (**self).health()
    }
    fn release_cache(&self) -> Result<u64> {
        (**self).release_cache()
    }
}

enum Command {
    Generate(Vec<Request>, Sender<Result<Completion>>, Sender<Result<()>>),
    Update(u64, WeightUpdate, Sender<Result<()>>),
    Abort(Vec<u64>),
    Stats(Sender<EngineStats>),
    ReleaseCache(Sender<Result<u64>>),
    Shutdown,
}

/// An in-process generator actor.
pub struct LocalGenerator {
    tx: Sender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl LocalGenerator {
    /// Moves `engine` onto a new thread and serves it.
    pub fn spawn(engine: Engine) -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rlrun-generator".into())
            .spawn(move || serve(engine, rx))
            .expect("spawning the generator thread");
        LocalGenerator {
            tx,
            thread: Some(thread),
        }
    }

    fn send(&self, c: Command) -> Result<()> {
        self.tx
            .send(c)
            .map_err(|_| GenError::Unavailable("the generator thread has stopped".into()))
    }
}

impl Drop for LocalGenerator {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl GeneratorActor for LocalGenerator {
    fn generate(&self, requests: Vec<Request>) -> Result<CompletionStream> {
        let (out_tx, out_rx) = mpsc::channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        self.send(Command::Generate(requests, out_tx, ack_tx))?;
        ack_rx
            .recv()
            .map_err(|_| GenError::Unavailable("the generator thread has stopped".into()))??;
        Ok(out_rx)
    }

    fn update_weights(&self, version: u64, update: WeightUpdate) -> Result<()> {
        let (ack_tx, ack_rx) = mpsc::channel();
        self.send(Command::Update(version, update, ack_tx))?;
        ack_rx
            .recv()
            .map_err(|_| GenError::Unavailable("the generator thread has stopped".into()))?
    }

    fn abort(&self, request_ids: Vec<u64>) -> Result<()> {
        self.send(Command::Abort(request_ids))
    }

    fn stats(&self) -> Result<EngineStats> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Stats(tx))?;
        rx.recv()
            .map_err(|_| GenError::Unavailable("the generator thread has stopped".into()))
    }

    fn health(&self) -> Result<()> {
        self.stats().map(|_| ())
    }

    fn release_cache(&self) -> Result<u64> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::ReleaseCache(tx))?;
        rx.recv()
            .map_err(|_| GenError::Unavailable("the generator thread has stopped".into()))?
    }
}

struct Route {
    out: Sender<Result<Completion>>,
    /// Samples of this request still to come.
    remaining: usize,
}

fn serve(mut engine: Engine, rx: Receiver<Command>) {
    let mut routes: HashMap<u64, Route> = HashMap::new();
    // Updates wait here until the engine has applied them (drain policy).
    let mut update_acks: Vec<(u64, Sender<Result<()>>)> = Vec::new();
    loop {
        // Block for a command when idle; otherwise take what is there and keep stepping.
        let idle = engine.is_idle() && update_acks.is_empty();
        let first = if idle {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut cmds: Vec<Command> = first.into_iter().collect();
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        for c in cmds {
            match c {
                Command::Generate(reqs, out, ack) => {
                    let mut result = Ok(());
                    for r in reqs {
                        let (id, n) = (r.id, r.params.n);
                        match engine.submit(r) {
                            Ok(()) => {
                                routes.insert(
                                    id,
                                    Route {
                                        out: out.clone(),
                                        remaining: n,
                                    },
                                );
                            }
                            Err(e) => {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    let _ = ack.send(result);
                }
                Command::Update(version, update, ack) => {
                    match engine.update_weights(version, update) {
                        Ok(()) if engine.version() == version => {
                            let _ = ack.send(Ok(()));
                        }
                        Ok(()) => update_acks.push((version, ack)),
                        Err(e) => {
                            let _ = ack.send(Err(e));
                        }
                    }
                }
                Command::Abort(ids) => deliver(
                    &mut routes,
                    engine.abort(&ids).into_iter().map(Ok).collect(),
                ),
                Command::Stats(tx) => {
                    let _ = tx.send(engine.stats());
                }
                Command::ReleaseCache(tx) => {
                    // Not while an update waits for in-flight sequences to drain.
                    let freed = if update_acks.is_empty() {
                        engine.release_cache().map(|b| b as u64)
                    } else {
                        Ok(0)
                    };
                    let _ = tx.send(freed);
                }
                Command::Shutdown => return,
            }
        }
        if !engine.is_idle() || !update_acks.is_empty() {
            match engine.step() {
                Ok(done) => deliver(&mut routes, done.into_iter().map(Ok).collect()),
                Err(e) => {
                    // A failed step fails every request in flight; the actor keeps serving.
                    let msg = e.to_string();
                    let ids: Vec<u64> = routes.keys().copied().collect();
                    let _ = engine.abort(&ids);
                    for (_, r) in routes.drain() {
                        let _ = r.out.send(Err(GenError::Unavailable(format!(
                            "generation step failed: {msg}"
                        ))));
                    }
                }
            }
            let v = engine.version();
            update_acks.retain(|(version, ack)| {
                if *version == v {
                    let _ = ack.send(Ok(()));
                    false
                } else {
                    true
                }
            });
        }
    }
}

fn deliver(routes: &mut HashMap<u64, Route>, done: Vec<Result<Completion>>) {
    for c in done {
        let Ok(comp) = c else { continue };
        let id = comp.request_id;
        if let Some(r) = routes.get_mut(&id) {
            let _ = r.out.send(Ok(comp));
            r.remaining = r.remaining.saturating_sub(1);
            if r.remaining == 0 {
                routes.remove(&id);
            }
        }
    }
}
