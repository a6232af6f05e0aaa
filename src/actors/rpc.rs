//! The one RPC helper of the actor layer, used by both services and both clients:
//!
//! - client side: one shared async runtime, connection with retries and heartbeats ([`Client`]),
//!   blocking calls from any thread ([`Client::call`], [`Client::call_within`]), a server stream
//!   turned into a channel that reports a stream cut short ([`Client::stream`]), and one mapping
//!   from a gRPC status to a [`CallError`] that names the actor and its address;
//! - server side: an engine call run off the async threads with its error mapped to a status
//!   ([`blocking`]), and a channel of results turned into a response stream ([`stream_out`]).
//!
//! Engines stay transport-free: their errors only say whether the input was at fault
//! ([`ServerError`]); everything gRPC lives here and in the two actor modules beside it.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rlrun_generator::GenError;
use rlrun_proto::auth::TokenAttach;
use rlrun_proto::{HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT};
use rlrun_trainer::TrainError;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Response, Status, Streaming};

use super::Role;

/// The channel every client call goes through: token attached, heartbeats on.
pub type Channel = InterceptedService<tonic::transport::Channel, TokenAttach>;

/// A call to an actor that failed: which actor, where, the gRPC code and what it said.
#[derive(Debug, Clone)]
pub struct CallError {
    pub role: Role,
    pub addr: String,
    pub code: Code,
    pub message: String,
}

impl CallError {
    fn new(role: Role, addr: &str, code: Code, message: impl Into<String>) -> Self {
        CallError {
            role,
            addr: addr.to_string(),
            code,
            message: message.into(),
        }
    }

    /// The actor is gone or cannot be reached (as opposed to refusing this call).
    pub fn is_gone(&self) -> bool {
        matches!(
            self.code,
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        )
    }

    /// The actor refused the call's input.
    pub fn is_invalid_input(&self) -> bool {
        self.code == Code::InvalidArgument
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}: {}", self.role, self.addr, self.message)
    }
}

impl std::error::Error for CallError {}

impl From<CallError> for GenError {
    fn from(e: CallError) -> Self {
        if e.is_invalid_input() {
            GenError::InvalidRequest(e.message)
        } else {
            GenError::Unavailable(e.to_string())
        }
    }
}

impl From<CallError> for TrainError {
    fn from(e: CallError) -> Self {
        if e.is_gone() {
            TrainError::Unavailable(format!(
                "the trainer process at {} is gone or unreachable ({}); the run cannot continue without it",
                e.addr, e.message
            ))
        } else {
            TrainError::Invalid(e.to_string())
        }
    }
}

/// A connected client of one actor: the generated stub `C` over a [`Channel`], the shared
/// runtime, and who it talks to (for errors).
pub struct Client<C> {
    rt: &'static tokio::runtime::Runtime,
    stub: C,
    role: Role,
    addr: String,
}

impl<C: Clone> Client<C> {
    /// Connects to `http://addr`, retrying for up to `timeout` (the actor may still be starting)
    /// with exponential backoff (50 ms doubling to 1 s), and wraps the channel with `stub`.
    pub fn connect(
        role: Role,
        addr: &str,
        token: Option<&str>,
        timeout: Duration,
        stub: impl FnOnce(Channel) -> C,
    ) -> Result<Self, CallError> {
        let fail = |code, m: String| CallError::new(role, addr, code, m);
        let attach = TokenAttach::new(token).map_err(|m| fail(Code::InvalidArgument, m))?;
        let rt = rlrun_proto::client_runtime().map_err(|m| fail(Code::Internal, m))?;
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        let channel = loop {
            let endpoint = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| fail(Code::InvalidArgument, format!("bad address: {e}")))?
                .connect_timeout(Duration::from_secs(5))
                // Heartbeats: a peer that stops answering HTTP/2 pings (hung, stopped, or its
                // machine gone) fails the calls on this channel instead of hanging them.
                .http2_keep_alive_interval(HEARTBEAT_INTERVAL)
                .keep_alive_timeout(HEARTBEAT_TIMEOUT)
                .keep_alive_while_idle(true);
            match rt.block_on(endpoint.connect()) {
                Ok(c) => break c,
                Err(e) if Instant::now() >= deadline => {
                    return Err(fail(Code::Unavailable, format!("cannot connect: {e}")))
                }
                Err(_) => {
                    std::thread::sleep(
                        backoff.min(deadline.saturating_duration_since(Instant::now())),
                    );
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        Ok(Client {
            rt,
            stub: stub(InterceptedService::new(channel, attach)),
            role,
            addr: addr.to_string(),
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn error(&self, s: Status) -> CallError {
        CallError::new(self.role, &self.addr, s.code(), s.message())
    }

    /// One unary (or stream-opening) call, blocking this thread until it answers.
    pub fn call<T, Fut>(&self, f: impl FnOnce(C) -> Fut) -> Result<T, CallError>
    where
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        self.rt
            .block_on(f(self.stub.clone()))
            .map(Response::into_inner)
            .map_err(|s| self.error(s))
    }

    /// [`Self::call`] that gives up after `limit` (health checks, shutdown): a hung actor is
    /// reported as such instead of blocking the caller.
    pub fn call_within<T, Fut>(
        &self,
        limit: Duration,
        f: impl FnOnce(C) -> Fut,
    ) -> Result<T, CallError>
    where
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        // The timer is created inside the runtime (it needs its time driver).
        let call = f(self.stub.clone());
        match self
            .rt
            .block_on(async move { tokio::time::timeout(limit, call).await })
        {
            Ok(r) => r.map(Response::into_inner).map_err(|s| self.error(s)),
            Err(_) => Err(self.error(Status::deadline_exceeded(format!(
                "no answer within {} s",
                limit.as_secs_f64()
            )))),
        }
    }

    /// Forwards a server stream of `expected` messages into a channel, mapped by `map`. A stream
    /// that fails, or ends before `expected` messages, ends the channel with one error.
    pub fn stream<M, T, E>(
        &self,
        mut stream: Streaming<M>,
        expected: usize,
        map: fn(M) -> T,
    ) -> std::sync::mpsc::Receiver<Result<T, E>>
    where
        M: Send + 'static,
        T: Send + 'static,
        E: From<CallError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let (role, addr) = (self.role, self.addr.clone());
        self.rt.spawn(async move {
            let mut got = 0;
            let end = loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        got += 1;
                        if tx.send(Ok(map(m))).is_err() {
                            return; // the caller stopped listening
                        }
                    }
                    Ok(None) if got >= expected => return,
                    Ok(None) => {
                        break CallError::new(
                            role,
                            &addr,
                            Code::Unavailable,
                            format!("the stream ended after {got} of {expected} results"),
                        )
                    }
                    Err(s) => break CallError::new(role, &addr, s.code(), s.message()),
                }
            };
            let _ = tx.send(Err(end.into()));
        });
        rx
    }
}

/// An engine error as the server reports it: was the caller's input at fault?
pub trait ServerError: fmt::Display {
    fn is_invalid_input(&self) -> bool;
}

impl ServerError for GenError {
    fn is_invalid_input(&self) -> bool {
        matches!(self, GenError::InvalidRequest(_))
    }
}

impl ServerError for TrainError {
    fn is_invalid_input(&self) -> bool {
        matches!(self, TrainError::Invalid(_))
    }
}

/// The status a failed engine call answers with: `InvalidArgument` when the input was at fault
/// (the client reports it as the request's own error), `Internal` otherwise.
pub fn status(e: impl ServerError) -> Status {
    if e.is_invalid_input() {
        Status::invalid_argument(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

/// Runs an engine call on the blocking pool (engines compute for seconds; the async threads
/// keep serving health checks and aborts meanwhile).
pub async fn blocking<A, T, E>(
    actor: &Arc<A>,
    f: impl FnOnce(&A) -> Result<T, E> + Send + 'static,
) -> Result<T, Status>
where
    A: Send + Sync + 'static,
    T: Send + 'static,
    E: ServerError + Send + 'static,
{
    let actor = actor.clone();
    tokio::task::spawn_blocking(move || f(&actor))
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)
}

/// A response stream.
pub type RpcStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Turns the first `expected` results of an engine's channel into a response stream, mapped by
/// `map`; the stream ends when the client goes away.
pub fn stream_out<T, E, M>(
    rx: std::sync::mpsc::Receiver<Result<T, E>>,
    expected: usize,
    map: fn(T) -> M,
) -> RpcStream<M>
where
    T: Send + 'static,
    E: ServerError + Send + 'static,
    M: Send + 'static,
{
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        for item in rx.iter().take(expected) {
            if tx.blocking_send(item.map(map).map_err(status)).is_err() {
                break;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))
}
