//! The daemon: loads the policy, spawns the stages, owns the decisions, handles signals.
//!
//! Task graph (every arrow is a tokio channel; every message type lives in `messages`):
//!
//! ```text
//!  signal thread (SIGHUP, SIGTERM, SIGINT) ──Event──┐
//!  control socket (one task per connection) ─Event──┤  request + oneshot reply
//!                                                    ▼
//!                                          ┌──────────────────┐
//!                                          │  decision task   │  owns the policy (Arc, swapped on
//!                                          │  (this module)   │  reload) and every decision
//!                                          └──────────────────┘
//! ```
//!
//! The observe, detect, enforce and BGP stages join this graph as they are built (see README,
//! "What is not done yet"); until then the daemon watches nothing and enforces nothing, and
//! says so at start.
//!
//! Shutdown order, fixed: stop taking events → let the decision task finish the event in
//! hand → stop the runtime. Blocks already in the kernel stay in place when the agent stops
//! (a restart must never open a gap); removal is explicit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::cli::{Exit, RunArgs};
use crate::control::protocol::{Body, Reply, Request, StatusView};
use crate::control::server::{self, ControlError, ControlRequest};
use crate::messages::Time;
use crate::policy::{Policy, PolicyError};

/// What the decision task is told.
#[derive(Debug)]
pub enum Event {
    /// Re-read the policy file (SIGHUP, or `egressguard reload` with a reply channel).
    Reload {
        /// Where to send the outcome, when somebody waits for it.
        reply: Option<oneshot::Sender<Result<String, String>>>,
    },
    /// Stop (SIGTERM, SIGINT).
    Shutdown {
        /// The signal's name, for the log.
        why: &'static str,
    },
    /// A request from the control socket.
    Control(ControlRequest),
}

/// Errors that stop the daemon at start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The policy did not validate.
    #[error("cannot start")]
    Policy(#[source] PolicyError),
    /// The async runtime could not be built.
    #[error("cannot build the async runtime")]
    Runtime(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The control socket could not be created.
    #[error("cannot start")]
    Control(#[source] ControlError),
}

/// `egressguard run`: returns when the daemon has stopped.
pub fn run(args: &RunArgs) -> Exit {
    match start(args) {
        Ok(()) => Exit::Ok,
        Err(DaemonError::Policy(e)) => {
            for d in e.diagnostics() {
                error!(diagnostic = %d.one_line(), "policy refused");
            }
            error!(file = %args.policy.display(), "cannot start: {}", first_line(&error_chain(&e)));
            Exit::InvalidPolicy
        }
        Err(e) => {
            error!("{}", error_chain(&e));
            Exit::Failure
        }
    }
}

/// Renders an error with all its causes: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn start(args: &RunArgs) -> Result<(), DaemonError> {
    let policy = Arc::new(Policy::load(&args.policy).map_err(DaemonError::Policy)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("egressguard")
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let signals = spawn_signal_thread(tx.clone())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let outcome = rt.block_on(async {
        let listener = server::bind(&args.socket).map_err(DaemonError::Control)?;
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlRequest>(16);
        let control = tokio::spawn(server::serve(listener, ctl_tx, stop_rx));
        let forward = {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(req) = ctl_rx.recv().await {
                    if tx.send(Event::Control(req)).await.is_err() {
                        break;
                    }
                }
            })
        };
        let mut d = Decider {
            policy_path: args.policy.clone(),
            policy,
            started: Time::now(),
        };
        d.started(args);
        d.run(rx).await;
        // Shutdown order: stop taking control requests, then the rest.
        let _ = stop_tx.send(true);
        let _ = control.await;
        forward.abort();
        let _ = std::fs::remove_file(&args.socket);
        Ok(())
    });
    signals.close();
    outcome?;
    info!("stopped");
    Ok(())
}

fn spawn_signal_thread(
    tx: mpsc::Sender<Event>,
) -> Result<signal_hook::iterator::Handle, DaemonError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])
        .map_err(DaemonError::Signals)?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let ev = match sig {
                    SIGHUP => Event::Reload { reply: None },
                    SIGTERM => Event::Shutdown { why: "SIGTERM" },
                    _ => Event::Shutdown { why: "SIGINT" },
                };
                if tx.blocking_send(ev).is_err() {
                    break;
                }
            }
        })
        .map_err(DaemonError::Signals)?;
    Ok(handle)
}

/// The decision task: the one owner of the policy and of every decision.
struct Decider {
    policy_path: PathBuf,
    policy: Arc<Policy>,
    started: Time,
}

impl Decider {
    fn started(&self, args: &RunArgs) {
        let p = &self.policy;
        info!(
            policy = %self.policy_path.display(),
            version = %p.source.digest,
            mode = if p.enforcing() { "enforce" } else { "dry-run" },
            networks = p.networks.len(),
            state_dir = %args.state_dir.display(),
            socket = %args.socket.display(),
            "started"
        );
        warn!(
            "this build has no observers or enforcers yet: it watches nothing and blocks nothing"
        );
        sd_notify("READY=1");
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Event>) {
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Reload { reply } => {
                    let outcome = self.reload();
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome);
                    }
                }
                Event::Shutdown { why } => {
                    info!(signal = why, "stopping");
                    sd_notify("STOPPING=1");
                    break;
                }
                Event::Control(req) => {
                    let reply = self.control(req.request, &req.peer.user);
                    let _ = req.reply.send(reply);
                }
            }
        }
    }

    /// Answers one control request.
    fn control(&mut self, req: Request, user: &str) -> Reply {
        match req {
            Request::Status => Reply::Ok {
                body: Body::Status(Box::new(self.status())),
            },
            Request::Reload => {
                info!(user, "reload requested on the control socket");
                match self.reload() {
                    Ok(message) => Reply::Ok {
                        body: Body::Done { message },
                    },
                    Err(error) => Reply::Error { error },
                }
            }
            Request::List
            | Request::Show { .. }
            | Request::Block { .. }
            | Request::Unblock { .. } => Reply::Error {
                error: "this build has no decision stage yet: it holds no blocks".into(),
            },
        }
    }

    fn status(&self) -> StatusView {
        let p = &self.policy;
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: if p.enforcing() { "enforce" } else { "dry-run" }.to_owned(),
            policy_file: self.policy_path.display().to_string(),
            policy_version: p.source.digest.clone(),
            started: self.started,
            now: Time::now(),
            warnings: vec!["this build has no observers or enforcers yet: it watches nothing and blocks nothing".into()],
            ..StatusView::default()
        }
    }

    /// Loads the policy file again; a policy that fails validation is refused and the old one
    /// stays in force.
    fn reload(&mut self) -> Result<String, String> {
        sd_notify("RELOADING=1");
        let outcome = match Policy::load(&self.policy_path) {
            Ok(p) => {
                let msg = format!(
                    "policy reloaded: version {} (was {})",
                    p.source.digest, self.policy.source.digest
                );
                info!(
                    policy = %self.policy_path.display(),
                    version = %p.source.digest,
                    previous = %self.policy.source.digest,
                    mode = if p.enforcing() { "enforce" } else { "dry-run" },
                    "policy reloaded"
                );
                self.policy = Arc::new(p);
                Ok(msg)
            }
            Err(e) => {
                for d in e.diagnostics() {
                    error!(diagnostic = %d.one_line(), "policy refused");
                }
                error!(
                    policy = %self.policy_path.display(),
                    kept = %self.policy.source.digest,
                    errors = e.diagnostics().len(),
                    "policy refused, keeping the previous policy: {}",
                    first_line(&error_chain(&e))
                );
                Err(e.to_string())
            }
        };
        sd_notify("READY=1");
        outcome
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Tells systemd about our state when it started us with `Type=notify`; does nothing otherwise.
pub fn sd_notify(state: &str) {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
}
