//! The Trainer actor over gRPC: [`TrainerService`] serves a [`LocalTrainer`] in an actor process
//! (`rlrun actor trainer`); [`RemoteTrainer`] is the controller's client, implementing the same
//! [`TrainerActor`] trait.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rlrun_proto::auth::{TokenAttach, TokenCheck};
use rlrun_proto::v1 as pb;
use rlrun_proto::v1::trainer_client::TrainerClient;
use rlrun_proto::v1::trainer_server::{Trainer as TrainerRpc, TrainerServer};
use rlrun_proto::MAX_MESSAGE_BYTES;
use rlrun_weights_sync::shm::{kind_from_name, kind_name, WeightsRef};
use rlrun_weights_sync::SyncReport;
use tch::Tensor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request as RpcRequest, Response, Status};

use crate::actor::{LocalTrainer, TrainerActor};
use crate::batch::{TrainBatch, TrainSequence};
use crate::error::{Result, TrainError};
use crate::trainer::{SeqValues, StepMetrics};

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

fn status(e: TrainError) -> Status {
    match e {
        TrainError::Invalid(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
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

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&LocalTrainer) -> Result<T> + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let t = self.trainer.clone();
        tokio::task::spawn_blocking(move || f(&t))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)
    }

    /// Sequences in, one row of values per sequence out.
    async fn per_token(
        &self,
        req: RpcRequest<pb::Sequences>,
        f: fn(&LocalTrainer, &[TrainSequence]) -> Result<SeqValues>,
    ) -> std::result::Result<Response<pb::FloatRows>, Status> {
        let seqs: Vec<TrainSequence> = req
            .into_inner()
            .sequences
            .into_iter()
            .map(seq_from_pb)
            .collect();
        let rows = self.blocking(move |t| f(t, &seqs)).await?;
        Ok(Response::new(rows_to_pb(rows)))
    }
}

#[tonic::async_trait]
impl TrainerRpc for TrainerService {
    async fn train_step(
        &self,
        req: RpcRequest<pb::TrainBatch>,
    ) -> std::result::Result<Response<pb::Metrics>, Status> {
        let b = req.into_inner();
        let batch = TrainBatch {
            sequences: b.sequences.into_iter().map(seq_from_pb).collect(),
            max_response_len: b.max_response_len as usize,
        };
        let m = self.blocking(move |t| t.train_step(batch)).await?;
        Ok(Response::new(pb::Metrics {
            values: m.into_iter().collect(),
        }))
    }

    async fn compute_logprobs(
        &self,
        req: RpcRequest<pb::Sequences>,
    ) -> std::result::Result<Response<pb::FloatRows>, Status> {
        self.per_token(req, |t, seqs| t.compute_logprobs(seqs))
            .await
    }

    async fn compute_ref_logprobs(
        &self,
        req: RpcRequest<pb::Sequences>,
    ) -> std::result::Result<Response<pb::FloatRows>, Status> {
        self.per_token(req, |t, seqs| t.compute_ref_logprobs(seqs))
            .await
    }

    async fn compute_values(
        &self,
        req: RpcRequest<pb::Sequences>,
    ) -> std::result::Result<Response<pb::FloatRows>, Status> {
        self.per_token(req, |t, seqs| t.compute_values(seqs)).await
    }

    async fn publish_weights(
        &self,
        req: RpcRequest<pb::PublishRequest>,
    ) -> std::result::Result<Response<pb::WeightsRef>, Status> {
        let r = req.into_inner();
        let (w, _) = self
            .blocking(move |t| t.publish_weights(Path::new(&r.path), r.checksums))
            .await?;
        Ok(Response::new(pb::WeightsRef {
            version: w.version,
            path: w.path.display().to_string(),
            numel: w.numel,
            dtype: kind_name(w.kind).into(),
            checksums: w.checksums,
        }))
    }

    async fn save(
        &self,
        req: RpcRequest<pb::PathRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let p = req.into_inner().path;
        self.blocking(move |t| t.save(Path::new(&p))).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn load(
        &self,
        req: RpcRequest<pb::PathRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let p = req.into_inner().path;
        self.blocking(move |t| t.load(Path::new(&p))).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn health(
        &self,
        _req: RpcRequest<pb::Empty>,
    ) -> std::result::Result<Response<pb::HealthReply>, Status> {
        let v = self.blocking(|t| t.version()).await?;
        Ok(Response::new(pb::HealthReply {
            role: "trainer".into(),
            policy_version: v,
        }))
    }

    async fn shutdown(
        &self,
        _req: RpcRequest<pb::Empty>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(pb::Empty {}))
    }
}

/// A client of a trainer actor at an address, usable as a [`TrainerActor`].
pub struct RemoteTrainer {
    rt: &'static tokio::runtime::Runtime,
    client: TrainerClient<InterceptedService<Channel, TokenAttach>>,
    addr: String,
}

impl RemoteTrainer {
    /// Connects (retrying for up to `timeout`) to `http://addr`.
    pub fn connect(addr: &str, token: Option<&str>, timeout: Duration) -> Result<Self> {
        let attach = TokenAttach::new(token).map_err(TrainError::Invalid)?;
        let (rt, channel) =
            rlrun_proto::connect(addr, "trainer", timeout).map_err(TrainError::Invalid)?;
        let client = TrainerClient::with_interceptor(channel, attach)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(RemoteTrainer {
            rt,
            client,
            addr: addr.to_string(),
        })
    }

    fn err(&self, s: Status) -> TrainError {
        match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => TrainError::Invalid(format!(
                "the trainer process at {} is gone or unreachable ({}); the run cannot continue without it",
                self.addr,
                s.message()
            )),
            _ => TrainError::Invalid(format!("trainer at {}: {}", self.addr, s.message())),
        }
    }

    /// A call that sends sequences and gets one row of values per sequence.
    fn per_token<F, Fut>(&self, seqs: &[TrainSequence], call: F) -> Result<SeqValues>
    where
        F: FnOnce(TrainerClient<InterceptedService<Channel, TokenAttach>>, pb::Sequences) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<pb::FloatRows>, Status>>,
    {
        let msg = pb::Sequences {
            sequences: seqs.iter().map(seq_to_pb).collect(),
        };
        let rows = self
            .rt
            .block_on(call(self.client.clone(), msg))
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(rows.rows.into_iter().map(|row| row.values).collect())
    }

    /// Asks the actor process to exit.
    pub fn shutdown(&self) -> Result<()> {
        let mut c = self.client.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), c.shutdown(pb::Empty {})).await
            })
            .map_err(|_| TrainError::Invalid("shutdown timed out".into()))?
            .map_err(|s| self.err(s))?;
        Ok(())
    }
}

impl TrainerActor for RemoteTrainer {
    fn train_step(&self, batch: TrainBatch) -> Result<StepMetrics> {
        let msg = pb::TrainBatch {
            sequences: batch.sequences.iter().map(seq_to_pb).collect(),
            max_response_len: batch.max_response_len as u64,
        };
        let mut c = self.client.clone();
        let m = self
            .rt
            .block_on(c.train_step(msg))
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(m.values.into_iter().collect::<BTreeMap<_, _>>())
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
            "the trainer at {} is in another process: weights go through shared memory (publish_weights)",
            self.addr
        )))
    }

    fn publish_weights(&self, path: &Path, checksums: bool) -> Result<(WeightsRef, SyncReport)> {
        let t0 = std::time::Instant::now();
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.publish_weights(pb::PublishRequest {
                path: path.display().to_string(),
                checksums,
            }))
            .map_err(|s| self.err(s))?
            .into_inner();
        let kind = kind_from_name(&r.dtype)
            .ok_or_else(|| TrainError::Invalid(format!("unknown dtype `{}`", r.dtype)))?;
        let bytes = r.numel * kind.elt_size_in_bytes() as u64;
        Ok((
            WeightsRef {
                version: r.version,
                path: r.path.into(),
                numel: r.numel,
                kind,
                checksums: r.checksums,
            },
            SyncReport {
                bytes,
                seconds: t0.elapsed().as_secs_f64(),
            },
        ))
    }

    fn version(&self) -> Result<u64> {
        let mut c = self.client.clone();
        let h = self
            .rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(30), c.health(pb::Empty {})).await
            })
            .map_err(|_| {
                TrainError::Invalid(format!(
                    "trainer at {}: no heartbeat within 30 s",
                    self.addr
                ))
            })?
            .map_err(|s| self.err(s))?;
        Ok(h.into_inner().policy_version)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.save(pb::PathRequest {
                path: dir.display().to_string(),
            }))
            .map_err(|s| self.err(s))?;
        Ok(())
    }

    fn load(&self, dir: &Path) -> Result<()> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.load(pb::PathRequest {
                path: dir.display().to_string(),
            }))
            .map_err(|s| self.err(s))?;
        Ok(())
    }
}
