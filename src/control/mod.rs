//! The control socket: how the `egressguard` CLI talks to the running agent.
//!
//! One Unix stream socket (`/run/egressguard/control.sock`, mode 0660, owner root, group
//! `egressguard`). One request per connection: the client writes one JSON line
//! ([`protocol::Request`]), the agent answers with one JSON line ([`protocol::Reply`]) and
//! closes. The file mode keeps out users who are neither root nor in the group; the server
//! also checks the peer's credentials (`SO_PEERCRED`, and `SO_PEERGROUPS` for supplementary
//! groups, see [`peer`]) and records who asked in the audit trail. The server bounds what
//! any client can hold (connections, time, reply size): see [`server`].
//!
//! [`server`] accepts connections and hands each request to the decision task with a
//! `oneshot` sender for the reply; [`client`] is the CLI's side.

pub mod client;
pub mod peer;
pub mod protocol;
pub mod server;

pub use protocol::{Reply, Request};
