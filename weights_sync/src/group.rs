//! A process group: rank 0 listens, ranks `1..world` connect to it over TCP (each presenting the
//! run's token), and collectives run over those connections: broadcast from rank 0, sum in rank
//! order (every rank gets the same bits), gather. When rank 0 asks for it, the group also opens
//! an NCCL communicator (rank 0 makes the unique id and hands it over the TCP connections) and the
//! bytes of CUDA tensors go through NCCL; the TCP connections remain the control channel.
//!
//! Two users: the data-parallel trainer (its ranks sum gradients) and the `nccl` weight sync
//! (the trainer broadcasts each version to the generators, [`BroadcastHost`] and
//! [`receive_broadcast`]). On CPU the same code runs over TCP only, which is how tests prove it.
//! Every wait has a timeout and fails naming the peer; an error drops the group (closing its
//! connections), so the other ranks fail at once instead of waiting.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::shm::{kind_from_name, kind_name, MappedWeights, WeightsRef};
use crate::{nccl, Result, SyncError, SyncReport};

/// Bytes per bucket of a collective over TCP (NCCL buckets are the caller's).
pub const BUCKET_BYTES: usize = 32 << 20;

fn err(m: impl Into<String>) -> SyncError {
    SyncError::Group(m.into())
}

/// A connected group.
pub struct Group {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.. in rank order; other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
    timeout: Duration,
    nccl: Option<nccl::Comm>,
}

impl Group {
    /// Binds rank 0's listener on `addr` (`host:port`, port 0 for any); returns it and the
    /// address the others connect to. Beyond loopback the run's token is required.
    pub fn listen(addr: &str) -> Result<(TcpListener, String)> {
        let l = TcpListener::bind(addr).map_err(|e| err(format!("binding {addr}: {e}")))?;
        let bound = l
            .local_addr()
            .map_err(|e| err(format!("binding {addr}: {e}")))?;
        rlrun_proto::auth::check_listen(&bound, crate::net::client_token()).map_err(err)?;
        Ok((l, bound.to_string()))
    }

    /// Rank 0: accepts ranks `1..world` on `listener` within `timeout`.
    pub fn accept(listener: &TcpListener, world: usize, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let at = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("listening on {at}: {e}")))?;
        let mut peers: Vec<(usize, TcpStream)> = Vec::new();
        while peers.len() + 1 < world {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                    configure(&s, timeout)?;
                    let r = read_u64(&mut s, "a joining rank", timeout)? as usize;
                    let token = read_frame(&mut s, "a joining rank", timeout)?;
                    let expected = crate::net::client_token().unwrap_or_default();
                    if token != expected.as_bytes() {
                        return Err(err(format!(
                            "a peer at {from} presented a wrong token for the group at {at}"
                        )));
                    }
                    if r == 0 || r >= world || peers.iter().any(|(p, _)| *p == r) {
                        return Err(err(format!("rank {r} joined a group of {world}")));
                    }
                    peers.push((r, s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<usize> = (1..world)
                            .filter(|r| !peers.iter().any(|(p, _)| p == r))
                            .collect();
                        return Err(err(format!(
                            "ranks {missing:?} did not join at {at} within {timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(err(format!("accepting at {at}: {e}"))),
            }
        }
        peers.sort_by_key(|(r, _)| *r);
        Ok(Group {
            rank: 0,
            world,
            peers: peers.into_iter().map(|(_, s)| s).collect(),
            timeout,
            nccl: None,
        })
    }

    /// Rank `rank` (> 0): connects to rank 0 at `addr`, retrying until `timeout` when `retry`
    /// (rank 0 may not listen yet), else failing at once.
    pub fn connect(
        addr: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
        retry: bool,
    ) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if !retry || Instant::now() > deadline => {
                    return Err(err(format!(
                        "rank {rank} could not reach rank 0 at {addr}: {e}"
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        configure(&s, timeout)?;
        write_all(&mut s, &(rank as u64).to_le_bytes(), "rank 0", timeout)?;
        let token = crate::net::client_token().unwrap_or_default();
        write_frame(&mut s, token.as_bytes(), "rank 0", timeout)?;
        Ok(Group {
            rank,
            world,
            peers: vec![s],
            timeout,
            nccl: None,
        })
    }

    /// Joins the group whose rank 0 listens at `rendezvous` (rank 0 binds it and accepts; the
    /// others retry until it listens).
    pub fn join(rank: usize, world: usize, rendezvous: &str, timeout: Duration) -> Result<Self> {
        if rank == 0 {
            let (l, _) = Self::listen(rendezvous)?;
            Self::accept(&l, world, timeout)
        } else {
            Self::connect(rendezvous, rank, world, timeout, true)
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether CUDA tensors go through NCCL.
    pub fn has_nccl(&self) -> bool {
        self.nccl.is_some()
    }

    /// Settles the transport for CUDA tensors, as rank 0 decides: with `device` a CUDA device on
    /// rank 0, an NCCL communicator (rank 0 makes the id and sends it); otherwise TCP. Other ranks
    /// pass their own device and follow; one on the CPU cannot join an NCCL group.
    pub fn settle_transport(&mut self, device: Device) -> Result<()> {
        let id = if self.rank == 0 {
            let id = if device.is_cuda() && self.world > 1 {
                nccl::unique_id()?
            } else {
                Vec::new()
            };
            self.broadcast_frame(Some(&id))?
        } else {
            self.broadcast_frame(None)?
        };
        if id.is_empty() {
            return Ok(());
        }
        if !device.is_cuda() {
            return Err(err(format!(
                "rank 0 broadcasts over NCCL, but rank {} is on {device:?}",
                self.rank
            )));
        }
        self.nccl = Some(nccl::Comm::init(
            &id,
            self.world,
            self.rank,
            device,
            self.timeout,
        )?);
        Ok(())
    }

    /// Rank 0's `bytes` (pass `Some`) on every rank (others pass `None`).
    pub fn broadcast_frame(&mut self, bytes: Option<&[u8]>) -> Result<Vec<u8>> {
        let timeout = self.timeout;
        if self.rank == 0 {
            let b = bytes.unwrap_or_default();
            for (i, s) in self.peers.iter_mut().enumerate() {
                write_frame(s, b, &format!("rank {}", i + 1), timeout)?;
            }
            Ok(b.to_vec())
        } else {
            read_frame(&mut self.peers[0], "rank 0", timeout)
        }
    }

    /// Broadcasts `t` (contiguous, any device) from rank 0 into `t` on every other rank: through
    /// NCCL when the group has it and `t` is on CUDA, else in buckets over TCP (staged through
    /// host memory when `t` is not on the CPU).
    pub fn broadcast(&mut self, t: &Tensor) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if let (Some(c), true) = (&self.nccl, t.device().is_cuda()) {
            return c.broadcast(t, 0, BUCKET_BYTES);
        }
        let host = host_view(t)?;
        let n = host.numel() * host.kind().elt_size_in_bytes();
        // SAFETY: a contiguous CPU tensor of `n` bytes that only this call touches meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, n) };
        let timeout = self.timeout;
        for start in (0..n).step_by(BUCKET_BYTES) {
            let bucket = &mut buf[start..(start + BUCKET_BYTES).min(n)];
            if self.rank == 0 {
                for (i, s) in self.peers.iter_mut().enumerate() {
                    write_all(s, bucket, &format!("rank {}", i + 1), timeout)?;
                }
            } else {
                read_exact(&mut self.peers[0], bucket, "rank 0", timeout)?;
            }
        }
        if self.rank != 0 && host.data_ptr() != t.data_ptr() {
            t.shallow_clone().f_copy_(&host)?;
        }
        Ok(())
    }

    /// Sums `t` (a contiguous f32 tensor, any device) over the ranks, in place: through NCCL when
    /// the group has it and `t` is on CUDA; else over TCP, where rank 0 adds the ranks' buffers in
    /// rank order so that every rank gets bitwise the same result.
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if let (Some(c), true) = (&self.nccl, t.device().is_cuda()) {
            return c.all_reduce_sum(t, BUCKET_BYTES);
        }
        let host = host_view(t)?;
        if host.kind() != Kind::Float {
            return Err(err(format!("sums f32 buffers, got {:?}", host.kind())));
        }
        let n = host.numel() * 4;
        // SAFETY: a contiguous CPU f32 tensor of `n` bytes that only this call touches meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, n) };
        let mut theirs = vec![0u8; BUCKET_BYTES.min(n)];
        let timeout = self.timeout;
        for start in (0..n).step_by(BUCKET_BYTES) {
            let bucket = &mut buf[start..(start + BUCKET_BYTES).min(n)];
            if self.rank == 0 {
                for (i, s) in self.peers.iter_mut().enumerate() {
                    let got = &mut theirs[..bucket.len()];
                    read_exact(s, got, &format!("rank {}", i + 1), timeout)?;
                    add_f32(bucket, got);
                }
                for (i, s) in self.peers.iter_mut().enumerate() {
                    write_all(s, bucket, &format!("rank {}", i + 1), timeout)?;
                }
            } else {
                let s = &mut self.peers[0];
                write_all(s, bucket, "rank 0", timeout)?;
                read_exact(s, bucket, "rank 0", timeout)?;
            }
        }
        if host.data_ptr() != t.data_ptr() {
            t.f_copy_(&host)?;
        }
        Ok(())
    }

    /// Every rank's `bytes`, in rank order, on every rank.
    pub fn all_gather(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.world == 1 {
            return Ok(vec![bytes.to_vec()]);
        }
        let timeout = self.timeout;
        if self.rank == 0 {
            let mut all = vec![bytes.to_vec()];
            for (i, s) in self.peers.iter_mut().enumerate() {
                all.push(read_frame(s, &format!("rank {}", i + 1), timeout)?);
            }
            for (i, s) in self.peers.iter_mut().enumerate() {
                for b in &all {
                    write_frame(s, b, &format!("rank {}", i + 1), timeout)?;
                }
            }
            Ok(all)
        } else {
            let s = &mut self.peers[0];
            write_frame(s, bytes, "rank 0", timeout)?;
            (0..self.world)
                .map(|_| read_frame(s, "rank 0", timeout))
                .collect()
        }
    }
}

/// `t` itself when it is a contiguous CPU tensor, else a contiguous CPU copy.
fn host_view(t: &Tensor) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    Ok(if t.device() == Device::Cpu && t.is_contiguous() {
        t.shallow_clone()
    } else {
        t.f_to_device(Device::Cpu)?.f_contiguous()?
    })
}

fn add_f32(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.chunks_exact_mut(4).zip(other.chunks_exact(4)) {
        let x = f32::from_le_bytes([a[0], a[1], a[2], a[3]])
            + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        a.copy_from_slice(&x.to_le_bytes());
    }
}

fn configure(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(timeout)))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| err(format!("configuring a peer connection: {e}")))
}

fn io(peer: &str, timeout: Duration) -> impl Fn(std::io::Error) -> SyncError + '_ {
    move |e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            err(format!("{peer} did not answer within {timeout:?}"))
        } else {
            err(format!("{peer}: {e}"))
        }
    }
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8], peer: &str, timeout: Duration) -> Result<()> {
    s.read_exact(buf).map_err(io(peer, timeout))
}

fn write_all(s: &mut TcpStream, buf: &[u8], peer: &str, timeout: Duration) -> Result<()> {
    s.write_all(buf).map_err(io(peer, timeout))
}

fn read_u64(s: &mut TcpStream, peer: &str, timeout: Duration) -> Result<u64> {
    let mut b = [0u8; 8];
    read_exact(s, &mut b, peer, timeout)?;
    Ok(u64::from_le_bytes(b))
}

/// Frames longer than this are refused (a frame is a header or an id, never weights).
const MAX_FRAME: usize = 64 << 20;

fn read_frame(s: &mut TcpStream, peer: &str, timeout: Duration) -> Result<Vec<u8>> {
    let n = read_u64(s, peer, timeout)? as usize;
    if n > MAX_FRAME {
        return Err(err(format!("{peer} sent a frame of {n} bytes")));
    }
    let mut b = vec![0u8; n];
    read_exact(s, &mut b, peer, timeout)?;
    Ok(b)
}

fn write_frame(s: &mut TcpStream, bytes: &[u8], peer: &str, timeout: Duration) -> Result<()> {
    write_all(s, &(bytes.len() as u64).to_le_bytes(), peer, timeout)?;
    write_all(s, bytes, peer, timeout)
}

// ---- `nccl` weight sync: the trainer's side and the generators' side ----

/// How long joining a sync group, or one broadcast, may take before it fails.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a generator joins the trainer's sync group: rank 0's address, the group's size and
/// epoch (a new epoch is a new group), and this generator's rank (set per generator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    pub addr: String,
    pub world: usize,
    pub epoch: u64,
    pub rank: usize,
}

/// The trainer's side of a sync group (rank 0): opened for an epoch, joined by the generators on
/// the first broadcast, kept for the next ones; dropped after an error.
pub struct BroadcastHost {
    epoch: u64,
    world: usize,
    addr: String,
    listener: Option<TcpListener>,
    group: Option<Group>,
}

impl BroadcastHost {
    /// Listens on `host` (any port) for a group of `world` ranks.
    pub fn open(host: &str, world: usize, epoch: u64) -> Result<Self> {
        let (l, addr) = Group::listen(&format!("{host}:0"))?;
        Ok(BroadcastHost {
            epoch,
            world,
            addr,
            listener: Some(l),
            group: None,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sends version `version` (`flat`, the flat buffer) to every generator of the group: a header
    /// (version, elements, dtype), then the bytes. The first call accepts the generators.
    pub fn send(&mut self, version: u64, flat: &Tensor) -> Result<SyncReport> {
        let t0 = Instant::now();
        let res = self.send_inner(version, flat);
        if res.is_err() {
            // Close every connection: the generators fail now instead of at their timeout.
            self.group = None;
            self.listener = None;
        }
        res?;
        Ok(SyncReport {
            bytes: (flat.numel() * flat.kind().elt_size_in_bytes()) as u64,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    fn send_inner(&mut self, version: u64, flat: &Tensor) -> Result<()> {
        if self.group.is_none() {
            let l = self.listener.take().ok_or_else(|| {
                err(format!(
                    "the sync group of epoch {} at {} failed before: open a new one",
                    self.epoch, self.addr
                ))
            })?;
            let mut g = Group::accept(&l, self.world, SYNC_TIMEOUT)?;
            g.settle_transport(flat.device())?;
            self.group = Some(g);
        }
        let g = self.group.as_mut().expect("joined above");
        let header = format!("{version} {} {}", flat.numel(), kind_name(flat.kind()));
        g.broadcast_frame(Some(header.as_bytes()))?;
        g.broadcast(flat)?;
        // Every generator acknowledges the version: a dead one fails the send here.
        let acks = g.all_gather(&version.to_le_bytes())?;
        match acks.iter().position(|a| a[..] != version.to_le_bytes()) {
            Some(r) => Err(err(format!("rank {r} acknowledged another version"))),
            None => Ok(()),
        }
    }
}

/// The group this generator process belongs to (one trainer per process), with its ref.
static MEMBER: Mutex<Option<(GroupRef, Group)>> = Mutex::new(None);

/// Receives version `r.version` broadcast in the group `g` (joining it first when it is not the
/// group this process is in) into `spare` when it fits (right size and dtype, on the transport's
/// device), else into a new buffer on `device` (NCCL) or the CPU (TCP).
pub fn receive_broadcast(
    r: &WeightsRef,
    g: &GroupRef,
    spare: Option<Tensor>,
    device: Device,
) -> Result<(MappedWeights, SyncReport)> {
    let t0 = Instant::now();
    let mut member = MEMBER
        .lock()
        .map_err(|_| err("the sync group's lock was poisoned"))?;
    let res = (|| {
        if member.as_ref().map(|(joined, _)| joined) != Some(g) {
            *member = None;
            let mut group = Group::connect(&g.addr, g.rank, g.world, SYNC_TIMEOUT, false)?;
            group.settle_transport(device)?;
            *member = Some((g.clone(), group));
        }
        let (_, group) = member.as_mut().expect("joined above");
        let header = String::from_utf8(group.broadcast_frame(None)?)
            .map_err(|_| err("a header that is not text"))?;
        let parts: Vec<&str> = header.split(' ').collect();
        let (version, numel, kind) = match parts.as_slice() {
            [v, n, k] => (
                v.parse::<u64>().ok(),
                n.parse::<i64>().ok(),
                kind_from_name(k),
            ),
            _ => (None, None, None),
        };
        let (Some(version), Some(numel), Some(kind)) = (version, numel, kind) else {
            return Err(err(format!("a malformed header `{header}`")));
        };
        if version != r.version || numel as u64 != r.numel || kind != r.kind {
            return Err(err(format!(
                "rank 0 sends version {version} ({numel} x {}), version {} ({} x {}) was expected",
                kind_name(kind),
                r.version,
                r.numel,
                kind_name(r.kind)
            )));
        }
        let on = if group.has_nccl() {
            device
        } else {
            Device::Cpu
        };
        let buf = match spare {
            Some(t)
                if t.device() == on
                    && t.kind() == kind
                    && t.numel() as i64 == numel
                    && t.is_contiguous() =>
            {
                t
            }
            _ => Tensor::f_empty([numel], (kind, on))?,
        };
        group.broadcast(&buf)?;
        group.all_gather(&version.to_le_bytes())?;
        Ok(buf)
    })();
    match res {
        Ok(buf) => Ok((
            MappedWeights::owned(buf),
            SyncReport {
                bytes: r.numel * r.kind.elt_size_in_bytes() as u64,
                seconds: t0.elapsed().as_secs_f64(),
            },
        )),
        Err(e) => {
            *member = None;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    const T: Duration = Duration::from_secs(30);

    #[test]
    fn three_ranks_sum_in_rank_order_broadcast_and_gather() {
        let addr = free_addr();
        let n = (BUCKET_BYTES / 4) + 1000; // two buckets
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = Group::join(rank, 3, &addr, T).unwrap();
                    c.settle_transport(Device::Cpu).unwrap();
                    let mut t =
                        Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0);
                    c.all_reduce_sum(&mut t).unwrap();
                    let g = c.all_gather(format!("r{rank}").as_bytes()).unwrap();
                    let b = if rank == 0 {
                        Tensor::arange(n as i64, (Kind::BFloat16, Device::Cpu))
                    } else {
                        Tensor::zeros([n as i64], (Kind::BFloat16, Device::Cpu))
                    };
                    c.broadcast(&b).unwrap();
                    (t, g, b)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want = Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * 6.0;
        for (t, g, b) in &out {
            assert!(t.equal(&out[0].0), "every rank gets the same bits");
            assert!(t.allclose(&want, 0.0, 1e-3, false));
            assert_eq!(g, &vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
            assert!(b.equal(&out[0].2), "the broadcast reached every rank");
        }
        assert!(out[1].2.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn a_rank_outside_the_group_is_refused() {
        // Not waiting for the timeout: a peer that connects and sends a bad rank fails at once.
        let addr = free_addr();
        let a2 = addr.clone();
        let h = std::thread::spawn(move || Group::join(0, 2, &a2, T));
        let e = loop {
            if let Ok(g) = Group::connect(&addr, 7, 2, T, false) {
                break g;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let msg = h.join().unwrap().err().unwrap().to_string();
        assert!(msg.contains("rank 7 joined a group of 2"), "{msg}");
        drop(e);
    }

    #[test]
    fn a_generator_receives_versions_and_a_lost_trainer_fails_it_at_once() {
        let mut host = BroadcastHost::open("127.0.0.1", 2, 1).unwrap();
        let g = GroupRef {
            addr: host.addr().to_string(),
            world: 2,
            epoch: 1,
            rank: 1,
        };
        let flat = Tensor::randn([1000], (Kind::Float, Device::Cpu));
        let r = |version| WeightsRef {
            version,
            path: Default::default(),
            numel: 1000,
            kind: Kind::Float,
            checksums: vec![],
            adapters: false,
            source: None,
            group: None,
        };
        let f2 = flat.shallow_clone();
        let sender = std::thread::spawn(move || {
            host.send(1, &f2).unwrap();
            host.send(2, &(&f2 * 2.0)).unwrap();
            host
        });
        let (a, _) = receive_broadcast(&r(1), &g, None, Device::Cpu).unwrap();
        assert!(a.tensor.equal(&flat));
        // The second version arrives in the spare buffer it is given.
        let spare = a.into_spare().unwrap();
        let ptr = spare.data_ptr();
        let (b, report) = receive_broadcast(&r(2), &g, Some(spare), Device::Cpu).unwrap();
        assert_eq!(b.tensor.data_ptr(), ptr);
        assert!(b.tensor.equal(&(&flat * 2.0)));
        assert_eq!(report.bytes, 4000);
        let host = sender.join().unwrap();
        // The trainer goes away before the next version: the generator fails at once, naming it.
        drop(host);
        let t0 = Instant::now();
        let e = receive_broadcast(&r(3), &g, None, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank 0"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // A version other than the one announced is refused.
        let mut host = BroadcastHost::open("127.0.0.1", 2, 2).unwrap();
        let g2 = GroupRef {
            addr: host.addr().to_string(),
            epoch: 2,
            ..g
        };
        let s = std::thread::spawn(move || host.send(5, &flat).map(|_| ()));
        let e = receive_broadcast(&r(4), &g2, None, Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("sends version 5") && e.contains("version 4"),
            "{e}"
        );
        let _ = s.join();
    }
}
