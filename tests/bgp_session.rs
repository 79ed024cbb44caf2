//! The speaker against a scripted bad peer on 127.0.0.1: a malformed UPDATE, a peer that
//! stops answering and an unexpected OPEN each reset the session with the right NOTIFICATION,
//! the speaker reconnects with backoff, and the counters say what happened.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use egressguard::bgp::wire::{self, msg};
use egressguard::bgp::{SessionState, Speaker, SpeakerHandle};
use egressguard::messages::{Announce, BlockKind, DesiredBlock, DesiredBlocks};
use egressguard::policy::{Family, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

async fn read_msg(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut h = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h))
        .await
        .ok()?
        .ok()?;
    let len = usize::from(u16::from_be_bytes([h[16], h[17]]));
    let mut m = h.to_vec();
    m.resize(len, 0);
    s.read_exact(&mut m[19..]).await.ok()?;
    Some(m)
}

/// Accepts the speaker and brings the session up; returns the stream once Established.
async fn establish(l: &TcpListener) -> TcpStream {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
        .await
        .expect("speaker connects")
        .expect("accept");
    let open = read_msg(&mut s).await.expect("OPEN");
    assert_eq!(open[18], msg::OPEN);
    s.write_all(&peer_open("127.0.0.2")).await.unwrap();
    finish(&mut s).await;
    s
}

/// The scripted peer's OPEN with BGP Identifier `id`.
fn peer_open(id: &str) -> Vec<u8> {
    wire::encode_open(65002, 3, id.parse().unwrap(), &[Family::Ipv4Flowspec])
}

/// OPENs exchanged: our KEEPALIVE, then (after the speaker's KEEPALIVEs) the empty initial
/// table's End-of-RIB, which the speaker only sends once Established.
async fn finish(s: &mut TcpStream) {
    s.write_all(&wire::encode_keepalive()).await.unwrap();
    // Initial table (empty) ends with End-of-RIB for IPv4 flowspec.
    loop {
        let m = read_msg(s).await.expect("End-of-RIB");
        assert!(matches!(m[18], msg::KEEPALIVE | msg::UPDATE), "{m:?}");
        if m[18] == msg::UPDATE {
            assert_eq!(
                wire::decode_update(&m, true).unwrap().end_of_rib,
                Some((1, 133))
            );
            break;
        }
    }
}

/// Reads until a NOTIFICATION arrives (KEEPALIVEs may come first); returns (code, subcode).
async fn notification(s: &mut TcpStream) -> (u8, u8) {
    loop {
        let m = read_msg(s).await.expect("NOTIFICATION before close");
        if m[18] == msg::NOTIFICATION {
            return (m[19], m[20]);
        }
    }
}

fn bgp_policy(port: u16) -> egressguard::policy::Bgp {
    let text = format!(
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\nbgp:\n  local_as: 65001\n  router_id: 127.0.0.1\n  peers:\n    - name: bad\n      address: 127.0.0.1\n      port: {port}\n      remote_as: 65002\n      hold_time: 3\n      families: [ipv4-flowspec]\n"
    );
    Policy::from_text(&text, Path::new("<t>"))
        .unwrap()
        .bgp
        .unwrap()
}

fn speaker(port: u16) -> (SpeakerHandle, watch::Sender<Arc<DesiredBlocks>>) {
    // Generation 1, as the daemon's first desired set: End-of-RIB waits for it.
    let (tx, rx) = watch::channel(Arc::new(DesiredBlocks {
        generation: 1,
        ..DesiredBlocks::default()
    }));
    (Speaker::spawn(bgp_policy(port), rx), tx)
}

#[tokio::test]
async fn bad_peers_get_the_right_notification_and_the_speaker_reconnects() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (h, _tx) = speaker(port);

    // 1. A malformed UPDATE: the MP_REACH attribute's length runs past the end, so its
    //    routes cannot be located -> 3/5 (RFC 7606 section 4 keeps this a session reset).
    //    Before it, a malformed ORIGIN only makes its UPDATE treat-as-withdraw: no reset.
    let mut s = establish(&l).await;
    assert_eq!(h.stats()[0].state, SessionState::Established);
    let withdraw = wire::frame(msg::UPDATE, &[0, 0, 0, 4, 0x40, 1, 1, 7]);
    s.write_all(&withdraw).await.unwrap();
    let bad = wire::frame(msg::UPDATE, &[0, 0, 0, 5, 0x80, 14, 9, 0, 1]);
    s.write_all(&bad).await.unwrap();
    assert_eq!(notification(&mut s).await, (3, 5));
    assert_eq!(h.stats()[0].treat_as_withdraw, 1);

    // 2. It reconnects; this time the peer goes silent -> hold timer expires -> 4/0.
    let mut s = establish(&l).await;
    assert_eq!(notification(&mut s).await, (4, 0));

    // 3. An OPEN in Established is an FSM error -> 5/3.
    let mut s = establish(&l).await;
    let again = wire::encode_open(
        65002,
        3,
        "127.0.0.2".parse().unwrap(),
        &[Family::Ipv4Flowspec],
    );
    s.write_all(&again).await.unwrap();
    assert_eq!(notification(&mut s).await, (5, 3));

    // 4. A bad marker -> 1/1.
    let mut s = establish(&l).await;
    let mut k = wire::encode_keepalive();
    k[0] = 0;
    s.write_all(&k).await.unwrap();
    assert_eq!(notification(&mut s).await, (1, 1));

    // 5. Shutdown sends CEASE 6/2. (Reconnects back off 1, 2, 4, 8 s: a flapping peer.)
    let mut s = establish(&l).await;
    let st = h.stats()[0].clone();
    assert_eq!(st.notifications_sent, 4, "{st:?}");
    assert_eq!(st.resets, 4, "{st:?}");
    assert_eq!(st.state, SessionState::Established);
    let stop = tokio::spawn({
        let h = h.clone();
        async move { h.shutdown().await }
    });
    assert_eq!(notification(&mut s).await, (6, 2));
    stop.await.unwrap();
    assert_eq!(h.stats().len(), 0);
}

#[tokio::test]
async fn policy_reload_restarts_changed_peers_and_ceases_removed_ones() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (h, _tx) = speaker(port);
    let mut s = establish(&l).await;

    // Same policy again: nothing happens to the session.
    h.update_policy(bgp_policy(port)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.stats()[0].state, SessionState::Established);

    // Changed peer: CEASE "other configuration change" (6/6), then a new session.
    let mut changed = bgp_policy(port);
    changed.peers[0].hold_time = 6;
    h.update_policy(changed.clone()).await;
    assert_eq!(notification(&mut s).await, (6, 6));
    let mut s = establish(&l).await;

    // Removed peer: CEASE "peer de-configured" (6/3), and no stats left for it.
    let mut none = changed;
    none.peers.clear();
    h.update_policy(none).await;
    assert_eq!(notification(&mut s).await, (6, 3));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.stats().is_empty());
    h.shutdown().await;
}

fn listening_policy(port: u16) -> egressguard::policy::Bgp {
    let mut p = bgp_policy(port);
    p.listen = Some("127.0.0.1:0".parse().unwrap());
    p
}

/// The speaker's bound listener port.
async fn listener_port(h: &SpeakerHandle) -> u16 {
    for _ in 0..100 {
        if let Some(a) = h.listener_stats().address {
            return a.port();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("speaker does not listen");
}

/// Both sides connect at once; the speaker's outbound connection (A) and the peer's inbound
/// one (B) both finish the OPEN exchange, A first. Returns (A, B) after both OPENs are out.
async fn collide(l: &TcpListener, h: &SpeakerHandle, peer_id: &str) -> (TcpStream, TcpStream) {
    let port = listener_port(h).await;
    let (mut a, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
        .await
        .expect("speaker connects")
        .expect("accept");
    assert_eq!(read_msg(&mut a).await.expect("OPEN on A")[18], msg::OPEN);
    let mut b = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(read_msg(&mut b).await.expect("OPEN on B")[18], msg::OPEN);
    a.write_all(&peer_open(peer_id)).await.unwrap();
    // A is in OpenConfirm on the speaker's side once its KEEPALIVE arrives.
    assert_eq!(
        read_msg(&mut a).await.expect("KEEPALIVE on A")[18],
        msg::KEEPALIVE
    );
    b.write_all(&peer_open(peer_id)).await.unwrap();
    (a, b)
}

#[tokio::test]
async fn collision_the_higher_identifier_keeps_the_connection_it_initiated() {
    // Peer 127.0.0.2 > speaker 127.0.0.1: the peer-initiated connection (B) survives, the
    // speaker's own (A) gets CEASE / Connection Collision Resolution.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = watch::channel(Arc::new(DesiredBlocks {
        generation: 1,
        ..DesiredBlocks::default()
    }));
    let h = Speaker::spawn(listening_policy(l.local_addr().unwrap().port()), rx);
    let (mut a, mut b) = collide(&l, &h, "127.0.0.2").await;
    assert_eq!(notification(&mut a).await, (6, 7));
    finish(&mut b).await;
    let st = h.stats()[0].clone();
    assert_eq!(st.state, SessionState::Established, "{st:?}");
    assert!(st.inbound, "the peer's connection survived: {st:?}");
    assert_eq!((st.collisions, st.resets), (1, 0), "{st:?}");

    // A third connection while Established: closed with 6/7, the session stays.
    let port = listener_port(&h).await;
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(read_msg(&mut c).await.expect("OPEN on C")[18], msg::OPEN);
    c.write_all(&peer_open("127.0.0.2")).await.unwrap();
    assert_eq!(notification(&mut c).await, (6, 7));
    assert_eq!(h.stats()[0].collisions, 2);
    assert_eq!(h.stats()[0].state, SessionState::Established);

    // Apply latency: a block goes out on the surviving connection and is measured.
    tx.send(one_block(1, "203.0.113.9/32", &[Announce::Flowspec]))
        .unwrap();
    loop {
        let m = read_msg(&mut b).await.expect("UPDATE");
        if m[18] == msg::UPDATE {
            assert_eq!(wire::decode_update(&m, true).unwrap().flow_reach.len(), 1);
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let st = h.stats()[0].clone();
    assert_eq!(st.applies, 1, "{st:?}");
    assert!(
        st.apply_latency_us
            .is_some_and(|us| us > 0 && us < 1_000_000),
        "{st:?}"
    );
    assert_eq!(st.apply_latency_sum_us, st.apply_latency_us.unwrap());
    h.shutdown().await;
}

/// Desired blocks of generation `generation`: one block of `target`, announced as `announce`.
fn one_block(generation: u64, target: &str, announce: &[Announce]) -> Arc<DesiredBlocks> {
    let target: ipnet::IpNet = target.parse().unwrap();
    Arc::new(DesiredBlocks {
        generation,
        blocks: [(
            target,
            DesiredBlock {
                target,
                kind: BlockKind::Block,
                expires: None,
                announce: announce.to_vec(),
                flowspec: None,
                except: vec![],
            },
        )]
        .into_iter()
        .collect(),
        ..DesiredBlocks::default()
    })
}

#[tokio::test]
async fn collision_the_lower_peer_identifier_loses_its_connection() {
    // Peer 10.0.0.1 < speaker 127.0.0.1: the speaker's connection (A) survives, the peer's
    // (B) is closed.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_tx, rx) = watch::channel(Arc::new(DesiredBlocks {
        generation: 1,
        ..DesiredBlocks::default()
    }));
    let h = Speaker::spawn(listening_policy(l.local_addr().unwrap().port()), rx);
    let (mut a, mut b) = collide(&l, &h, "10.0.0.1").await;
    assert_eq!(notification(&mut b).await, (6, 7));
    finish(&mut a).await;
    let st = h.stats()[0].clone();
    assert_eq!(st.state, SessionState::Established, "{st:?}");
    assert!(!st.inbound, "{st:?}");
    assert_eq!((st.collisions, st.resets), (1, 0), "{st:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn the_listener_refuses_unconfigured_sources() {
    // Nobody listens on the peer port: only the listener can bring a session up.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let (_tx, rx) = watch::channel(Arc::new(DesiredBlocks {
        generation: 1,
        ..DesiredBlocks::default()
    }));
    let h = Speaker::spawn(listening_policy(port), rx);
    let lport = listener_port(&h).await;
    // From 127.0.0.2: not a configured peer -> closed without a word, counted.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{lport}").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        read_msg(&mut s).await,
        None,
        "refused connections get no OPEN"
    );
    let ls = h.listener_stats();
    assert_eq!((ls.refused, ls.accepted), (1, 0), "{ls:?}");
    assert_eq!(ls.last_refused, Some("127.0.0.2".parse().unwrap()));
    // From the peer's address: accepted, and the session comes up.
    let mut s = TcpStream::connect(("127.0.0.1", lport)).await.unwrap();
    assert_eq!(read_msg(&mut s).await.expect("OPEN")[18], msg::OPEN);
    s.write_all(&peer_open("127.0.0.2")).await.unwrap();
    finish(&mut s).await;
    assert_eq!(h.stats()[0].state, SessionState::Established);
    assert!(h.stats()[0].inbound);
    assert_eq!(h.listener_stats().accepted, 1);
    h.shutdown().await;
}

/// The capability `code`'s value in an OPEN (whole message), if present.
fn capability(open: &[u8], code: u8) -> Option<Vec<u8>> {
    let params = &open[29..];
    let mut i = 0;
    while i + 2 <= params.len() {
        let (t, l) = (params[i], usize::from(params[i + 1]));
        let p = params.get(i + 2..i + 2 + l)?;
        if t == 2 {
            let mut j = 0;
            while j + 2 <= p.len() {
                let (c, cl) = (p[j], usize::from(p[j + 1]));
                if c == code {
                    return p.get(j + 2..j + 2 + cl).map(<[u8]>::to_vec);
                }
                j += 2 + cl;
            }
        }
        i += 2 + l;
    }
    None
}

#[tokio::test]
async fn graceful_restart_capability_end_of_rib_after_the_first_set_and_a_quiet_close() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    // Generation 0: the daemon has not restored its holds yet.
    let (tx, rx) = watch::channel(Arc::new(DesiredBlocks::default()));
    let h = Speaker::spawn(bgp_policy(port), rx);
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
        .await
        .unwrap()
        .unwrap();
    let open = read_msg(&mut s).await.expect("OPEN");
    // RFC 4724: Restart State set (first session since start), restart time 120 s (the
    // default), IPv4 flowspec with Forwarding State.
    assert_eq!(
        capability(&open, 64).expect("GR capability"),
        [0x80, 120, 0, 1, 133, 0x80]
    );
    // RFC 9494: IPv4 flowspec, Forwarding State, long-lived stale time 3600 s.
    assert_eq!(
        capability(&open, 71).expect("LLGR capability"),
        [0, 1, 133, 0x80, 0, 0x0e, 0x10]
    );
    // The peer is a graceful-restart helper (restart time 0, no families of its own).
    let peer = wire::encode_open_gr(
        65002,
        3,
        "127.0.0.2".parse().unwrap(),
        &[Family::Ipv4Flowspec],
        Some(wire::GrOffer {
            restart_time: 1,
            restarted: false,
            long_lived_stale_time: 0,
        }),
    );
    assert!(wire::decode_open(&peer).unwrap().graceful_restart.is_some());
    s.write_all(&peer).await.unwrap();
    s.write_all(&wire::encode_keepalive()).await.unwrap();
    // No End-of-RIB while the desired set is generation 0 (only KEEPALIVEs for 2 s).
    let quiet = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let m = read_msg(&mut s).await.expect("message");
            if m[18] != msg::KEEPALIVE {
                return m;
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "sent before the first desired set: {quiet:?}"
    );
    tx.send(Arc::new(DesiredBlocks {
        generation: 1,
        ..DesiredBlocks::default()
    }))
    .unwrap();
    loop {
        let m = read_msg(&mut s).await.expect("End-of-RIB");
        if m[18] == msg::UPDATE {
            assert_eq!(
                wire::decode_update(&m, true).unwrap().end_of_rib,
                Some((1, 133))
            );
            break;
        }
    }
    // The agent stops: no NOTIFICATION (that would end graceful restart), the TCP closes.
    h.shutdown().await;
    loop {
        match read_msg(&mut s).await {
            None => break,
            Some(m) => assert_eq!(m[18], msg::KEEPALIVE, "{m:?}"),
        }
    }
    assert_eq!(h.stats().len(), 0);
}

// Malformed NLRI (RFC 7606, RFC 4760 section 7, RFC 8955 section 4.2): crafted UPDATEs from
// a scripted peer that is trusted for flowspec and receives our RTBH and flowspec blocks.

use egressguard::bgp::LearnedRules;
use egressguard::bgp::flowspec::{Afi, block_nlri, traffic_rate};

fn learning_policy(port: u16) -> egressguard::policy::Bgp {
    let text = format!(
        "version: 1\nnetworks:\n  - prefix: 203.0.113.0/24\n  - prefix: 2001:db8::/32\nbgp:\n  local_as: 65001\n  router_id: 127.0.0.1\n  peers:\n    - name: fleet\n      address: 127.0.0.1\n      port: {port}\n      remote_as: 65002\n      hold_time: 3\n      families: [ipv4-unicast, ipv4-flowspec, ipv6-flowspec]\n      announce: [flowspec, rtbh]\n      rtbh_next_hop_v4: 192.0.2.66\n      accept_flowspec: true\n"
    );
    Policy::from_text(&text, Path::new("<t>"))
        .unwrap()
        .bgp
        .unwrap()
}

const ALL: [Family; 3] = [
    Family::Ipv4Unicast,
    Family::Ipv4Flowspec,
    Family::Ipv6Flowspec,
];

/// Accepts the speaker, brings the three-family session up and reads up to the End-of-RIB
/// of each family.
async fn establish_all(l: &TcpListener) -> TcpStream {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), l.accept())
        .await
        .expect("speaker connects")
        .expect("accept");
    assert_eq!(read_msg(&mut s).await.expect("OPEN")[18], msg::OPEN);
    s.write_all(&wire::encode_open(
        65002,
        3,
        "127.0.0.2".parse().unwrap(),
        &ALL,
    ))
    .await
    .unwrap();
    s.write_all(&wire::encode_keepalive()).await.unwrap();
    let mut eor = Vec::new();
    while eor.len() < ALL.len() {
        let m = read_msg(&mut s).await.expect("End-of-RIB");
        assert!(matches!(m[18], msg::KEEPALIVE | msg::UPDATE), "{m:?}");
        // Routes of the desired set may come before the End-of-RIB markers.
        if m[18] == msg::UPDATE {
            eor.extend(wire::decode_update(&m, true).unwrap().end_of_rib);
        }
    }
    eor.sort();
    assert_eq!(eor, [(1, 1), (1, 133), (2, 133)]);
    s
}

/// The scripted peer's UPDATE announcing discard rules for `sources` (one family).
fn announce(sources: &[&str]) -> Vec<u8> {
    let nlris: Vec<Vec<u8>> = sources
        .iter()
        .map(|s| block_nlri(&s.parse().unwrap(), None, &[]).encode().unwrap())
        .collect();
    let afi = if sources[0].contains(':') {
        Afi::Ipv6
    } else {
        Afi::Ipv4
    };
    let ctx = wire::PathCtx {
        local_as: 65002,
        ibgp: false,
        four_octet: true,
    };
    wire::flow_announce(&ctx, afi, traffic_rate(65002, 0.0), &[], &nlris)
        .unwrap()
        .concat()
}

/// An UPDATE with the mandatory attributes, a traffic-rate 0 community and `mp` (an
/// MP_REACH_NLRI or MP_UNREACH_NLRI attribute, whole).
fn update_with(mp: &[u8]) -> Vec<u8> {
    let mut attrs = vec![
        0x40, 1, 1, 0, 0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xea, 0xc0, 16, 8,
    ];
    attrs.extend_from_slice(&traffic_rate(65002, 0.0));
    attrs.extend_from_slice(mp);
    let mut b = vec![0, 0];
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(&attrs);
    wire::frame(msg::UPDATE, &b)
}

/// MP_REACH_NLRI of IPv4 flowspec (no next hop) with this NLRI field, whatever it holds.
fn mp_reach_v4(nlri: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 14, (5 + nlri.len()) as u8, 0, 1, 133, 0, 0];
    v.extend_from_slice(nlri);
    v
}

/// The sources of the rules learnt from the peer, sorted.
fn sources(l: &watch::Receiver<Arc<LearnedRules>>) -> Vec<String> {
    let mut v: Vec<String> = l.borrow().values().map(|r| r.source.to_string()).collect();
    v.sort();
    v
}

/// Waits (at most 5 s) until the learnt sources are `want`.
async fn learnt(l: &watch::Receiver<Arc<LearnedRules>>, want: &[&str]) {
    for _ in 0..250 {
        if sources(l) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sources(l), want);
}

/// Reads for `d`, answering each KEEPALIVE with one: only KEEPALIVEs may come (the session
/// stays up); returns how many.
async fn keepalives_only(s: &mut TcpStream, d: Duration) -> usize {
    let mut n = 0;
    let _ = tokio::time::timeout(d, async {
        loop {
            let m = read_msg(s).await.expect("the session stays up");
            assert_eq!(m[18], msg::KEEPALIVE, "only KEEPALIVEs: {m:?}");
            s.write_all(&wire::encode_keepalive()).await.unwrap();
            n += 1;
        }
    })
    .await;
    n
}

/// A speaker with the three-family, flowspec-learning peer, and the scripted peer's side of
/// its established session.
struct Learning {
    l: TcpListener,
    h: SpeakerHandle,
    tx: watch::Sender<Arc<DesiredBlocks>>,
    learned: watch::Receiver<Arc<LearnedRules>>,
    s: TcpStream,
}

impl Learning {
    async fn start() -> Learning {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, rx) = watch::channel(Arc::new(DesiredBlocks {
            generation: 1,
            ..DesiredBlocks::default()
        }));
        let h = Speaker::spawn(learning_policy(l.local_addr().unwrap().port()), rx);
        let learned = h.learned();
        let s = establish_all(&l).await;
        Learning {
            l,
            h,
            tx,
            learned,
            s,
        }
    }
}

#[tokio::test]
async fn a_malformed_flowspec_nlri_of_known_length_is_withdrawn_alone_and_the_session_stays() {
    let Learning {
        l: _l,
        h,
        tx,
        learned,
        mut s,
    } = Learning::start().await;
    s.write_all(&announce(&["203.0.113.1/32"])).await.unwrap();
    learnt(&learned, &["203.0.113.1/32"]).await;

    // One MP_REACH: a good rule, one with its components out of order (source, then
    // destination) but a consistent length, one with an unknown component type, a good one.
    let good = |a: &str| block_nlri(&a.parse().unwrap(), None, &[]).encode().unwrap();
    let nlri = [
        good("203.0.113.2/32"),
        vec![12, 0x02, 32, 203, 0, 113, 66, 0x01, 32, 198, 51, 100, 1],
        vec![3, 14, 0x81, 1],
        good("203.0.113.3/32"),
    ]
    .concat();
    s.write_all(&update_with(&mp_reach_v4(&nlri)))
        .await
        .unwrap();
    // A later UPDATE still counts.
    s.write_all(&announce(&["203.0.113.4/32"])).await.unwrap();
    learnt(
        &learned,
        &[
            "203.0.113.1/32",
            "203.0.113.2/32",
            "203.0.113.3/32",
            "203.0.113.4/32",
        ],
    )
    .await;
    // No NOTIFICATION: the KEEPALIVEs continue (hold time 3 s, one a second).
    assert!(keepalives_only(&mut s, Duration::from_millis(3500)).await >= 2);
    let st = h.stats()[0].clone();
    assert_eq!(st.state, SessionState::Established, "{st:?}");
    assert_eq!(
        (st.nlri_treat_as_withdraw, st.families_disabled),
        (2, 0),
        "{st:?}"
    );
    assert_eq!((st.notifications_sent, st.resets), (0, 0), "{st:?}");
    assert_eq!(st.learned, 4);
    drop(tx);
    h.shutdown().await;
}

#[tokio::test]
async fn an_nlri_that_cannot_be_located_disables_its_family_only_and_our_blocks_stay_announced() {
    let Learning {
        l,
        h,
        tx,
        learned,
        mut s,
    } = Learning::start().await;
    s.write_all(&announce(&["203.0.113.1/32"])).await.unwrap();
    s.write_all(&announce(&["2001:db8::1/128"])).await.unwrap();
    learnt(&learned, &["2001:db8::1/128", "203.0.113.1/32"]).await;

    // (b) IPv4 flowspec MP_REACH whose last NLRI claims 20 octets where 6 are left: the
    // attribute's length is right, its NLRI cannot be located. IPv4 flowspec is disabled:
    // the rule learnt in it goes, the IPv6 one stays.
    let nlri = [20, 0x02, 32, 203, 0, 113];
    s.write_all(&update_with(&mp_reach_v4(&nlri)))
        .await
        .unwrap();
    learnt(&learned, &["2001:db8::1/128"]).await;
    // Later IPv4 flowspec routes are ignored, IPv6 ones still learnt.
    s.write_all(&announce(&["203.0.113.3/32"])).await.unwrap();
    s.write_all(&announce(&["2001:db8::3/128"])).await.unwrap();
    learnt(&learned, &["2001:db8::1/128", "2001:db8::3/128"]).await;
    let st = h.stats()[0].clone();
    assert_eq!(st.state, SessionState::Established, "{st:?}");
    assert_eq!(st.families_disabled, 1, "{st:?}");
    assert_eq!(st.disabled_families.len(), 1, "{st:?}");
    assert_eq!(st.disabled_families[0].family, "ipv4-flowspec");
    assert_eq!(
        st.disabled_families[0].reason,
        "a flowspec NLRI length overruns the attribute"
    );
    assert_eq!(st.learned, 2, "{st:?}");

    // Our announcements still go to the peer, in the disabled family too: a block
    // announced as RTBH (IPv4 unicast) and as IPv4 flowspec.
    let target: ipnet::IpNet = "203.0.113.77/32".parse().unwrap();
    tx.send(one_block(
        2,
        "203.0.113.77/32",
        &[Announce::Flowspec, Announce::Rtbh],
    ))
    .unwrap();
    let (mut rtbh, mut flow) = (0, 0);
    while rtbh == 0 || flow == 0 {
        let m = read_msg(&mut s).await.expect("our UPDATEs");
        assert!(matches!(m[18], msg::KEEPALIVE | msg::UPDATE), "{m:?}");
        if m[18] == msg::KEEPALIVE {
            s.write_all(&wire::encode_keepalive()).await.unwrap();
        } else {
            let u = wire::decode_update(&m, true).unwrap();
            rtbh += u.unicast;
            flow += u
                .flow_reach
                .iter()
                .filter(|n| n.source() == Some(target))
                .count();
        }
    }
    assert!(keepalives_only(&mut s, Duration::from_millis(1500)).await >= 1);
    assert_eq!(h.stats()[0].notifications_sent, 0);

    // (c) Garbage where not even the AFI/SAFI can be read (an MP_UNREACH of 2 octets):
    // session reset, UPDATE Message Error / Optional Attribute Error.
    s.write_all(&update_with(&[0x80, 15, 2, 0, 2]))
        .await
        .unwrap();
    assert_eq!(notification(&mut s).await, (3, 9));
    // The next session starts with every family enabled again.
    let mut s = establish_all(&l).await;
    let st = h.stats()[0].clone();
    assert!(st.disabled_families.is_empty(), "{st:?}");
    assert_eq!(st.families_disabled, 1, "a counter over all sessions");
    s.write_all(&announce(&["203.0.113.5/32"])).await.unwrap();
    learnt(&learned, &["203.0.113.5/32"]).await;
    h.shutdown().await;
}
