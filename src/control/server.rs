//! The agent's side of the control socket.
//!
//! [`bind`] creates the socket with mode 0660 and group `egressguard` (when the group
//! exists); [`serve`] accepts connections until told to stop and sends every well-formed,
//! permitted request to the decision task as a [`ControlRequest`]. A slow or garbled client
//! gets an error reply or a closed connection, never a stuck agent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::protocol::{Reply, Request};

/// Group whose members may use the socket besides root.
pub const GROUP: &str = "egressguard";
/// Longest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Creates the listening socket: parent directory (0750) if missing, stale socket removed,
/// mode 0660, group `egressguard` when that group exists.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750));
        chgrp(dir);
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
    chgrp(path);
    Ok(listener)
}

fn group_gid() -> Option<u32> {
    nix::unistd::Group::from_name(GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

fn chgrp(path: &Path) {
    if let Some(gid) = group_gid() {
        let _ = std::os::unix::fs::chown(path, None, Some(gid));
    }
}

/// Accepts connections until `stop` turns true; each request goes to `tx`.
pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<ControlRequest>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let tx = tx.clone();
                    tokio::spawn(async move { handle(stream, tx).await });
                }
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Whether `peer` may use the socket: root, or a member of the `egressguard` group.
fn permitted(peer: &PeerCred, peer_gid: u32) -> bool {
    if peer.uid == 0 {
        return true;
    }
    let Some(gid) = group_gid() else { return false };
    if peer_gid == gid {
        return true;
    }
    // Supplementary groups are not in SO_PEERCRED; the kernel shows them in /proc.
    std::fs::read_to_string(format!("/proc/{}/status", peer.pid))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
        })
        .unwrap_or(false)
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<ControlRequest>) {
    let (peer, peer_gid) = match stream.peer_cred() {
        Ok(c) => {
            let uid = c.uid();
            let user = nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| uid.to_string());
            (
                PeerCred {
                    uid,
                    pid: c.pid().unwrap_or(0),
                    user,
                },
                c.gid(),
            )
        }
        Err(e) => {
            debug!(error = %e, "control socket: no peer credentials");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let reply = if !permitted(&peer, peer_gid) {
        warn!(user = %peer.user, uid = peer.uid, "control socket: refused a user who is neither root nor in group egressguard");
        Reply::Error {
            error: format!(
                "permission denied: {} is neither root nor in group {GROUP}",
                peer.user
            ),
        }
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read.take(MAX_REQUEST));
        match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
            Err(_) => Reply::Error {
                error: "no request within 5 s".into(),
            },
            Ok(Err(e)) => Reply::Error {
                error: format!("cannot read the request: {e}"),
            },
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim_end()) {
                Err(e) => Reply::Error {
                    error: format!("malformed request: {e}"),
                },
                Ok(request) => {
                    let (reply_tx, reply_rx) = oneshot::channel();
                    let req = ControlRequest {
                        request,
                        peer,
                        reply: reply_tx,
                    };
                    if tx.send(req).await.is_err() {
                        Reply::Error {
                            error: "the agent is shutting down".into(),
                        }
                    } else {
                        match tokio::time::timeout(REPLY_TIMEOUT, reply_rx).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => Reply::Error {
                                error: "the agent dropped the request".into(),
                            },
                            Err(_) => Reply::Error {
                                error: "the agent did not answer within 30 s".into(),
                            },
                        }
                    }
                }
            },
        }
    };
    let mut out = serde_json::to_vec(&reply)
        .unwrap_or_else(|_| b"{\"result\":\"error\",\"error\":\"unencodable reply\"}".to_vec());
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}
