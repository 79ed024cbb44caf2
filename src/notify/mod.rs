//! Alerts: the `notify` hook and the per-incident abuse reports.
//!
//! The decision task hands every [`Decision`] (with the evidence when a detection caused it)
//! to the [`Notifier`] through a bounded channel with `try_send`: a slow or failing hook never
//! holds up a decision. The notifier task then, for each notification:
//!
//! - for decisions that put an address on hold after a detection, writes an abuse report in
//!   X-ARF style (a MIME message an abuse desk can forward) into `notify.report_dir`;
//! - runs `notify.command` with the notification as one JSON document on stdin
//!   ([`Notification`], schema `egressguard.notify.v1`, documented in `docs/notify.md`),
//!   retrying up to `notify.retries` times with backoff (1 s, 2 s, 4 s, ...).
//!
//! Each run of the hook is its own process group (`setpgid(0, 0)`). The agent waits for the
//! hook's *exit status* (not for the end of its output, which a child it left in the
//! background still holds open), and kills the whole group when the hook exits (so nothing it
//! started is left behind) or when `notify.timeout` runs out (the hook and its children). A
//! hook that must leave something running starts it in a session of its own (`setsid`).
//!
//! Notifications about one address are delivered in order, one at a time; different
//! addresses are delivered concurrently, up to [`MAX_RUNNING`] at once, so a hook that hangs
//! delays only its own incident (by at most `timeout × (retries + 1)` plus the backoff),
//! never the next one's report.
//!
//! [`Notifier::set_config`] replaces the settings (a policy reload); deliveries that have
//! started finish with the settings they started with.
//!
//! A circuit breaker trip or re-arm goes to the hook too, as a [`BreakerNotification`]
//! (`"event": "breaker_tripped"` / `"breaker_rearmed"`); decisions carry
//! `"event": "decision"`.
//!
//! Counters of sent, failed and dropped notifications are shared for `status` and metrics.

mod report;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};

pub use report::xarf_report;

use crate::messages::{BreakerEvent, Decision, Evidence};
use crate::policy::Notify;

/// Schema name of the hook's stdin document.
pub const SCHEMA: &str = "egressguard.notify.v1";
/// Drops capabilities for the hook.
const SETPRIV: &str = "/usr/bin/setpriv";
/// Notifications that may wait in the channel before new ones are dropped; the dispatcher
/// holds as many again while their addresses' hooks run.
const QUEUE: usize = 1024;
/// Hooks (for different addresses) that may run at once.
pub const MAX_RUNNING: usize = 8;
/// How much of the hook's stderr is kept for the log.
const STDERR_KEPT: usize = 4096;

/// What the hook gets on stdin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// The router's host name.
    pub router: String,
    /// Digest of the policy in force.
    pub policy_version: String,
    /// What was decided.
    pub decision: Decision,
    /// Why, when a detection caused it.
    pub evidence: Option<Evidence>,
}

/// What the hook gets on stdin when a network entry's circuit breaker trips or re-arms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BreakerNotification {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// The router's host name.
    pub router: String,
    /// Digest of the policy in force.
    pub policy_version: String,
    /// What happened.
    pub breaker: BreakerEvent,
}

/// One document for the hook: its `event` field says which kind.
#[derive(Clone, Debug, PartialEq)]
enum Outgoing {
    Decision(Notification),
    Breaker(BreakerNotification),
}

impl Outgoing {
    /// The JSON document: the notification with its `event` kind.
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        #[derive(Serialize)]
        struct Tagged<'a, T: Serialize> {
            event: String,
            #[serde(flatten)]
            body: &'a T,
        }
        match self {
            Outgoing::Decision(n) => serde_json::to_vec(&Tagged {
                event: "decision".into(),
                body: n,
            }),
            Outgoing::Breaker(n) => serde_json::to_vec(&Tagged {
                event: format!("breaker_{}", n.breaker.change.as_str()),
                body: n,
            }),
        }
    }

    /// The address or network it is about, for logs.
    fn subject(&self) -> ipnet::IpNet {
        match self {
            Outgoing::Decision(n) => n.decision.target,
            Outgoing::Breaker(n) => n.breaker.network,
        }
    }
}

/// Shared counters.
#[derive(Debug, Default)]
pub struct NotifyStats {
    /// Hook runs that exited 0.
    pub sent: AtomicU64,
    /// Notifications whose every attempt failed.
    pub failed: AtomicU64,
    /// Notifications dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Abuse reports written.
    pub reports: AtomicU64,
    /// Hook runs started (every attempt).
    pub runs: AtomicU64,
}

/// The decision task's handle on the notifier.
#[derive(Clone, Debug)]
pub struct Notifier {
    tx: mpsc::Sender<Outgoing>,
    cfg: Arc<watch::Sender<Notify>>,
    stats: Arc<NotifyStats>,
}

impl Notifier {
    /// Starts the notifier task on the current tokio runtime.
    pub fn spawn(cfg: Notify) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (cfg_tx, cfg_rx) = watch::channel(cfg);
        let stats = Arc::new(NotifyStats::default());
        tokio::spawn(run(cfg_rx, rx, Arc::clone(&stats)));
        Notifier {
            tx,
            cfg: Arc::new(cfg_tx),
            stats,
        }
    }

    /// Queues a notification; never waits. A full queue drops it (counted and logged).
    pub fn notify(&self, n: Notification) {
        self.queue(Outgoing::Decision(n));
    }

    /// Queues a circuit breaker notification, as [`Notifier::notify`].
    pub fn notify_breaker(&self, n: BreakerNotification) {
        self.queue(Outgoing::Breaker(n));
    }

    fn queue(&self, n: Outgoing) {
        if let Err(e) = self.tx.try_send(n) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            let n = match e {
                mpsc::error::TrySendError::Full(n) | mpsc::error::TrySendError::Closed(n) => n,
            };
            warn!(target_addr = %n.subject(), "notification dropped: the notify hook is not keeping up");
        }
    }

    /// Replaces the settings (policy reload): notifications delivered from now on use them.
    pub fn set_config(&self, cfg: Notify) {
        self.cfg.send_replace(cfg);
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<NotifyStats> {
        &self.stats
    }
}

/// The dispatcher: keeps the waiting notifications in arrival order and starts the first one
/// whose address has no delivery running, while fewer than [`MAX_RUNNING`] run.
async fn run(
    cfg: watch::Receiver<Notify>,
    mut rx: mpsc::Receiver<Outgoing>,
    stats: Arc<NotifyStats>,
) {
    let mut waiting: VecDeque<Outgoing> = VecDeque::new();
    // The address of each running delivery, by task id (a delivery that panics still frees
    // its address).
    let mut busy: BTreeMap<tokio::task::Id, IpNet> = BTreeMap::new();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut open = true;
    loop {
        while running.len() < MAX_RUNNING {
            let Some(i) = waiting
                .iter()
                .position(|n| !busy.values().any(|t| *t == n.subject()))
            else {
                break;
            };
            let Some(n) = waiting.remove(i) else { break };
            let target = n.subject();
            let c = cfg.borrow().clone();
            let task = running.spawn(deliver(c, n, Arc::clone(&stats)));
            busy.insert(task.id(), target);
        }
        if !open && waiting.is_empty() && running.is_empty() {
            return;
        }
        tokio::select! {
            n = rx.recv(), if open && waiting.len() < QUEUE => match n {
                Some(n) => waiting.push_back(n),
                None => open = false,
            },
            Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        warn!(error = %e, "a notification delivery failed");
                        e.id()
                    }
                };
                busy.remove(&id);
            }
        }
    }
}

/// One notification: the abuse report, then the hook with its retries.
async fn deliver(cfg: Notify, out: Outgoing, stats: Arc<NotifyStats>) {
    let target = out.subject();
    if let Outgoing::Decision(n) = &out
        && let Some(dir) = &cfg.report_dir
        && n.decision.kind.is_some()
        && n.evidence.is_some()
    {
        match write_report(dir, n, cfg.reporter.as_deref()).await {
            Ok(path) => {
                stats.reports.fetch_add(1, Ordering::Relaxed);
                info!(report = %path.display(), addr = %target, "abuse report written");
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot write the abuse report"),
        }
    }
    let Some(cmd) = &cfg.command else {
        return;
    };
    let body = match out.to_json() {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "cannot encode the notification");
            return;
        }
    };
    let mut delay = Duration::from_secs(1);
    for attempt in 0..=cfg.retries {
        stats.runs.fetch_add(1, Ordering::Relaxed);
        match run_hook(cmd, &body, cfg.timeout).await {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                warn!(
                    command = %cmd[0],
                    attempt = attempt + 1,
                    of = cfg.retries + 1,
                    addr = %target,
                    "notify hook failed: {e}"
                );
                if attempt < cfg.retries {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
}

/// The hook's process group, killed (SIGKILL) when dropped: after the hook exits, at its
/// timeout, and when the delivery is cancelled (agent shutdown).
struct Group(nix::unistd::Pid);

impl Drop for Group {
    fn drop(&mut self) {
        // ESRCH (the group is already empty) is the usual case. The group id is the hook's
        // pid, which the kernel hands out again only after the pid space wraps around.
        let _ = nix::sys::signal::killpg(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs the hook once: JSON on stdin, in its own process group, killed with the whole group
/// after `timeout`; anything left in the group when it exits is killed too.
async fn run_hook(cmd: &[String], body: &[u8], timeout: Duration) -> Result<(), String> {
    // Under the packaged unit the agent holds CAP_NET_ADMIN as an ambient capability, which
    // a child would inherit; the hook gets none (setpriv is in util-linux, always present).
    let drop_caps = !nix::unistd::geteuid().is_root() && std::path::Path::new(SETPRIV).exists();
    let mut command = if drop_caps {
        let mut c = tokio::process::Command::new(SETPRIV);
        c.args(["--inh-caps=-all", "--ambient-caps=-all", "--"])
            .args(cmd);
        c
    } else {
        let mut c = tokio::process::Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        c
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd[0]))?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or("the hook has no process id")?;
    let group = Group(nix::unistd::Pid::from_raw(pid));
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    // stderr is read on the side, and only up to STDERR_KEPT: a child in the background
    // keeps it open after the hook has exited.
    let (err_tx, err_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let reader = tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = STDERR_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        let _ = err_tx.send(kept);
    });
    let body = body.to_vec();
    let feed = async move {
        // A hook that does not read its stdin must not hang us: the write is under the timeout.
        let _ = stdin.write_all(&body).await;
        let _ = stdin.shutdown().await;
    };
    let outcome = tokio::time::timeout(timeout, async {
        let ((), status) = tokio::join!(feed, child.wait());
        status
    })
    .await;
    // The hook exited or ran out of time: nothing of its group may stay.
    drop(group);
    let status = match outcome {
        Err(_) => {
            // Reap the leader (already killed with its group).
            let _ = child.wait().await;
            reader.abort();
            return Err(format!(
                "no exit within {timeout:?}; killed with its process group"
            ));
        }
        Ok(Err(e)) => {
            reader.abort();
            return Err(format!("cannot wait for it: {e}"));
        }
        Ok(Ok(status)) => status,
    };
    if status.success() {
        reader.abort();
        return Ok(());
    }
    // The group is dead, so stderr reaches its end at once; a grace bound all the same.
    let err = tokio::time::timeout(Duration::from_millis(200), err_rx)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    reader.abort();
    Err(format!(
        "{status}: {}",
        String::from_utf8_lossy(&err)
            .trim()
            .chars()
            .take(500)
            .collect::<String>()
    ))
}

async fn write_report(
    dir: &std::path::Path,
    n: &Notification,
    reporter: Option<&str>,
) -> std::io::Result<PathBuf> {
    tokio::fs::create_dir_all(dir).await?;
    let name = format!(
        "{}-{}.eml",
        n.decision.time.as_secs(),
        n.decision.target.to_string().replace([':', '/'], "_")
    );
    let path = dir.join(name);
    let tmp = path.with_extension("eml.tmp");
    tokio::fs::write(&tmp, xarf_report(n, reporter)).await?;
    tokio::fs::rename(&tmp, &path).await?;
    Ok(path)
}

#[cfg(test)]
mod tests;
