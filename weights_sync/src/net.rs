//! `net` weight sync, for generators on other machines (any network, CPU or GPU).
//!
//! A [`WeightStore`] keeps the last published version of the flat buffer in host memory, cut
//! into chunks with one CRC32C each; it is a gRPC service (`rlrun.v1.WeightStore`) served by the
//! trainer's actor process on its own port, or by a small loopback server ([`StoreServer`]) when
//! the trainer runs in the controller's process. A generator [`pull`]s the version it was told
//! about into a staging buffer, checking each chunk's checksum, offset and the total size, and
//! swaps to it only when the whole version arrived. A restarted generator simply pulls the
//! current version again.
//!
//! Publishing a new version replaces the stored one; pulls in flight finish with the version they
//! started on (chunks are slices of a reference-counted buffer). A pull asking for a version the
//! store no longer holds fails with an error naming both versions.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rlrun_proto::auth::{TokenAttach, TokenCheck};
use rlrun_proto::v1 as pb;
use rlrun_proto::v1::weight_store_client::WeightStoreClient;
use rlrun_proto::v1::weight_store_server::{WeightStore as WeightStoreRpc, WeightStoreServer};
use tch::{Device, Tensor};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::shm::{MappedWeights, WeightsRef};
use crate::{Result, SyncError, SyncReport};

/// Bytes per streamed chunk (one gRPC message, one checksum).
pub const CHUNK_BYTES: usize = 1 << 20;
/// Largest gRPC message of the store (a chunk and its header).
const MAX_MESSAGE: usize = CHUNK_BYTES + (64 << 10);
/// HTTP/2 flow-control windows: large enough that a stream of chunks never waits for window
/// updates on a fast link.
const WINDOW: u32 = 64 << 20;
/// A pull that has not finished in this long fails (538 MB at 100 MB/s takes 5 s).
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// One stored version.
struct Snapshot {
    version: u64,
    buf: Arc<HostBytes>,
    crcs: Vec<u32>,
}

/// A contiguous CPU tensor seen as its bytes.
struct HostBytes(Tensor);

// SAFETY: shared only behind an `Arc` and then only read (as bytes); written only through
// `Arc::get_mut`, when nothing else holds it.
unsafe impl Sync for HostBytes {}

impl AsRef<[u8]> for HostBytes {
    fn as_ref(&self) -> &[u8] {
        let n = self.0.numel() * self.0.kind().elt_size_in_bytes();
        // SAFETY: a contiguous CPU tensor of `n` bytes, written only while nothing else holds it
        // (see `WeightStore::publish`).
        unsafe { std::slice::from_raw_parts(self.0.data_ptr() as *const u8, n) }
    }
}

/// Bytes `start..end` of a stored version: what a chunk's `Bytes` owns (no copy).
struct Slice {
    buf: Arc<HostBytes>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_ref().as_ref()[self.start..self.end]
    }
}

/// The last published version of the weights, shared by the publisher and the gRPC service.
#[derive(Clone, Default)]
pub struct WeightStore {
    current: Arc<RwLock<Option<Arc<Snapshot>>>>,
    /// The buffer of the version before, reused by the next publish when no pull holds it any
    /// more (a fresh 0.5 GB buffer costs more in page faults than the copy into it).
    spare: Arc<Mutex<Option<Arc<HostBytes>>>>,
}

impl WeightStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `flat` (any device, any float dtype) as `version` in place of the last one. The
    /// returned reference has no `source`: whoever serves the store fills in its address.
    pub fn publish(&self, version: u64, flat: &Tensor) -> Result<(WeightsRef, SyncReport)> {
        let t0 = Instant::now();
        let kind = flat.kind();
        let numel = flat.numel();
        let nbytes = numel * kind.elt_size_in_bytes();
        let reusable = |b: &Arc<HostBytes>| {
            Arc::strong_count(b) == 1 && b.0.kind() == kind && b.0.numel() == numel
        };
        let mut buf = match self.spare.lock().ok().and_then(|mut s| s.take()) {
            Some(b) if reusable(&b) => b,
            _ => Arc::new(HostBytes(Tensor::f_empty(
                [numel as i64],
                (kind, Device::Cpu),
            )?)),
        };
        {
            let _g = tch::no_grad_guard();
            let Some(dst) = Arc::get_mut(&mut buf) else {
                unreachable!("a new or unshared buffer")
            };
            dst.0.f_copy_(&flat.f_reshape([-1])?)?;
        }
        let crcs = buf
            .as_ref()
            .as_ref()
            .chunks(CHUNK_BYTES)
            .map(crc32c::crc32c)
            .collect();
        let snap = Arc::new(Snapshot { version, buf, crcs });
        let previous = self.current.write().ok().and_then(|mut c| c.replace(snap));
        if let (Some(p), Ok(mut s)) = (previous, self.spare.lock()) {
            *s = Some(p.buf.clone());
        }
        Ok((
            WeightsRef {
                version,
                path: Default::default(),
                numel: numel as u64,
                kind,
                checksums: Vec::new(),
                adapters: false,
                source: None,
                group: None,
            },
            SyncReport {
                bytes: nbytes as u64,
                seconds: t0.elapsed().as_secs_f64(),
            },
        ))
    }

    /// The version held now, if any.
    pub fn version(&self) -> Option<u64> {
        self.snapshot().map(|s| s.version)
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    /// The gRPC service (token checked when one is given), to add to a server.
    pub fn service(
        &self,
        token: Option<String>,
    ) -> InterceptedService<WeightStoreServer<StoreService>, TokenCheck> {
        let server = WeightStoreServer::new(StoreService {
            store: self.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
        InterceptedService::new(server, TokenCheck::new(token))
    }
}

/// The `WeightStore` gRPC service.
pub struct StoreService {
    store: WeightStore,
}

type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl WeightStoreRpc for StoreService {
    type PullStream = ChunkStream;

    async fn pull(
        &self,
        req: Request<pb::PullRequest>,
    ) -> std::result::Result<Response<ChunkStream>, Status> {
        let want = req.into_inner().version;
        let snap = self
            .store
            .snapshot()
            .ok_or_else(|| Status::failed_precondition("no weights published yet"))?;
        if snap.version != want {
            return Err(Status::failed_precondition(format!(
                "version {want} is no longer held: the store has version {}",
                snap.version
            )));
        }
        let (n, len) = (snap.crcs.len(), snap.buf.as_ref().as_ref().len());
        let chunks = tokio_stream::iter((0..n).map(move |i| {
            let start = i * CHUNK_BYTES;
            let end = (start + CHUNK_BYTES).min(len);
            Ok(pb::WeightChunk {
                offset: start as u64,
                data: Bytes::from_owner(Slice {
                    buf: snap.buf.clone(),
                    start,
                    end,
                }),
                crc32c: snap.crcs[i],
            })
        }));
        Ok(Response::new(Box::pin(chunks)))
    }
}

/// A store served on its own listener (loopback by default), until dropped.
pub struct StoreServer {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreServer {
    /// Serves `store` on `listen` (e.g. `127.0.0.1:0`); listening beyond loopback needs a token.
    pub fn start(store: &WeightStore, listen: &str, token: Option<String>) -> Result<Self> {
        let err = |m: String| SyncError::Net {
            addr: listen.to_string(),
            message: m,
        };
        let addr: SocketAddr = listen
            .parse()
            .map_err(|_| err("expected host:port".into()))?;
        rlrun_proto::auth::check_listen(&addr, token.as_deref()).map_err(err)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rlrun-weight-store")
            .enable_all()
            .build()
            .map_err(|e| err(format!("starting the async runtime: {e}")))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| err(format!("binding: {e}")))?;
        let bound = listener
            .local_addr()
            .map_err(|e| err(format!("the bound address: {e}")))?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let service = store.service(token);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rlrun-weight-store".into())
            .spawn(move || {
                let serve = tonic::transport::Server::builder()
                    .initial_stream_window_size(Some(WINDOW))
                    .initial_connection_window_size(Some(WINDOW))
                    .tcp_nodelay(true)
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    });
                if let Err(e) = rt.block_on(serve) {
                    tracing::warn!("weight store server stopped: {e}");
                }
            })
            .map_err(|e| err(format!("starting its thread: {e}")))?;
        Ok(StoreServer {
            addr: bound.to_string(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address generators pull from.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The token this process presents to weight stores (set once by an actor process that has one).
static CLIENT_TOKEN: OnceLock<String> = OnceLock::new();

/// Sets the token presented when pulling (the run's token; ignored if already set), also the
/// token of this process's sync groups.
pub fn set_client_token(token: &str) {
    let _ = CLIENT_TOKEN.set(token.to_string());
}

/// The token set by [`set_client_token`], if any.
pub fn client_token() -> Option<&'static str> {
    CLIENT_TOKEN.get().map(String::as_str)
}

/// Pulls version `r.version` from the store at `r.source` into a CPU staging buffer (`spare` when
/// it is contiguous, on the CPU, of the version's size and dtype; else a new one), checking
/// every chunk. The receiver swaps to the buffer once it is whole.
pub fn pull(r: &WeightsRef, spare: Option<Tensor>) -> Result<(MappedWeights, SyncReport)> {
    let addr = r.source.clone().unwrap_or_default();
    let err = |m: String| SyncError::Net {
        addr: addr.clone(),
        message: format!("pulling version {}: {m}", r.version),
    };
    let t0 = Instant::now();
    let nbytes = r.numel as usize * r.kind.elt_size_in_bytes();
    let staging = match spare {
        Some(t)
            if t.device() == Device::Cpu
                && t.kind() == r.kind
                && t.numel() as u64 == r.numel
                && t.is_contiguous() =>
        {
            t
        }
        _ => Tensor::f_empty([r.numel as i64], (r.kind, Device::Cpu))?,
    };
    // SAFETY: a fresh contiguous CPU tensor of `nbytes` bytes, only written here until returned.
    let dst = unsafe { std::slice::from_raw_parts_mut(staging.data_ptr() as *mut u8, nbytes) };
    let rt = rlrun_proto::client_runtime().map_err(|m| SyncError::Net {
        addr: addr.clone(),
        message: m,
    })?;
    let fetch = async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(20))
            .initial_stream_window_size(Some(WINDOW))
            .initial_connection_window_size(Some(WINDOW))
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| err(format!("connecting: {e}")))?;
        let attach = TokenAttach::new(CLIENT_TOKEN.get().map(String::as_str)).map_err(&err)?;
        let mut client = WeightStoreClient::with_interceptor(channel, attach)
            .max_decoding_message_size(MAX_MESSAGE);
        let mut stream = client
            .pull(pb::PullRequest { version: r.version })
            .await
            .map_err(|s| err(s.message().to_string()))?
            .into_inner();
        let mut filled = 0usize;
        while let Some(chunk) = stream.next().await {
            let c = chunk.map_err(|s| err(format!("stream broke: {}", s.message())))?;
            let at = c.offset as usize;
            if at != filled || at + c.data.len() > nbytes {
                return Err(err(format!(
                    "chunk at byte {at} of {} bytes does not follow byte {filled} of {nbytes}",
                    c.data.len()
                )));
            }
            if crc32c::crc32c(&c.data) != c.crc32c {
                return Err(err(format!("checksum mismatch in the chunk at byte {at}")));
            }
            dst[at..at + c.data.len()].copy_from_slice(&c.data);
            filled += c.data.len();
        }
        if filled != nbytes {
            return Err(err(format!(
                "the stream ended after {filled} of {nbytes} bytes"
            )));
        }
        Ok(())
    };
    rt.block_on(async { tokio::time::timeout(PULL_TIMEOUT, fetch).await })
        .map_err(|_| err(format!("no complete version within {PULL_TIMEOUT:?}")))??;
    let weights = MappedWeights::owned(staging);
    Ok((
        weights,
        SyncReport {
            bytes: nbytes as u64,
            seconds: t0.elapsed().as_secs_f64(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn net_ref(r: &WeightsRef, server: &StoreServer) -> WeightsRef {
        WeightsRef {
            source: Some(server.addr().to_string()),
            ..r.clone()
        }
    }

    #[test]
    fn pull_round_trip_versions_and_errors() {
        let store = WeightStore::new();
        let server = StoreServer::start(&store, "127.0.0.1:0", None).unwrap();
        // Not a multiple of the chunk size: the last chunk is short.
        let n = (CHUNK_BYTES / 4) * 2 + 123;
        let w = Tensor::randn([n as i64], (Kind::Float, Device::Cpu));
        let (r, rep) = store.publish(1, &w).unwrap();
        assert_eq!(rep.bytes, (n * 4) as u64);
        let r1 = net_ref(&r, &server);
        let (got, rep) = pull(&r1, None).unwrap();
        assert_eq!(rep.bytes, (n * 4) as u64);
        assert!(got.tensor.equal(&w));
        // bf16 buffers travel as they are.
        let wb = w.to_kind(Kind::BFloat16);
        let (r2, _) = store.publish(2, &wb).unwrap();
        let (got, _) = pull(&net_ref(&r2, &server), None).unwrap();
        assert_eq!(got.tensor.kind(), Kind::BFloat16);
        assert!(got.tensor.equal(&wb));
        // A spare of the right size and dtype is the staging buffer; another one is not used.
        let spare = Tensor::zeros([n as i64], (Kind::BFloat16, Device::Cpu));
        let ptr = spare.data_ptr();
        let (got, _) = pull(&net_ref(&r2, &server), Some(spare)).unwrap();
        assert_eq!(got.tensor.data_ptr(), ptr);
        assert!(got.tensor.equal(&wb));
        let (got, _) = pull(&net_ref(&r2, &server), Some(w.shallow_clone())).unwrap();
        assert_ne!(got.tensor.data_ptr(), w.data_ptr());
        assert!(got.tensor.equal(&wb));
        // Publishing reuses the buffer of the version before last once no pull holds it, and
        // a version being pulled is never overwritten.
        let (r3, _) = store.publish(3, &w).unwrap();
        let (got, _) = pull(&net_ref(&r3, &server), None).unwrap();
        assert!(got.tensor.equal(&w));
        // The old version is gone: the error names both.
        let e = pull(&r1, None).err().unwrap().to_string();
        assert!(
            e.contains("version 1 is no longer held: the store has version 3"),
            "{e}"
        );
        // A size that disagrees with the stream is caught.
        let mut short = net_ref(&r3, &server);
        short.numel -= 1;
        let e = pull(&short, None).err().unwrap().to_string();
        assert!(e.contains("does not follow"), "{e}");
        let mut long = net_ref(&r3, &server);
        long.numel += 1;
        let e = pull(&long, None).err().unwrap().to_string();
        assert!(e.contains("the stream ended after"), "{e}");
        // Nobody listening: the error names the address.
        let addr = server.addr().to_string();
        drop(server);
        let gone = WeightsRef {
            source: Some(addr.clone()),
            ..r3
        };
        let e = pull(&gone, None).err().unwrap().to_string();
        assert!(e.contains(&addr) && e.contains("connecting"), "{e}");
    }

    #[test]
    fn a_store_with_a_token_refuses_pulls_without_it() {
        let store = WeightStore::new();
        let w = Tensor::ones([10], (Kind::Float, Device::Cpu));
        let (r, _) = store.publish(1, &w).unwrap();
        let server = StoreServer::start(&store, "127.0.0.1:0", Some("s3cret".into())).unwrap();
        // This test process has no client token set.
        let e = pull(&net_ref(&r, &server), None).err().unwrap().to_string();
        assert!(e.contains("missing or wrong token"), "{e}");
        // Beyond loopback a token is required.
        let e = StoreServer::start(&store, "0.0.0.0:0", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("without a token"), "{e}");
    }
}
