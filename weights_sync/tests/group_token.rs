//! A sync group checks the run's token (its own process: the token is process-wide): a peer
//! presenting another is refused, and rank 0 says so.

use std::time::Duration;

use rlrun_weights_sync::group::Group;

#[test]
fn a_peer_with_a_wrong_token_is_refused() {
    rlrun_weights_sync::net::set_client_token("the-run-token");
    let (l, addr) = Group::listen("127.0.0.1:0").unwrap();
    let host = std::thread::spawn(move || Group::accept(&l, 2, Duration::from_secs(20)));
    // A stranger: rank 1, but the wrong token (written by hand: this process's is the right one).
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(&1u64.to_le_bytes()).unwrap();
    s.write_all(&5u64.to_le_bytes()).unwrap();
    s.write_all(b"guess").unwrap();
    let e = host.join().unwrap().err().unwrap().to_string();
    assert!(e.contains("wrong token"), "{e}");
    // The right token joins.
    let (l, addr) = Group::listen("127.0.0.1:0").unwrap();
    let host = std::thread::spawn(move || Group::accept(&l, 2, Duration::from_secs(20)));
    let peer = Group::connect(&addr, 1, 2, Duration::from_secs(20), false).unwrap();
    let g = host.join().unwrap().unwrap();
    assert_eq!((g.rank(), g.world(), peer.rank()), (0, 2, 1));
}
