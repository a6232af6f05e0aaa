//! The Generator actor over gRPC: [`GeneratorService`] serves a [`LocalGenerator`] in an actor
//! process (`rlrun actor generator`), and [`RemoteGenerator`] is the client the controller uses,
//! implementing the same [`GeneratorActor`] trait as the in-process actor.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rlrun_proto::auth::{TokenAttach, TokenCheck};
use rlrun_proto::v1 as pb;
use rlrun_proto::v1::generator_client::GeneratorClient;
use rlrun_proto::v1::generator_server::{Generator as GeneratorRpc, GeneratorServer};
use rlrun_proto::MAX_MESSAGE_BYTES;
use rlrun_weights_sync::shm::{kind_from_name, kind_name, WeightsRef};
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request as RpcRequest, Response, Status};

use crate::actor::{CompletionStream, GeneratorActor, LocalGenerator};
use crate::engine::{Completion, EngineStats, FinishReason, Request, Timings, WeightUpdate};
use crate::error::{GenError, Result};
use crate::sampling::{DrawKey, Purpose, SamplingParams};

fn purpose_to_pb(p: Purpose) -> u32 {
    match p {
        Purpose::AdHoc => 0,
        Purpose::Train => 1,
        Purpose::Eval => 2,
        Purpose::PassAtK => 3,
        Purpose::Probe => 4,
    }
}

fn purpose_from_pb(p: u32) -> std::result::Result<Purpose, Status> {
    Ok(match p {
        0 => Purpose::AdHoc,
        1 => Purpose::Train,
        2 => Purpose::Eval,
        3 => Purpose::PassAtK,
        4 => Purpose::Probe,
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown draw purpose {other}"
            )))
        }
    })
}

pub fn request_to_pb(r: &Request) -> pb::Request {
    let p = &r.params;
    pb::Request {
        id: r.id,
        prompt: r.prompt.clone(),
        params: Some(pb::SamplingParams {
            n: p.n as u32,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            max_tokens: p.max_tokens as u32,
            stop_token_ids: p.stop_token_ids.clone().unwrap_or_default(),
            has_stop_token_ids: p.stop_token_ids.is_some(),
            stop: p.stop.clone(),
            seed: p.seed,
        }),
        key: r.key.map(|k| pb::DrawKey {
            purpose: purpose_to_pb(k.purpose),
            step: k.step,
            round: k.round,
            prompt: k.prompt,
        }),
    }
}

pub fn request_from_pb(r: pb::Request) -> std::result::Result<Request, Status> {
    let p = r.params.ok_or_else(|| {
        Status::invalid_argument(format!("request {}: no sampling parameters", r.id))
    })?;
    Ok(Request {
        id: r.id,
        prompt: r.prompt,
        params: SamplingParams {
            n: p.n as usize,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            min_p: p.min_p,
            max_tokens: p.max_tokens as usize,
            stop_token_ids: p.has_stop_token_ids.then_some(p.stop_token_ids),
            stop: p.stop,
            seed: p.seed,
        },
        key: match r.key {
            Some(k) => Some(DrawKey {
                purpose: purpose_from_pb(k.purpose)?,
                step: k.step,
                round: k.round,
                prompt: k.prompt,
            }),
            None => None,
        },
    })
}

pub fn completion_to_pb(c: &Completion) -> pb::Completion {
    pb::Completion {
        request_id: c.request_id,
        index: c.index as u32,
        prompt_len: c.prompt_len as u32,
        token_ids: c.token_ids.clone(),
        logprobs: c.logprobs.clone(),
        finish_reason: match c.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
        .into(),
        policy_version: c.policy_version,
        queued_s: c.timings.queued_s,
        first_token_s: c.timings.first_token_s,
        total_s: c.timings.total_s,
    }
}

pub fn completion_from_pb(c: pb::Completion) -> Completion {
    Completion {
        request_id: c.request_id,
        index: c.index as usize,
        prompt_len: c.prompt_len as usize,
        token_ids: c.token_ids,
        logprobs: c.logprobs,
        finish_reason: match c.finish_reason.as_str() {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            _ => FinishReason::Abort,
        },
        policy_version: c.policy_version,
        timings: Timings {
            queued_s: c.queued_s,
            first_token_s: c.first_token_s,
            total_s: c.total_s,
        },
    }
}

pub fn weights_ref_to_pb(r: &WeightsRef) -> pb::WeightsRef {
    pb::WeightsRef {
        version: r.version,
        path: r.path.display().to_string(),
        numel: r.numel,
        dtype: kind_name(r.kind).into(),
        checksums: r.checksums.clone(),
    }
}

pub fn weights_ref_from_pb(r: pb::WeightsRef) -> std::result::Result<WeightsRef, Status> {
    Ok(WeightsRef {
        version: r.version,
        path: r.path.into(),
        numel: r.numel,
        kind: kind_from_name(&r.dtype)
            .ok_or_else(|| Status::invalid_argument(format!("unknown dtype `{}`", r.dtype)))?,
        checksums: r.checksums,
    })
}

fn status(e: GenError) -> Status {
    match e {
        GenError::InvalidRequest(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

/// Serves a [`LocalGenerator`] over gRPC.
pub struct GeneratorService {
    actor: Arc<LocalGenerator>,
    /// Set by `Shutdown`; the server loop watches it.
    shutdown: Arc<tokio::sync::Notify>,
}

impl GeneratorService {
    pub fn new(actor: Arc<LocalGenerator>, shutdown: Arc<tokio::sync::Notify>) -> Self {
        GeneratorService { actor, shutdown }
    }

    /// The tonic service with message limits and token checking.
    pub fn into_server(
        self,
        token: Option<String>,
    ) -> InterceptedService<GeneratorServer<Self>, TokenCheck> {
        let server = GeneratorServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, TokenCheck::new(token))
    }
}

type CompletionRpcStream =
    Pin<Box<dyn Stream<Item = std::result::Result<pb::Completion, Status>> + Send>>;

#[tonic::async_trait]
impl GeneratorRpc for GeneratorService {
    type GenerateStream = CompletionRpcStream;

    async fn generate(
        &self,
        req: RpcRequest<pb::GenerateRequest>,
    ) -> std::result::Result<Response<Self::GenerateStream>, Status> {
        let reqs = req
            .into_inner()
            .requests
            .into_iter()
            .map(request_from_pb)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let expected: usize = reqs.iter().map(|r| r.params.n).sum();
        let actor = self.actor.clone();
        let rx = tokio::task::spawn_blocking(move || actor.generate(reqs))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::task::spawn_blocking(move || {
            for c in rx.iter().take(expected) {
                let item = c.map(|c| completion_to_pb(&c)).map_err(status);
                if tx.blocking_send(item).is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn update_weights(
        &self,
        req: RpcRequest<pb::WeightsRef>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        let r = weights_ref_from_pb(req.into_inner())?;
        let actor = self.actor.clone();
        tokio::task::spawn_blocking(move || {
            actor.update_weights(r.version, WeightUpdate::Shared(r))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn abort(
        &self,
        req: RpcRequest<pb::AbortRequest>,
    ) -> std::result::Result<Response<pb::Empty>, Status> {
        self.actor.abort(req.into_inner().ids).map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn stats(
        &self,
        _req: RpcRequest<pb::Empty>,
    ) -> std::result::Result<Response<pb::JsonReply>, Status> {
        let actor = self.actor.clone();
        let s = tokio::task::spawn_blocking(move || actor.stats())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(pb::JsonReply {
            json: serde_json::to_string(&s).unwrap_or_default(),
        }))
    }

    async fn health(
        &self,
        _req: RpcRequest<pb::Empty>,
    ) -> std::result::Result<Response<pb::HealthReply>, Status> {
        let actor = self.actor.clone();
        let s = tokio::task::spawn_blocking(move || actor.stats())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        Ok(Response::new(pb::HealthReply {
            role: "generator".into(),
            policy_version: s.policy_version,
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

/// A client of a generator actor at an address, usable as a [`GeneratorActor`].
pub struct RemoteGenerator {
    rt: &'static tokio::runtime::Runtime,
    client: GeneratorClient<InterceptedService<Channel, TokenAttach>>,
    addr: String,
}

impl RemoteGenerator {
    /// Connects (retrying for up to `timeout`) to `http://addr`.
    pub fn connect(addr: &str, token: Option<&str>, timeout: Duration) -> Result<Self> {
        let attach = TokenAttach::new(token).map_err(GenError::InvalidRequest)?;
        let (rt, channel) =
            rlrun_proto::connect(addr, "generator", timeout).map_err(GenError::Unavailable)?;
        let client = GeneratorClient::with_interceptor(channel, attach)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(RemoteGenerator {
            rt,
            client,
            addr: addr.to_string(),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unavailable(&self, s: Status) -> GenError {
        match s.code() {
            tonic::Code::InvalidArgument => GenError::InvalidRequest(s.message().to_string()),
            _ => GenError::Unavailable(format!("generator at {}: {}", self.addr, s.message())),
        }
    }

    /// Asks the actor process to exit.
    pub fn shutdown(&self) -> Result<()> {
        let mut c = self.client.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), c.shutdown(pb::Empty {})).await
            })
            .map_err(|_| GenError::Unavailable("shutdown timed out".into()))?
            .map_err(|s| self.unavailable(s))?;
        Ok(())
    }
}

impl GeneratorActor for RemoteGenerator {
    fn generate(&self, requests: Vec<Request>) -> Result<CompletionStream> {
        let expected: usize = requests.iter().map(|r| r.params.n).sum();
        let msg = pb::GenerateRequest {
            requests: requests.iter().map(request_to_pb).collect(),
        };
        let mut c = self.client.clone();
        let mut stream = self
            .rt
            .block_on(c.generate(msg))
            .map_err(|s| self.unavailable(s))?
            .into_inner();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = self.rt.handle().clone();
        let addr = self.addr.clone();
        std::thread::spawn(move || {
            handle.block_on(async move {
                let mut got = 0;
                loop {
                    match stream.message().await {
                        Ok(Some(c)) => {
                            got += 1;
                            if tx.send(Ok(completion_from_pb(c))).is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            if got < expected {
                                let _ = tx.send(Err(GenError::Unavailable(format!(
                                    "generator at {addr} ended the stream after {got} of {expected} completions"
                                ))));
                            }
                            return;
                        }
                        Err(s) => {
                            let _ = tx.send(Err(GenError::Unavailable(format!("generator at {addr}: {}", s.message()))));
                            return;
                        }
                    }
                }
            })
        });
        Ok(rx)
    }

    fn update_weights(&self, version: u64, update: WeightUpdate) -> Result<()> {
        let WeightUpdate::Shared(r) = update else {
            return Err(GenError::Weights(format!(
                "a generator in another process ({}) takes weights through shared memory only",
                self.addr
            )));
        };
        let mut pbr = weights_ref_to_pb(&r);
        pbr.version = version;
        let mut c = self.client.clone();
        self.rt
            .block_on(c.update_weights(pbr))
            .map_err(|s| self.unavailable(s))?;
        Ok(())
    }

    fn abort(&self, request_ids: Vec<u64>) -> Result<()> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.abort(pb::AbortRequest { ids: request_ids }))
            .map_err(|s| self.unavailable(s))?;
        Ok(())
    }

    fn stats(&self) -> Result<EngineStats> {
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.stats(pb::Empty {}))
            .map_err(|s| self.unavailable(s))?;
        serde_json::from_str(&r.into_inner().json).map_err(|e| GenError::Unavailable(e.to_string()))
    }

    fn health(&self) -> Result<()> {
        let mut c = self.client.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), c.health(pb::Empty {})).await
            })
            .map_err(|_| {
                GenError::Unavailable(format!(
                    "generator at {}: no heartbeat within 10 s",
                    self.addr
                ))
            })?
            .map_err(|s| self.unavailable(s))?;
        Ok(())
    }
}
