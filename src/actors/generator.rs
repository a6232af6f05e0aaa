//! The Generator actor over gRPC: [`GeneratorService`] serves a [`LocalGenerator`] in an actor
//! process (`rlrun actor generator`), and [`RemoteGenerator`] is the client the controller uses,
//! implementing the same [`GeneratorActor`] trait as the in-process actor. Calls, statuses and
//! streams go through [`super::rpc`].

use std::sync::Arc;
use std::time::Duration;

use rlrun_generator::{
    Completion, CompletionStream, DrawKey, EngineStats, FinishReason, GenError, GeneratorActor,
    LocalGenerator, Purpose, Request, SamplingParams, Timings, WeightUpdate,
};
use rlrun_proto::auth::TokenCheck;
use rlrun_proto::v1 as pb;
use rlrun_proto::v1::generator_client::GeneratorClient;
use rlrun_proto::v1::generator_server::{Generator as GeneratorRpc, GeneratorServer};
use rlrun_proto::MAX_MESSAGE_BYTES;
use rlrun_weights_sync::group::GroupRef;
use rlrun_weights_sync::shm::{kind_from_name, kind_name, WeightsRef};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request as RpcRequest, Response, Status};

use super::rpc::{self, Channel, Client, RpcStream};
use super::Role;

type Result<T, E = GenError> = std::result::Result<T, E>;

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

fn request_to_pb(r: &Request) -> pb::Request {
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

fn request_from_pb(r: pb::Request) -> std::result::Result<Request, Status> {
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

fn completion_to_pb(c: Completion) -> pb::Completion {
    pb::Completion {
        request_id: c.request_id,
        index: c.index as u32,
        prompt_len: c.prompt_len as u32,
        token_ids: c.token_ids,
        logprobs: c.logprobs,
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
        routes: c.routes.into_iter().map(i32::from).collect(),
    }
}

fn completion_from_pb(c: pb::Completion) -> Completion {
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
        routes: c.routes.into_iter().map(|r| r as i16).collect(),
    }
}

pub(crate) fn weights_ref_to_pb(r: &WeightsRef) -> pb::WeightsRef {
    pb::WeightsRef {
        version: r.version,
        path: r.path.display().to_string(),
        numel: r.numel,
        dtype: kind_name(r.kind).into(),
        checksums: r.checksums.clone(),
        adapters: r.adapters,
        source: r.source.clone().unwrap_or_default(),
        group_addr: r.group.as_ref().map(|g| g.addr.clone()).unwrap_or_default(),
        group_world: r.group.as_ref().map_or(0, |g| g.world as u64),
        group_epoch: r.group.as_ref().map_or(0, |g| g.epoch),
        group_rank: r.group.as_ref().map_or(0, |g| g.rank as u64),
    }
}

pub(crate) fn weights_ref_from_pb(r: pb::WeightsRef) -> std::result::Result<WeightsRef, Status> {
    Ok(WeightsRef {
        version: r.version,
        path: r.path.into(),
        numel: r.numel,
        kind: kind_from_name(&r.dtype)
            .ok_or_else(|| Status::invalid_argument(format!("unknown dtype `{}`", r.dtype)))?,
        checksums: r.checksums,
        adapters: r.adapters,
        source: (!r.source.is_empty()).then_some(r.source),
        group: (!r.group_addr.is_empty()).then_some(GroupRef {
            addr: r.group_addr,
            world: r.group_world as usize,
            epoch: r.group_epoch,
            rank: r.group_rank as usize,
        }),
    })
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

#[tonic::async_trait]
impl GeneratorRpc for GeneratorService {
    type GenerateStream = RpcStream<pb::Completion>;

    async fn generate(
        &self,
        req: RpcRequest<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let reqs = req
            .into_inner()
            .requests
            .into_iter()
            .map(request_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        let expected: usize = reqs.iter().map(|r| r.params.n).sum();
        let rx = rpc::blocking(&self.actor, move |a| a.generate(reqs)).await?;
        Ok(Response::new(rpc::stream_out(
            rx,
            expected,
            completion_to_pb,
        )))
    }

    async fn update_weights(
        &self,
        req: RpcRequest<pb::WeightsRef>,
    ) -> Result<Response<pb::Empty>, Status> {
        let r = weights_ref_from_pb(req.into_inner())?;
        rpc::blocking(&self.actor, move |a| {
            a.update_weights(r.version, WeightUpdate::Shared(r))
        })
        .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn abort(
        &self,
        req: RpcRequest<pb::AbortRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        self.actor
            .abort(req.into_inner().ids)
            .map_err(rpc::status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn stats(&self, _req: RpcRequest<pb::Empty>) -> Result<Response<pb::JsonReply>, Status> {
        let s = rpc::blocking(&self.actor, |a| a.stats()).await?;
        Ok(Response::new(pb::JsonReply {
            json: serde_json::to_string(&s).map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    async fn health(
        &self,
        _req: RpcRequest<pb::Empty>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        let s = rpc::blocking(&self.actor, |a| a.stats()).await?;
        Ok(Response::new(pb::HealthReply {
            role: Role::Generator.to_string(),
            policy_version: s.policy_version,
        }))
    }

    async fn shutdown(&self, _req: RpcRequest<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        self.shutdown.notify_one();
        Ok(Response::new(pb::Empty {}))
    }
}

/// A client of a generator actor at an address, usable as a [`GeneratorActor`].
pub struct RemoteGenerator {
    client: Client<GeneratorClient<Channel>>,
}

impl RemoteGenerator {
    /// Connects (retrying for up to `timeout`) to `http://addr`.
    pub fn connect(addr: &str, token: Option<&str>, timeout: Duration) -> Result<Self> {
        let client = Client::connect(Role::Generator, addr, token, timeout, |ch| {
            GeneratorClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        })?;
        Ok(RemoteGenerator { client })
    }

    pub fn addr(&self) -> &str {
        self.client.addr()
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

impl GeneratorActor for RemoteGenerator {
    fn generate(&self, requests: Vec<Request>) -> Result<CompletionStream> {
        let expected: usize = requests.iter().map(|r| r.params.n).sum();
        let msg = pb::GenerateRequest {
            requests: requests.iter().map(request_to_pb).collect(),
        };
        let stream = self
            .client
            .call(|mut c| async move { c.generate(msg).await })?;
        Ok(self.client.stream(stream, expected, completion_from_pb))
    }

    fn update_weights(&self, version: u64, update: WeightUpdate) -> Result<()> {
        let WeightUpdate::Shared(r) = update else {
            return Err(GenError::Weights(format!(
                "a generator in another process ({}) takes weights through shared memory or the network only",
                self.addr()
            )));
        };
        let mut msg = weights_ref_to_pb(&r);
        msg.version = version;
        self.client
            .call(|mut c| async move { c.update_weights(msg).await })?;
        Ok(())
    }

    fn abort(&self, request_ids: Vec<u64>) -> Result<()> {
        let msg = pb::AbortRequest { ids: request_ids };
        self.client
            .call(|mut c| async move { c.abort(msg).await })?;
        Ok(())
    }

    fn stats(&self) -> Result<EngineStats> {
        let r = self
            .client
            .call(|mut c| async move { c.stats(pb::Empty {}).await })?;
        serde_json::from_str(&r.json)
            .map_err(|e| GenError::Unavailable(format!("generator at {}: stats: {e}", self.addr())))
    }

    fn health(&self) -> Result<()> {
        self.client
            .call_within(Duration::from_secs(10), |mut c| async move {
                c.health(pb::Empty {}).await
            })?;
        Ok(())
    }
}
