//! Data parallelism across trainer processes: each rank back-propagates its share of every
//! mini-batch's micro-batches (balanced by tokens) with the loss normalised over the whole
//! mini-batch, then the ranks sum their gradients ([`Collective::all_reduce_sum`]) and take the
//! same optimizer step, so a run at world size N computes what world size 1 does (up to the order
//! of floating-point sums).
//!
//! The transport here is TCP (any network, CPU or GPU buffers staged through host memory): rank 0
//! listens at the rendezvous address, the others connect; a sum goes through rank 0 in buckets,
//! added in rank order so every rank gets bitwise the same result. Every wait has a timeout and
//! fails naming the peer instead of hanging. NCCL would replace this transport on GPUs (not built).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

/// This trainer's place in a data-parallel group (`TrainerConfig::data_parallel`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataParallel {
    pub rank: usize,
    pub world: usize,
    /// Where rank 0 listens for the others (host:port).
    pub rendezvous: String,
}

/// Bytes per bucket of a gradient sum.
const BUCKET_BYTES: usize = 32 << 20;
/// How long any wait for a peer may take (joining, or one bucket).
const PEER_TIMEOUT: Duration = Duration::from_secs(600);

/// A connected data-parallel group.
pub struct Collective {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.. in rank order; other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
}

fn err(m: String) -> TrainError {
    TrainError::Invalid(format!("data parallel: {m}"))
}

impl Collective {
    /// Joins the group of `dp` (rank 0 accepts the others; the others retry until rank 0 listens),
    /// within `PEER_TIMEOUT`.
    pub fn join(dp: &DataParallel) -> Result<Self> {
        let deadline = Instant::now() + PEER_TIMEOUT;
        let addr = &dp.rendezvous;
        let mut peers: Vec<(usize, TcpStream)> = Vec::new();
        if dp.rank == 0 {
            let l = TcpListener::bind(addr).map_err(|e| err(format!("binding {addr}: {e}")))?;
            l.set_nonblocking(true)
                .map_err(|e| err(format!("listening on {addr}: {e}")))?;
            while peers.len() + 1 < dp.world {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                        configure(&s)?;
                        let r = read_u64(&mut s, "a joining rank")? as usize;
                        if r == 0 || r >= dp.world || peers.iter().any(|(p, _)| *p == r) {
                            return Err(err(format!("rank {r} joined a group of {}", dp.world)));
                        }
                        peers.push((r, s));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<usize> = (1..dp.world)
                                .filter(|r| !peers.iter().any(|(p, _)| p == r))
                                .collect();
                            return Err(err(format!(
                                "ranks {missing:?} did not join at {addr} within {PEER_TIMEOUT:?}"
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(err(format!("accepting at {addr}: {e}"))),
                }
            }
            peers.sort_by_key(|(r, _)| *r);
        } else {
            let mut s = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(err(format!(
                            "rank {} could not reach rank 0 at {addr}: {e}",
                            dp.rank
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            configure(&s)?;
            write_all(&mut s, &(dp.rank as u64).to_le_bytes(), "rank 0")?;
            peers.push((0, s));
        }
        Ok(Collective {
            rank: dp.rank,
            world: dp.world,
            peers: peers.into_iter().map(|(_, s)| s).collect(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `t` (a contiguous f32 tensor, any device) over the ranks, in place; every rank gets
    /// the same bits (rank 0 adds the ranks' buffers in rank order).
    pub fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        let host = if t.device() == Device::Cpu && t.is_contiguous() {
            t.shallow_clone()
        } else {
            t.f_to_device(Device::Cpu)?.f_contiguous()?
        };
        if host.kind() != Kind::Float {
            return Err(err(format!("sums f32 buffers, got {:?}", host.kind())));
        }
        let n = host.numel() * 4;
        // SAFETY: a contiguous CPU f32 tensor of `n` bytes that only this call touches meanwhile.
        let buf = unsafe { std::slice::from_raw_parts_mut(host.data_ptr() as *mut u8, n) };
        let mut theirs = vec![0u8; BUCKET_BYTES.min(n)];
        for start in (0..n).step_by(BUCKET_BYTES) {
            let bucket = &mut buf[start..(start + BUCKET_BYTES).min(n)];
            if self.rank == 0 {
                for (i, s) in self.peers.iter_mut().enumerate() {
                    let got = &mut theirs[..bucket.len()];
                    read_exact(s, got, &format!("rank {}", i + 1))?;
                    add_f32(bucket, got);
                }
                for (i, s) in self.peers.iter_mut().enumerate() {
                    write_all(s, bucket, &format!("rank {}", i + 1))?;
                }
            } else {
                let s = &mut self.peers[0];
                write_all(s, bucket, "rank 0")?;
                read_exact(s, bucket, "rank 0")?;
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
        if self.rank == 0 {
            let mut all = vec![bytes.to_vec()];
            for (i, s) in self.peers.iter_mut().enumerate() {
                all.push(read_frame(s, &format!("rank {}", i + 1))?);
            }
            for (i, s) in self.peers.iter_mut().enumerate() {
                for b in &all {
                    write_frame(s, b, &format!("rank {}", i + 1))?;
                }
            }
            Ok(all)
        } else {
            let s = &mut self.peers[0];
            write_frame(s, bytes, "rank 0")?;
            (0..self.world).map(|_| read_frame(s, "rank 0")).collect()
        }
    }
}

/// The micro-batches (by index into `micro_tokens`) rank `rank` of `world` takes: each goes to
/// the rank with the fewest tokens so far (ties: the lower rank), in order.
pub fn share(micro_tokens: &[usize], rank: usize, world: usize) -> Vec<usize> {
    let mut load = vec![0usize; world.max(1)];
    let mut mine = Vec::new();
    for (i, &t) in micro_tokens.iter().enumerate() {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[r] += t;
        if r == rank {
            mine.push(i);
        }
    }
    mine
}

fn add_f32(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.chunks_exact_mut(4).zip(other.chunks_exact(4)) {
        let x = f32::from_le_bytes([a[0], a[1], a[2], a[3]])
            + f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        a.copy_from_slice(&x.to_le_bytes());
    }
}

fn configure(s: &TcpStream) -> Result<()> {
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(PEER_TIMEOUT)))
        .and_then(|()| s.set_write_timeout(Some(PEER_TIMEOUT)))
        .map_err(|e| err(format!("configuring a peer connection: {e}")))
}

fn io(peer: &str) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            err(format!("{peer} did not answer within {PEER_TIMEOUT:?}"))
        } else {
            err(format!("{peer}: {e}"))
        }
    }
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8], peer: &str) -> Result<()> {
    s.read_exact(buf).map_err(io(peer))
}

fn write_all(s: &mut TcpStream, buf: &[u8], peer: &str) -> Result<()> {
    s.write_all(buf).map_err(io(peer))
}

fn read_u64(s: &mut TcpStream, peer: &str) -> Result<u64> {
    let mut b = [0u8; 8];
    read_exact(s, &mut b, peer)?;
    Ok(u64::from_le_bytes(b))
}

fn read_frame(s: &mut TcpStream, peer: &str) -> Result<Vec<u8>> {
    let n = read_u64(s, peer)? as usize;
    let mut b = vec![0u8; n];
    read_exact(s, &mut b, peer)?;
    Ok(b)
}

fn write_frame(s: &mut TcpStream, bytes: &[u8], peer: &str) -> Result<()> {
    write_all(s, &(bytes.len() as u64).to_le_bytes(), peer)?;
    write_all(s, bytes, peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[test]
    fn three_ranks_sum_in_rank_order_and_gather() {
        let addr = free_addr();
        let n = (BUCKET_BYTES / 4) + 1000; // two buckets
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let dp = DataParallel {
                        rank,
                        world: 3,
                        rendezvous: addr,
                    };
                    let mut c = Collective::join(&dp).unwrap();
                    let mut t =
                        Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0);
                    c.all_reduce_sum(&mut t).unwrap();
                    let g = c.all_gather(format!("r{rank}").as_bytes()).unwrap();
                    (t, g)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want = Tensor::arange(n as i64, (Kind::Float, Device::Cpu)) * 6.0;
        for (t, g) in &out {
            assert!(t.equal(&out[0].0), "every rank gets the same bits");
            assert!(t.allclose(&want, 0.0, 1e-3, false));
            assert_eq!(g, &vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
        }
    }

    #[test]
    fn shares_balance_tokens_and_cover_every_micro_batch_once() {
        let tokens = [100, 10, 10, 10, 90, 5];
        let a = share(&tokens, 0, 2);
        let b = share(&tokens, 1, 2);
        assert_eq!(a, vec![0, 5]);
        assert_eq!(b, vec![1, 2, 3, 4]);
        assert_eq!(share(&tokens, 0, 1), (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn a_rank_outside_the_group_is_refused() {
        // Not waiting PEER_TIMEOUT here: a peer that connects and sends a bad rank fails at once.
        let addr = free_addr();
        let a2 = addr.clone();
        let h = std::thread::spawn(move || {
            Collective::join(&DataParallel {
                rank: 0,
                world: 2,
                rendezvous: a2,
            })
        });
        let mut s = loop {
            if let Ok(s) = TcpStream::connect(&addr) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        s.write_all(&7u64.to_le_bytes()).unwrap();
        let e = h.join().unwrap().err().unwrap().to_string();
        assert!(e.contains("rank 7 joined a group of 2"), "{e}");
    }
}
