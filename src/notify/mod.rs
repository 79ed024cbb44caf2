//! Alerts: the `notify` hook and the per-incident abuse reports.
//!
//! The decision task hands every [`Decision`] (with the evidence when a detection caused it)
//! to the [`Notifier`] through a bounded channel with `try_send`: a slow or failing hook never
//! holds up a decision. The notifier task then, for each notification:
//!
//! - runs `notify.command` with the notification as one JSON document on stdin
//!   ([`Notification`], schema `egressguard.notify.v1`, documented in `docs/notify.md`),
//!   killing it after `notify.timeout` and retrying up to `notify.retries` times with
//!   backoff (1 s, 2 s, 4 s, ...);
//! - for decisions that put an address on hold after a detection, writes an abuse report in
//!   X-ARF style (a MIME message an abuse desk can forward) into `notify.report_dir`.
//!
//! A circuit breaker trip or re-arm goes to the hook too, as a [`BreakerNotification`]
//! (`"event": "breaker_tripped"` / `"breaker_rearmed"`); decisions carry
//! `"event": "decision"`.
//!
//! Counters of sent, failed and dropped notifications are shared for `status` and metrics.

mod report;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use report::xarf_report;

use crate::messages::{BreakerEvent, Decision, Evidence};
use crate::policy::Notify;

/// Schema name of the hook's stdin document.
pub const SCHEMA: &str = "egressguard.notify.v1";
/// Drops capabilities for the hook.
const SETPRIV: &str = "/usr/bin/setpriv";
/// Notifications that may wait for the hook before new ones are dropped.
const QUEUE: usize = 1024;

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
}

/// The decision task's handle on the notifier.
#[derive(Clone, Debug)]
pub struct Notifier {
    tx: mpsc::Sender<Outgoing>,
    stats: Arc<NotifyStats>,
}

impl Notifier {
    /// Starts the notifier task on the current tokio runtime.
    pub fn spawn(cfg: Notify) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(NotifyStats::default());
        tokio::spawn(run(cfg, rx, Arc::clone(&stats)));
        Notifier { tx, stats }
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

    /// The counters.
    pub fn stats(&self) -> &Arc<NotifyStats> {
        &self.stats
    }
}

async fn run(cfg: Notify, mut rx: mpsc::Receiver<Outgoing>, stats: Arc<NotifyStats>) {
    while let Some(out) = rx.recv().await {
        if let Outgoing::Decision(n) = &out
            && let Some(dir) = &cfg.report_dir
            && n.decision.kind.is_some()
            && n.evidence.is_some()
        {
            match write_report(dir, n, cfg.reporter.as_deref()).await {
                Ok(path) => {
                    stats.reports.fetch_add(1, Ordering::Relaxed);
                    info!(report = %path.display(), addr = %n.decision.target, "abuse report written");
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "cannot write the abuse report"),
            }
        }
        let Some(cmd) = &cfg.command else { continue };
        let body = match out.to_json() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode the notification");
                continue;
            }
        };
        let mut delay = Duration::from_secs(1);
        let mut ok = false;
        for attempt in 0..=cfg.retries {
            match run_hook(cmd, &body, cfg.timeout).await {
                Ok(()) => {
                    ok = true;
                    break;
                }
                Err(e) => {
                    warn!(
                        command = %cmd[0],
                        attempt = attempt + 1,
                        of = cfg.retries + 1,
                        addr = %out.subject(),
                        "notify hook failed: {e}"
                    );
                    if attempt < cfg.retries {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
        if ok {
            stats.sent.fetch_add(1, Ordering::Relaxed);
        } else {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the hook once: JSON on stdin, killed after `timeout`.
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
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cmd[0]))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let body = body.to_vec();
    let feed = async move {
        // A hook that does not read its stdin must not hang us: the write is under the timeout.
        let _ = stdin.write_all(&body).await;
        let _ = stdin.shutdown().await;
    };
    let wait = async {
        feed.await;
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout, wait).await {
        Err(_) => Err(format!("no exit within {timeout:?}; killed")),
        Ok(Err(e)) => Err(format!("cannot wait for it: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(500)
                .collect::<String>()
        )),
    }
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
