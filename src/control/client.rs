//! The CLI's side of the control socket: one request, one reply, with timeouts and error
//! messages that say what to do.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Reply, Request};

/// Why a request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent listens on the socket.
    #[error("cannot reach the agent at {}: is it running? (systemctl status egressguard)", path.display())]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket's permissions keep us out.
    #[error("permission denied on {}: run as root or as a member of the egressguard group", path.display())]
    Permission {
        /// The socket.
        path: PathBuf,
    },
    /// Talking to the agent failed midway.
    #[error("lost the connection to the agent at {}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent closed the connection without a word (it refuses connections beyond its
    /// bound, and drops a client that is too slow to send its request or read its reply).
    #[error("the agent at {} closed the connection without answering (busy, or too slow a client?); try again, and see its log", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// The agent's answer is not a reply of this protocol (a different version?).
    #[error("the agent's answer is not understood (is it the same version as this CLI?)")]
    Protocol(#[source] serde_json::Error),
}

/// Sends `req` to the agent at `path` and returns its reply.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::Permission {
            path: path.to_owned(),
        },
        _ => ClientError::NotRunning {
            path: path.to_owned(),
            source,
        },
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(ClientError::Protocol)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::Closed {
            path: path.to_owned(),
        });
    }
    serde_json::from_str(answer.trim_end()).map_err(ClientError::Protocol)
}
