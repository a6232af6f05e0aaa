//! The Trainer actor over gRPC: [`TrainerService`] serves a [`LocalTrainer`] in an actor process
//! (`rlrun actor trainer`); [`RemoteTrainer`] is the controller's client, implementing the same
//! [`TrainerActor`] trait. Calls and statuses go through [`super::rpc`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rlrun_proto::auth::TokenCheck;
use rlrun_proto::v1 as pb;
use rlrun_proto::v1::trainer_client::TrainerClient;
use rlrun_proto::v1::trainer_server::{Trainer as TrainerRpc, TrainerServer};
use rlrun_proto::MAX_MESSAGE_BYTES;
use rlrun_trainer::{
    LocalTrainer, SeqValues, StepMetrics, TrainBatch, TrainError, TrainSequence, TrainerActor,
};
use rlrun_weights_sync::shm::WeightsRef;
use rlrun_weights_sync::SyncReport;
use tch::Tensor;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request as RpcRequest, Response, Status};

use super::generator::{weights_ref_from_pb, weights_ref_to_pb};
use super::rpc::{self, Channel, Client};
use super::Role;

type Result<T, E = TrainError> = std::result::Result<T, E>;

fn seq_to_pb(s: &TrainSequence) -> pb::TrainSequence {
    pb::TrainSequence {
        prompt: s.prompt.clone(),
        response: s.response.clone(),
        advantages: s.advantages.clone(),
        has_behavior_logprobs: s.behavior_logprobs.is_some(),
        behavior_logprobs: s.behavior_logprobs.clone().unwrap_or_default(),
        has_returns: s.returns.is_some(),
        returns: s.returns.clone().unwrap_or_default(),
        has_old_values: s.old_values.is_some(),
        old_values: s.old_values.clone().unwrap_or_default(),
        has_ref_logprobs: s.ref_logprobs.is_some(),
        ref_logprobs: s.ref_logprobs.clone().unwrap_or_default(),
        routes: s.routes.iter().map(|&r| i32::from(r)).collect(),
        loss_mask: s.loss_mask.clone(),
    }
}

fn seq_from_pb(s: pb::TrainSequence) -> TrainSequence {
    TrainSequence {
        prompt: s.prompt,
        response: s.response,
        advantages: s.advantages,
        behavior_logprobs: s.has_behavior_logprobs.then_some(s.behavior_logprobs),
        returns: s.has_returns.then_some(s.returns),
        old_values: s.has_old_values.then_some(s.old_values),
        ref_logprobs: s.has_ref_logprobs.then_some(s.ref_logprobs),
        routes: s.routes.into_iter().map(|r| r as i16).collect(),
        loss_mask: s.loss_mask,
    }
}

fn rows_to_pb(v: SeqValues) -> pb::FloatRows {
    pb::FloatRows {
        rows: v
            .into_iter()
            .map(|values| pb::FloatRow { values })
            .collect(),
    }
}

/// Serves a [`LocalTrainer`] over gRPC.
pub struct TrainerService {
    trainer: Arc<LocalTrainer>,
    shutdown: Arc<tokio::sync::Notify>,
}

impl TrainerService {
    pub fn new(trainer: Arc<LocalTrainer>, shutdown: Arc<tokio::sync::Notify>) -> Self {
        TrainerService { trainer, shutdown }
    }

    /// The tonic service with message limits and token checking.
    pub fn into_server(
        self,
        token: Option<String>,
    ) -> InterceptedService<TrainerServer<Self>, TokenCheck> {
        let server = TrainerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, TokenCheck::new(token))
    }

    /// Sequences in, one row of values per sequence out.
    async fn per_token(
        &self,
        req: RpcRequest<pb::Sequences>,
        f: fn(&LocalTrainer, &[TrainSequence]) -> Result<SeqValues>,
    ) -> Result<Response<pb::FloatRows>, Status> {
        let seqs: Vec<TrainSequence> = req
            .into_inner()
            .sequences
            .into_iter()
            .map(seq_from_pb)
            .collect();
        let rows = rpc::blocking(&self.trainer, move |t| f(t, &seqs)).await?;
        Ok(Response::new(rows_to_pb(rows)))
    }
}

#[tonic::async_trait]
impl TrainerRpc for TrainerService {
    async fn train_step(
        &self,
        req: RpcRequest<pb::TrainBatch>,
    ) -> Result<Response<pb::Metrics>, Status> {
        let b = req.into_inner();
        let batch = TrainBatch {
            sequences: b.sequences.into_iter().map(seq_from_pb).collect(),
            max_response_len: b.max_response_len as usize,
        };
        let m = rpc::blocking(&self.trainer, move |t| t.train_step(batch)).await?;
        Ok(Response::new(pb::Metrics {
            values: m.into_iter().collect(),
        }))
    }

    async fn compute_logprobs(
        &self,
        req: RpcRequest<pb::Sequences>,
    ) -> Result<Response<pb::FloatRows>, Status> {
        self.per_token(req, |t, seqs| t.compute_logprobs(seqs))
            .await
    }

    async fn compute_ref_logprobs(
        &self,
        req: RpcRequest<pb::Sequences>,
    ) -> Result<Response<pb::FloatRows>, Status> {
        self.per_token(req, |t, seqs| t.compute_ref_logprobs(seqs))
            .await
    }

    async fn compute_values(
        &self,
        req: RpcRequest<pb::Sequences>,
    ) -> Result<Response<pb::FloatRows>, Status> {
        self.per_token(req, |t, seqs| t.compute_values(seqs)).await
    }

    async fn publish_weights(
        &self,
        req: RpcRequest<pb::PublishRequest>,
    ) -> Result<Response<pb::WeightsRef>, Status> {
        let r = req.into_inner();
        let (w, _) = rpc::blocking(&self.trainer, move |t| {
            if r.net {
                t.publish_net()
            } else {
                t.publish_weights(Path::new(&r.path), r.checksums)
            }
        })
        .await?;
        Ok(Response::new(weights_ref_to_pb(&w)))
    }

    async fn open_group(
        &self,
        req: RpcRequest<pb::GroupRequest>,
    ) -> Result<Response<pb::GroupReply>, Status> {
        let r = req.into_inner();
        let addr = rpc::blocking(&self.trainer, move |t| {
            t.open_group(r.world as usize, r.epoch, &r.host)
        })
        .await?;
        Ok(Response::new(pb::GroupReply {
            addr,
            ..Default::default()
        }))
    }

    async fn broadcast_weights(
        &self,
        req: RpcRequest<pb::GroupRequest>,
    ) -> Result<Response<pb::GroupReply>, Status> {
        let r = req.into_inner();
        let report = rpc::blocking(&self.trainer, move |t| {
            t.broadcast_weights(r.epoch, r.version)
        })
        .await?;
        Ok(Response::new(pb::GroupReply {
            addr: String::new(),
            bytes: report.bytes,
            seconds: report.seconds,
        }))
    }

    async fn save(&self, req: RpcRequest<pb::PathRequest>) -> Result<Response<pb::Empty>, Status> {
        let p = req.into_inner().path;
        rpc::blocking(&self.trainer, move |t| t.save(Path::new(&p))).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn load(&self, req: RpcRequest<pb::PathRequest>) -> Result<Response<pb::Empty>, Status> {
        let p = req.into_inner().path;
        rpc::blocking(&self.trainer, move |t| t.load(Path::new(&p))).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn health(
        &self,
        _req: RpcRequest<pb::Empty>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        let v = rpc::blocking(&self.trainer, |t| t.version()).await?;
        Ok(Response::new(pb::HealthReply {
            role: Role::Trainer.to_string(),
            policy_version: v,
        }))
    }

    async fn shutdown(&self, _req: RpcRequest<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(pb::Empty {}))
    }
}

/// A client of a trainer actor at an address, usable as a [`TrainerActor`].
pub struct RemoteTrainer {
    client: Client<TrainerClient<Channel>>,
}

impl RemoteTrainer {
    /// Connects (retrying for up to `timeout`) to `http://addr`.
    pub fn connect(addr: &str, token: Option<&str>, timeout: Duration) -> Result<Self> {
        let client = Client::connect(Role::Trainer, addr, token, timeout, |ch| {
            TrainerClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        })?;
        Ok(RemoteTrainer { client })
    }

    pub fn addr(&self) -> &str {
        self.client.addr()
    }

    /// A call that sends sequences and gets one row of values per sequence.
    fn per_token<F, Fut>(&self, seqs: &[TrainSequence], call: F) -> Result<SeqValues>
    where
        F: FnOnce(TrainerClient<Channel>, pb::Sequences) -> Fut,
        Fut: std::future::Future<Output = Result<Response<pb::FloatRows>, Status>>,
    {
        let msg = pb::Sequences {
            sequences: seqs.iter().map(seq_to_pb).collect(),
        };
        let rows = self.client.call(|c| call(c, msg))?;
        Ok(rows.rows.into_iter().map(|row| row.values).collect())
    }

    /// Asks the trainer to publish a version (a file or its weight store).
    fn publish(&self, msg: pb::PublishRequest) -> Result<(WeightsRef, SyncReport)> {
        let t0 = std::time::Instant::now();
        let r = self
            .client
            .call(|mut c| async move { c.publish_weights(msg).await })?;
        let w = weights_ref_from_pb(r).map_err(|s| {
            TrainError::Invalid(format!("trainer at {}: {}", self.addr(), s.message()))
        })?;
        let bytes = w.numel * w.kind.elt_size_in_bytes() as u64;
        Ok((
            w,
            SyncReport {
                bytes,
                seconds: t0.elapsed().as_secs_f64(),
            },
        ))
    }

    /// Asks the actor process to exit.
    pub fn shutdown(&self) -> Result<()> {
        self.client
            .call_within(Duration::from_secs(5), |mut c| async move {
                c.shutdown(pb::Empty {}).await
            })?;
        Ok(())
    }
}

impl TrainerActor for RemoteTrainer {
    fn train_step(&self, batch: TrainBatch) -> Result<StepMetrics> {
        let msg = pb::TrainBatch {
            sequences: batch.sequences.iter().map(seq_to_pb).collect(),
            max_response_len: batch.max_response_len as u64,
        };
        let m = self
            .client
            .call(|mut c| async move { c.train_step(msg).await })?;
        Ok(m.values.into_iter().collect())
    }

    fn compute_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        self.per_token(
            seqs,
            |mut c, msg| async move { c.compute_logprobs(msg).await },
        )
    }

    fn compute_ref_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        self.per_token(seqs, |mut c, msg| async move {
            c.compute_ref_logprobs(msg).await
        })
    }

    fn compute_values(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        self.per_token(
            seqs,
            |mut c, msg| async move { c.compute_values(msg).await },
        )
    }

    fn sync_weights(&self) -> Result<(u64, Tensor)> {
        Err(TrainError::Invalid(format!(
            "the trainer at {} is in another process: weights go through shared memory or the network (publish_weights, publish_net)",
            self.addr()
        )))
    }

    fn publish_weights(&self, path: &Path, checksums: bool) -> Result<(WeightsRef, SyncReport)> {
        self.publish(pb::PublishRequest {
            path: path.display().to_string(),
            checksums,
            net: false,
        })
    }

    fn publish_net(&self) -> Result<(WeightsRef, SyncReport)> {
        let (mut w, report) = self.publish(pb::PublishRequest {
            net: true,
            ..Default::default()
        })?;
        // The store is served beside the trainer: pull from the address the trainer is reached at.
        if w.source.is_none() {
            w.source = Some(self.addr().to_string());
        }
        Ok((w, report))
    }

    fn open_group(&self, world: usize, epoch: u64, _host: &str) -> Result<String> {
        // The trainer listens on the host it is reached at.
        let host = self
            .addr()
            .rsplit_once(':')
            .map_or(self.addr(), |(h, _)| h)
            .to_string();
        let msg = pb::GroupRequest {
            world: world as u64,
            epoch,
            host,
            version: 0,
        };
        let r = self
            .client
            .call_within(Duration::from_secs(30), |mut c| async move {
                c.open_group(msg).await
            })?;
        Ok(r.addr)
    }

    fn broadcast_weights(&self, epoch: u64, version: u64) -> Result<SyncReport> {
        let msg = pb::GroupRequest {
            epoch,
            version,
            ..Default::default()
        };
        let r = self
            .client
            .call(|mut c| async move { c.broadcast_weights(msg).await })?;
        Ok(SyncReport {
            bytes: r.bytes,
            seconds: r.seconds,
        })
    }

    fn version(&self) -> Result<u64> {
        let h = self
            .client
            .call_within(Duration::from_secs(30), |mut c| async move {
                c.health(pb::Empty {}).await
            })?;
        Ok(h.policy_version)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let msg = pb::PathRequest {
            path: dir.display().to_string(),
        };
        self.client.call(|mut c| async move { c.save(msg).await })?;
        Ok(())
    }

    fn load(&self, dir: &Path) -> Result<()> {
        let msg = pb::PathRequest {
            path: dir.display().to_string(),
        };
        self.client.call(|mut c| async move { c.load(msg).await })?;
        Ok(())
    }
}

/// A data-parallel trainer: its ranks' processes as one [`TrainerActor`]. Every rank gets each
/// batch and takes its share (`rlrun_trainer::dp`); they sum gradients among themselves and take
/// the same step. Rank 0 answers everything else: log-probs, values, weights and checkpoints (all
/// ranks hold the same state; every rank loads a checkpoint).
pub struct DataParallelTrainer {
    ranks: Vec<RemoteTrainer>,
}

impl DataParallelTrainer {
    pub fn new(ranks: Vec<RemoteTrainer>) -> Self {
        assert!(!ranks.is_empty(), "a data-parallel trainer has ranks");
        DataParallelTrainer { ranks }
    }

    /// `f` on every rank at once; the results in rank order, or the first rank's error.
    fn on_all<T: Send>(&self, f: impl Fn(&RemoteTrainer) -> Result<T> + Sync) -> Result<Vec<T>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = self.ranks.iter().map(|r| s.spawn(|| f(r))).collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(TrainError::Invalid(format!(
                            "data-parallel rank {i}: a call panicked"
                        )))
                    })
                })
                .collect()
        })
    }
}

impl TrainerActor for DataParallelTrainer {
    fn train_step(&self, batch: TrainBatch) -> Result<StepMetrics> {
        let mut all = self.on_all(|r| r.train_step(batch.clone()))?;
        Ok(all.swap_remove(0))
    }

    fn compute_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        self.ranks[0].compute_logprobs(seqs)
    }

    fn compute_ref_logprobs(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        self.ranks[0].compute_ref_logprobs(seqs)
    }

    fn compute_values(&self, seqs: &[TrainSequence]) -> Result<SeqValues> {
        self.ranks[0].compute_values(seqs)
    }

    fn sync_weights(&self) -> Result<(u64, Tensor)> {
        self.ranks[0].sync_weights()
    }

    fn publish_weights(&self, path: &Path, checksums: bool) -> Result<(WeightsRef, SyncReport)> {
        self.ranks[0].publish_weights(path, checksums)
    }

    fn publish_net(&self) -> Result<(WeightsRef, SyncReport)> {
        self.ranks[0].publish_net()
    }

    fn open_group(&self, world: usize, epoch: u64, host: &str) -> Result<String> {
        self.ranks[0].open_group(world, epoch, host)
    }

    fn broadcast_weights(&self, epoch: u64, version: u64) -> Result<SyncReport> {
        self.ranks[0].broadcast_weights(epoch, version)
    }

    fn version(&self) -> Result<u64> {
        self.ranks[0].version()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.ranks[0].save(dir)
    }

    fn load(&self, dir: &Path) -> Result<()> {
        self.on_all(|r| r.load(dir)).map(|_| ())
    }
}
