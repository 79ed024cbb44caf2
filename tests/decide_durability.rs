//! Nothing decided is lost: restart and reboot restore exactly the holds that still apply,
//! a `kill -9` in the middle of a burst of decisions loses no committed block and duplicates
//! none, and a damaged or unreadable database is a clear error, never a fresh start.

#[path = "decide_util/mod.rs"]
mod util;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egressguard::decide::{Decider, InfraSet, ReconnectResult, Refusal};
use egressguard::messages::{BlockKind, Category, Cause, Time};
use egressguard::policy::Policy;
use egressguard::state::{StateError, Store, actions};
use ipnet::IpNet;
use util::*;

fn open(path: &Path, p: Arc<Policy>, now: Time) -> Decider {
    Decider::new(p, Store::open(path).unwrap(), InfraSet::default(), now).unwrap()
}

#[test]
fn restart_and_reboot_restore_exactly_the_holds_that_still_apply() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let p = policy("");
    let before = {
        let mut d = open(&path, p.clone(), at(0));
        d.on_detection(&detection("203.0.113.10", Category::PortScan, at(10)))
            .unwrap(); // quarantine 1h
        d.on_detection(&detection("203.0.113.11", Category::NetworkScan, at(11)))
            .unwrap(); // block
        d.on_operator_block(
            net("203.0.113.12"),
            "ticket 5",
            Some(Duration::from_secs(2 * HOUR)),
            "alice",
            at(12),
        )
        .unwrap();
        d.on_operator_block(net("198.51.100.13"), "ticket 6", None, "alice", at(13))
            .unwrap();
        d.desired()
    };
    assert_eq!(before.blocks.len(), 4);

    // Restart (or reboot: the nft table is empty, the desired set comes from the database).
    {
        let mut d = open(&path, p.clone(), at(30 * 60));
        let startup = d.take_startup_decisions();
        assert_eq!(startup.len(), 4);
        assert!(startup.iter().all(|s| s.cause == Cause::Restore));
        assert_eq!(d.desired().blocks, before.blocks);
        assert!(d.desired().generation > 0);
    }

    // Three hours later: the quarantine and the 2 h operator block ran out while down.
    let mut d = open(&path, p.clone(), at(3 * HOUR));
    let startup = d.take_startup_decisions();
    let expired: BTreeSet<IpNet> = startup
        .iter()
        .filter(|s| s.cause == Cause::Expiry)
        .map(|s| s.target)
        .collect();
    assert_eq!(
        expired,
        BTreeSet::from([net("203.0.113.10"), net("203.0.113.12")])
    );
    let mut expected = before.blocks.clone();
    expected.remove(&net("203.0.113.10"));
    expected.remove(&net("203.0.113.12"));
    assert_eq!(d.desired().blocks, expected);
    let audit = d.store().audit(Some(net("203.0.113.10")), 10).unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.entry.action, actions::EXPIRE);
    assert_eq!(last.entry.reason, "expired while the agent was not running");
    // The offense history survived: the next offense of .10 is its second.
    let b = d
        .on_detection(&detection("203.0.113.10", Category::PortScan, at(4 * HOUR)))
        .unwrap();
    assert_eq!((b[0].kind, b[0].offense), (Some(BlockKind::Block), 2));
    // And the expired ones stay gone on the next start.
    drop(d);
    let d = open(&path, p, at(5 * HOUR));
    assert_eq!(d.desired().blocks.len(), 3);
    assert_eq!(d.store().active_blocks(at(5 * HOUR)).unwrap().len(), 3);
}

#[test]
fn used_tickets_and_terminations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let a = "203.0.113.7";
    let p = policy(&format!(
        "reconnect:\n{}",
        reconnect_entry(a, "ABUSE-1", ALL_CONDITIONS, FAR, false)
    ));
    {
        let mut d = open(&path, policy(""), at(0));
        d.on_detection(&detection(a, Category::NetworkScan, at(10)))
            .unwrap(); // block
        let out = d.on_policy(p.clone(), at(HOUR)).unwrap();
        assert_eq!(out.reconnects[0].result, ReconnectResult::Applied);
        d.on_detection(&detection(a, Category::NetworkScan, at(2 * HOUR)))
            .unwrap(); // offense 2: block
        d.on_operator_unblock(net(a), "T", "alice", at(3 * HOUR))
            .unwrap();
        let t = d
            .on_detection(&detection(a, Category::NetworkScan, at(4 * HOUR)))
            .unwrap(); // 3: terminate
        assert_eq!(t[0].kind, Some(BlockKind::Terminate));
    }
    // Started again with the same file: the ticket is used, the termination holds.
    let d = open(&path, p, at(5 * HOUR));
    assert!(matches!(
        d.status().last_reconnect_outcomes[0].result,
        ReconnectResult::Refused(Refusal::UsedBefore { .. })
    ));
    assert_eq!(d.desired().blocks[&net(a)].kind, BlockKind::Terminate);
    assert_eq!(d.history(net(a)).unwrap().terminations.len(), 1);
}

const CHILD_DB: &str = "EGRESSGUARD_TEST_BURST_DB";
const CHILD_OPEN: &str = "EGRESSGUARD_TEST_OPEN_DB";

fn burst_policy() -> Arc<Policy> {
    policy(
        "circuit_breaker:\n  max_new_blocks_per_minute: 4000000000\n  max_blocks_per_network: 4000000000\n",
    )
}

/// Not a test by itself: the child process of `kill_9_during_a_burst_loses_nothing`. Writes
/// decisions in a loop and prints each target once its batch is committed.
#[test]
fn child_burst_writer() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let store = Store::open(Path::new(&path)).unwrap();
    let start = store.blocks().unwrap().len() as u64;
    let base = Time::from_secs(T0).as_nanos() / 1_000_000 + start;
    let mut d = Decider::new(
        burst_policy(),
        store,
        InfraSet::default(),
        Time::from_millis(base),
    )
    .unwrap();
    let out = std::io::stdout();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..200_000u64 {
        let n = start + i;
        let addr = format!("100.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255);
        let ds = d
            .on_detection(&detection(
                &addr,
                Category::PortScan,
                Time::from_millis(base + i),
            ))
            .unwrap();
        assert_eq!(ds.len(), 1);
        let mut o = out.lock();
        writeln!(o, "committed {}", ds[0].target).unwrap();
        o.flush().unwrap();
        if Instant::now() > deadline {
            break;
        }
    }
}

#[test]
fn kill_9_during_a_burst_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let exe = std::env::current_exe().unwrap();
    let mut reported: Vec<IpNet> = Vec::new();
    for kill_after in [37usize, 211, 5, 400] {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_burst_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DB, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut round = 0;
        while let Some(Ok(line)) = lines.next() {
            // The first line shares its line with libtest's `test child_burst_writer ... `.
            if let Some((_, t)) = line.split_once("committed ") {
                reported.push(t.parse().unwrap());
                round += 1;
                if round == kill_after {
                    child.kill().unwrap(); // SIGKILL
                }
            }
        }
        let status = child.wait().unwrap();
        assert!(
            round >= kill_after,
            "child ended early after {round}: {status:?}"
        );
        assert!(status.code().is_none(), "child was not killed: {status:?}");
    }
    let store = Store::open(&path).unwrap();
    let blocks = store.blocks().unwrap();
    let stored: BTreeSet<IpNet> = blocks.iter().map(|b| b.target).collect();
    let unique: BTreeSet<IpNet> = reported.iter().copied().collect();
    assert_eq!(unique.len(), reported.len(), "a target was reported twice");
    let lost: Vec<&IpNet> = unique.difference(&stored).collect();
    assert!(lost.is_empty(), "committed but lost: {lost:?}");
    // At most one decision per kill may be committed and not yet reported.
    let extra: Vec<&IpNet> = stored.difference(&unique).collect();
    assert!(
        extra.len() <= 4,
        "{} stored, {} reported; extra {extra:?}",
        stored.len(),
        unique.len()
    );
    // No duplicates: one offense and one hold audit entry per target.
    assert_eq!(store.offense_count().unwrap(), stored.len() as u64);
    let holds = store
        .audit(None, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|a| a.entry.action == actions::HOLD)
        .count();
    assert_eq!(holds, stored.len());
    // And the decider restores all of them.
    let d = Decider::new(
        burst_policy(),
        store,
        InfraSet::default(),
        Time::from_secs(T0 + 600),
    )
    .unwrap();
    assert_eq!(d.desired().blocks.len(), stored.len());
}

fn assert_corrupt(path: &Path) {
    let err = Store::open(path).unwrap_err();
    assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("restore it from backup") && msg.contains("move it aside"),
        "{msg}"
    );
}

#[test]
fn garbage_bytes_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let garbage: Vec<u8> = (0..16_384u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    assert_corrupt(&path);
    // And the file was left as it was, for the operator to inspect.
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

fn populated(path: &Path) {
    let mut d = open(path, policy(""), at(0));
    for i in 0..200u64 {
        let a = format!("100.64.{}.{}", i / 256, i % 256);
        d.on_detection(&detection(&a, Category::NetworkScan, at(i)))
            .unwrap();
    }
}

#[test]
fn a_damaged_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    populated(&path);
    assert!(
        !dir.path().join("state.db-wal").exists()
            || std::fs::metadata(dir.path().join("state.db-wal"))
                .unwrap()
                .len()
                == 0
    );
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8 * 4096, "{}", bytes.len());
    for b in &mut bytes[3 * 4096..6 * 4096] {
        *b = 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();
    assert_corrupt(&path);
}

#[test]
fn a_damaged_header_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    populated(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..16].copy_from_slice(b"not a database!\0");
    std::fs::write(&path, &bytes).unwrap();
    assert_corrupt(&path);
}

#[test]
fn a_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Open { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

/// Not a test by itself: opens the database named by the environment and prints the error.
#[test]
fn child_open() {
    let Some(path) = std::env::var_os(CHILD_OPEN) else {
        return;
    };
    match Store::open(Path::new(&path)) {
        Ok(_) => println!("RESULT opened"),
        Err(e) => println!("RESULT {e} | {:?}", e),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn an_unreadable_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("state.db");
    populated(&path);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let output = if is_root() {
        // Root reads anything: ask an unprivileged user to open it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A copy of this test binary the unprivileged user can run wherever the checkout is.
        let exe = dir.path().join("decide_durability");
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(["--exact", "child_open", "--nocapture", "--test-threads=1"])
            .env(CHILD_OPEN, &path)
            .output()
            .expect("setpriv (util-linux) runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    } else {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        match Store::open(&path) {
            Ok(_) => "RESULT opened".to_owned(),
            Err(e) => format!("RESULT {e} | {e:?}"),
        }
    };
    let line = output
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|x| x.1))
        .unwrap_or_else(|| panic!("no result from the child: {output}"));
    assert!(line.contains("cannot open the state database"), "{line}");
    assert!(line.contains(&path.display().to_string()), "{line}");
}
