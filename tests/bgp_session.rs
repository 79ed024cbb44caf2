//! The speaker against a scripted bad peer on 127.0.0.1: a malformed UPDATE, a peer that
//! stops answering and an unexpected OPEN each reset the session with the right NOTIFICATION,
//! the speaker reconnects with backoff, and the counters say what happened.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use egressguard::bgp::wire::{self, msg};
use egressguard::bgp::{SessionState, Speaker, SpeakerHandle};
use egressguard::messages::DesiredBlocks;
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
    let ours = wire::encode_open(
        65002,
        3,
        "127.0.0.2".parse().unwrap(),
        &[Family::Ipv4Flowspec],
    );
    s.write_all(&ours).await.unwrap();
    s.write_all(&wire::encode_keepalive()).await.unwrap();
    let k = read_msg(&mut s).await.expect("KEEPALIVE");
    assert_eq!(k[18], msg::KEEPALIVE);
    // Initial table (empty) ends with End-of-RIB for IPv4 flowspec.
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
    s
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
    let (tx, rx) = watch::channel(Arc::new(DesiredBlocks::default()));
    (Speaker::spawn(bgp_policy(port), rx), tx)
}

#[tokio::test]
async fn bad_peers_get_the_right_notification_and_the_speaker_reconnects() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (h, _tx) = speaker(port);

    // 1. A malformed UPDATE: attribute length runs past the end -> 3/5.
    let mut s = establish(&l).await;
    assert_eq!(h.stats()[0].state, SessionState::Established);
    let bad = wire::frame(msg::UPDATE, &[0, 0, 0, 4, 0x40, 1, 9, 0]);
    s.write_all(&bad).await.unwrap();
    assert_eq!(notification(&mut s).await, (3, 5));

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
