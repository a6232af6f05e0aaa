//! `rlrun-weights-sync`: moving the trainer's weights to the generators.
//!
//! All weights of a model are one flat buffer (see `rlrun-model`'s `params`), so a sync moves one
//! buffer. Backends, chosen by placement:
//!
//! | placement | backend |
//! |---|---|
//! | same process | the generator copies the trainer's buffer (`WeightUpdate::Flat`) |
//! | separate CPU processes | [`shm`]: written once into a `/dev/shm` file, mapped zero-copy by each generator |
//! | other machines | [`net`]: kept by a weight store, pulled as a gRPC stream of checksummed chunks |
//! | generators in a group (`nccl` sync) | [`group`]: the trainer broadcasts each version to its group of generators, through [`nccl`] on CUDA, over the group's TCP connections on CPU |
//!
//! Every sync carries the policy version and reports bytes, seconds and GB/s ([`SyncReport`]).
//! Integrity checking computes a CRC32C per tensor on the sender and verifies it on the receiver.

pub mod group;
pub mod nccl;
pub mod net;
pub mod shm;

/// What one sync moved and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncReport {
    pub bytes: u64,
    pub seconds: f64,
}

impl SyncReport {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-12) / 1e9
    }
}

/// Errors of a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("process group: {0}")]
    Group(String),
    #[error("weight store {addr}: {message}")]
    Net { addr: String, message: String },
    #[error("weights {path}: {message}")]
    Invalid {
        path: std::path::PathBuf,
        message: String,
    },
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// CRC32C of each `(offset, len)` element range of a CPU tensor's bytes.
pub fn checksums(bytes: &[u8], ranges: &[(i64, i64)], elt_size: usize) -> Vec<u32> {
    ranges
        .iter()
        .map(|&(off, len)| {
            let a = (off as usize) * elt_size;
            let b = a + (len as usize) * elt_size;
            crc32c::crc32c(bytes.get(a..b).unwrap_or(&[]))
        })
        .collect()
}

/// Receives a published version: broadcast in its sync group (`nccl`, into `spare` when it fits,
/// else a new buffer: on `device` when the group uses NCCL), pulled from its weight store (`net`,
/// into `spare` when it is a CPU buffer of the right size and dtype, else a new one) or mapped
/// from its shared-memory file, checking the per-tensor checksums over `ranges` when it carries
/// them.
pub fn receive(
    r: &shm::WeightsRef,
    ranges: Option<&[(i64, i64)]>,
    spare: Option<tch::Tensor>,
    device: tch::Device,
) -> Result<(shm::MappedWeights, SyncReport)> {
    match (&r.group, &r.source) {
        (Some(g), _) => group::receive_broadcast(r, g, spare, device),
        (None, Some(_)) => net::pull(r, spare),
        (None, None) => shm::map(r, ranges),
    }
}
