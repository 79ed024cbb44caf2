//! The agent's side of the control socket.
//!
//! [`bind`] creates the socket with mode 0660 and group `egressguard` (when the group
//! exists); [`serve`] accepts connections until told to stop and sends every well-formed,
//! permitted request to the decision task as a [`ControlRequest`].
//!
//! Every local client that can open the socket is treated as hostile:
//!
//! - at most [`MAX_CONNECTIONS`] connections are served at once, at most [`PER_USER`] of
//!   them for one non-root user, and [`ROOT_RESERVED`] of them are kept for root, so that
//!   no group member can take the socket away from the operator; a client over the bound
//!   gets one error line (written without waiting) and is closed, and a warning is logged
//!   at most every 10 s with the count of the refusals held back;
//! - a client has [`READ_TIMEOUT`] to send its request and [`WRITE_TIMEOUT`] to read the
//!   reply; one that does neither is dropped (with its slot and its buffers);
//! - requests are at most 64 KiB, and replies are bounded by the protocol (`show` pages its
//!   history, see [`crate::control::protocol::MAX_PAGE`]);
//! - failed accepts (`EMFILE`) back off instead of spinning ([`crate::accept::Backoff`]).
//!
//! Who may use the socket is decided on what the kernel recorded at `connect`: the uid and
//! gid of `SO_PEERCRED` and the supplementary groups of `SO_PEERGROUPS` ([`super::peer`]),
//! never by reading `/proc` (hidden from the agent by `ProtectProc=invisible`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::protocol::{Reply, Request};
use crate::accept::{Backoff, RateLimit};

/// Group whose members may use the socket besides root (`run --socket-group` changes it).
pub const GROUP: &str = "egressguard";
/// Longest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read its reply.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once, all users together.
pub const MAX_CONNECTIONS: usize = 64;
/// Of [`MAX_CONNECTIONS`], how many only root may take.
pub const ROOT_RESERVED: usize = 16;
/// Connections one non-root user may hold at once.
pub const PER_USER: usize = 16;
/// At most one warning about refused connections or failed accepts per this interval.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long the decision task may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is on the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// User id.
    pub uid: u32,
    /// Process id.
    pub pid: i32,
    /// User name, or the uid as text.
    pub user: String,
}

/// A request on its way to the decision task.
#[derive(Debug)]
pub struct ControlRequest {
    /// What is asked.
    pub request: Request,
    /// Who asks.
    pub peer: PeerCred,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Reply>,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket's directory could not be created.
    #[error("cannot create the control socket directory {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error("another agent is already running on {}", path.display())]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// Binding or setting permissions failed.
    #[error("cannot create the control socket {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Who may use the socket besides root: the members of one group.
#[derive(Clone, Debug)]
pub struct Access {
    /// The group's name.
    pub group: String,
    /// Its gid; `None` when no such group exists (then only root gets in).
    pub gid: Option<u32>,
}

impl Access {
    /// Looks the group up (once, at start).
    pub fn of_group(group: &str) -> Access {
        Access {
            group: group.to_owned(),
            gid: nix::unistd::Group::from_name(group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw()),
        }
    }

    /// Whether a peer with these credentials may use the socket: root, or a member of the
    /// group as primary or supplementary group.
    pub fn permits(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0 || self.gid.is_some_and(|g| gid == g || groups.contains(&g))
    }
}

/// Creates the listening socket: parent directory (0750) if missing, stale socket removed,
/// mode 0660, owned by the group of `access` when that group exists.
pub fn bind(path: &Path, access: &Access) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        chgrp(dir, access);
    }
    if path.exists() {
        // A socket nobody answers on is left from a crash: replace it. One that answers
        // belongs to a running agent: refuse to steal it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    chgrp(path, access);
    Ok(listener)
}

fn chgrp(path: &Path, access: &Access) {
    if let Some(gid) = access.gid {
        let _ = std::os::unix::fs::chown(path, None, Some(gid));
    }
}

/// The connections open now, by user.
#[derive(Debug, Default)]
struct Counts {
    total: usize,
    others: usize,
    by_uid: HashMap<u32, usize>,
}

/// Why a connection is turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Busy {
    /// [`MAX_CONNECTIONS`] are open.
    All,
    /// The non-root users together hold all they may.
    Users,
    /// This user holds [`PER_USER`].
    User,
}

impl Busy {
    fn message(self, uid: u32) -> String {
        let what = match self {
            Busy::All => format!("{MAX_CONNECTIONS} connections are open, the most it serves"),
            Busy::Users => format!(
                "non-root users hold {} connections, the most they may ({ROOT_RESERVED} are kept for root)",
                MAX_CONNECTIONS - ROOT_RESERVED
            ),
            Busy::User => format!("uid {uid} holds {PER_USER} connections, the most one user may"),
        };
        format!("the agent is busy: {what}; try again in a few seconds")
    }
}

/// The connection bound: [`MAX_CONNECTIONS`] in all, [`ROOT_RESERVED`] of them for root,
/// [`PER_USER`] for each other user.
#[derive(Clone, Debug, Default)]
struct Quota(Arc<Mutex<Counts>>);

/// One connection's place in the [`Quota`], given back on drop.
#[derive(Debug)]
struct Slot {
    quota: Quota,
    uid: u32,
}

impl Quota {
    fn take(&self, uid: u32) -> Result<Slot, Busy> {
        let mut c = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= MAX_CONNECTIONS {
            return Err(Busy::All);
        }
        if uid != 0 {
            if c.others >= MAX_CONNECTIONS - ROOT_RESERVED {
                return Err(Busy::Users);
            }
            let mine = c.by_uid.entry(uid).or_insert(0);
            if *mine >= PER_USER {
                return Err(Busy::User);
            }
            *mine += 1;
            c.others += 1;
        }
        c.total += 1;
        Ok(Slot {
            quota: self.clone(),
            uid,
        })
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.0.lock().unwrap().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.quota.0.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if self.uid != 0 {
            c.others -= 1;
            if let Some(n) = c.by_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    c.by_uid.remove(&self.uid);
                }
            }
        }
    }
}

/// Accepts connections until `stop` turns true; each permitted request goes to `tx`.
pub async fn serve(
    listener: UnixListener,
    access: Access,
    tx: mpsc::Sender<ControlRequest>,
    mut stop: watch::Receiver<bool>,
) {
    let quota = Quota::default();
    let access = Arc::new(access);
    let mut backoff = Backoff::default();
    let mut accept_warn = RateLimit::new(WARN_EVERY);
    let mut busy_warn = RateLimit::new(WARN_EVERY);
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    let cred = match stream.peer_cred() {
                        Ok(c) => c,
                        Err(e) => {
                            debug!(error = %e, "control socket: no peer credentials");
                            continue;
                        }
                    };
                    match quota.take(cred.uid()) {
                        Ok(slot) => {
                            let (tx, access) = (tx.clone(), Arc::clone(&access));
                            tokio::spawn(async move { handle(stream, cred, slot, &access, tx).await });
                        }
                        Err(busy) => {
                            refuse(&stream, &busy.message(cred.uid()));
                            if let Some(held_back) = busy_warn.allow(Instant::now()) {
                                warn!(
                                    uid = cred.uid(),
                                    pid = cred.pid().unwrap_or(0),
                                    held_back,
                                    max = MAX_CONNECTIONS,
                                    per_user = PER_USER,
                                    "control socket: connection refused, too many open ({busy:?})"
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    let pause = backoff.failed();
                    if let Some(held_back) = accept_warn.allow(Instant::now()) {
                        warn!(error = %e, retry_ms = pause.as_millis() as u64, held_back, "control socket: accept failed");
                    }
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// The reply line for `reply`.
fn encode(reply: &Reply) -> Vec<u8> {
    let mut out = serde_json::to_vec(reply)
        .unwrap_or_else(|_| b"{\"result\":\"error\",\"error\":\"unencodable reply\"}".to_vec());
    out.push(b'\n');
    out
}

/// Tells a client turned away why, in one write that never waits (a client that does not
/// read gets nothing), then closes.
fn refuse(stream: &UnixStream, why: &str) {
    let _ = stream.try_write(&encode(&Reply::Error {
        error: why.to_owned(),
    }));
}

async fn handle(
    stream: UnixStream,
    cred: tokio::net::unix::UCred,
    _slot: Slot,
    access: &Access,
    tx: mpsc::Sender<ControlRequest>,
) {
    let uid = cred.uid();
    let groups = match super::peer::peer_groups(&stream) {
        Ok(g) => g,
        Err(e) => {
            debug!(error = %e, "control socket: no peer groups (SO_PEERGROUPS)");
            Vec::new()
        }
    };
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let peer = PeerCred {
        uid,
        pid: cred.pid().unwrap_or(0),
        user,
    };
    let (read, mut write) = stream.into_split();
    let reply = if !access.permits(uid, cred.gid(), &groups) {
        warn!(user = %peer.user, uid = peer.uid, group = %access.group, "control socket: refused a user who is neither root nor in the group");
        Reply::Error {
            error: format!(
                "permission denied: {} is neither root nor in group {}",
                peer.user, access.group
            ),
        }
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_REQUEST));
        match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
            Err(_) => Reply::Error {
                error: format!("no request within {} s", READ_TIMEOUT.as_secs()),
            },
            Ok(Err(e)) => Reply::Error {
                error: format!("cannot read the request: {e}"),
            },
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim_end()) {
                Err(e) => Reply::Error {
                    error: format!("malformed request: {e}"),
                },
                Ok(request) => ask(request, peer, &tx).await,
            },
        }
    };
    let out = encode(&reply);
    drop(reply);
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&out).await?;
        write.shutdown().await
    })
    .await;
    if written.is_err() {
        debug!(
            uid,
            bytes = out.len(),
            "control socket: dropped a client that did not read its reply within {} s",
            WRITE_TIMEOUT.as_secs()
        );
    }
}

/// Hands `request` to the decision task and waits for its answer.
async fn ask(request: Request, peer: PeerCred, tx: &mpsc::Sender<ControlRequest>) -> Reply {
    let (reply_tx, reply_rx) = oneshot::channel();
    let req = ControlRequest {
        request,
        peer,
        reply: reply_tx,
    };
    if tx.send(req).await.is_err() {
        return Reply::Error {
            error: "the agent is shutting down".into(),
        };
    }
    match tokio::time::timeout(REPLY_TIMEOUT, reply_rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Reply::Error {
            error: "the agent dropped the request".into(),
        },
        Err(_) => Reply::Error {
            error: format!(
                "the agent did not answer within {} s",
                REPLY_TIMEOUT.as_secs()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_keeps_room_for_root_and_bounds_each_user() {
        let q = Quota::default();
        let mut held = Vec::new();
        for _ in 0..PER_USER {
            held.push(q.take(1000).unwrap());
        }
        assert_eq!(q.take(1000).unwrap_err(), Busy::User);
        // Other users fill what non-root users may hold together.
        let mut uid = 2000;
        while held.len() < MAX_CONNECTIONS - ROOT_RESERVED {
            match q.take(uid) {
                Ok(s) => held.push(s),
                Err(Busy::User) => uid += 1,
                Err(e) => panic!("{e:?} at {}", held.len()),
            }
        }
        assert_eq!(q.take(9999).unwrap_err(), Busy::Users);
        // Root still gets in, up to the total.
        for _ in 0..ROOT_RESERVED {
            held.push(q.take(0).unwrap());
        }
        assert_eq!(q.take(0).unwrap_err(), Busy::All);
        assert_eq!(q.open(), MAX_CONNECTIONS);
        held.clear();
        assert_eq!(q.open(), 0);
        assert!(q.take(1000).is_ok(), "slots come back on drop");
        assert!(Busy::User.message(7).contains("uid 7"));
    }

    #[test]
    fn access_by_primary_or_supplementary_group() {
        let a = Access {
            group: "egressguard".into(),
            gid: Some(990),
        };
        assert!(a.permits(0, 0, &[]), "root");
        assert!(a.permits(1000, 990, &[]), "primary group");
        assert!(a.permits(1000, 1000, &[27, 990]), "supplementary group");
        assert!(!a.permits(1000, 1000, &[27]), "neither");
        let none = Access {
            group: "egressguard".into(),
            gid: None,
        };
        assert!(!none.permits(1000, 990, &[990]), "no such group: root only");
        assert!(none.permits(0, 0, &[]));
    }
}
