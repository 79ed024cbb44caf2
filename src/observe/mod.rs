//! Observation: conntrack events over ctnetlink and per-address nft counters.
//!
//! This module owns everything the agent reads from the kernel to see what customer servers
//! send: the conntrack event stream ([`ConntrackListener`], parsed by [`ctnetlink`]) and the
//! per-source packet/byte counters kept by the agent's nft table ([`CounterReader`]). Both run
//! on their own OS thread, keep only flows whose original source is in the policy's customer
//! networks ([`CustomerFilter`], swappable on reload through a [`FilterHandle`]), and deliver
//! `Vec<Observation>` batches into a tokio channel with `blocking_send`.
//!
//! ```text
//!  kernel (router netns)                       observe threads                   daemon
//!  ctnetlink NEW/UPDATE/DESTROY ──recvmmsg──▶ ConntrackListener ─┐
//!  ctnetlink dump (start, after ENOBUFS) ───▶        "           ├─Vec<Observation>─▶ detect
//!  nft -j list sets table inet T ──interval─▶ CounterReader ─────┘
//!                                  ObserveStats (atomics) ◀── status / metrics
//! ```
//!
//! Nothing here blocks the kernel: when the daemon is slow the listener's socket buffer fills,
//! the kernel reports `ENOBUFS`, the listener counts the loss, sends [`Observation::Lost`] and
//! resynchronises with a dump of the table on a thread of its own (ending with
//! [`Observation::Resynced`]), reading events all the while.
//!
//! [`Observation::Resynced`]: crate::messages::Observation::Resynced
//!
//! [`Observation::Lost`]: crate::messages::Observation::Lost

pub mod conntrack;
pub mod counters;
pub mod ctnetlink;
pub mod filter;
pub mod nftset;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub use conntrack::{ConntrackListener, ListenerOptions, Updates};
pub use counters::{CounterDeltas, CounterHandle, CounterReader};
pub use filter::{CustomerFilter, FilterHandle};

/// Why observing failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The netlink socket could not be created or bound.
    #[error("cannot open the ctnetlink socket")]
    Socket(#[source] io::Error),
    /// Joining a conntrack multicast group failed.
    #[error("cannot subscribe to conntrack multicast group {group}")]
    Subscribe {
        /// The group (`NFNLGRP_CONNTRACK_*`).
        group: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket option could not be set.
    #[error("cannot set socket option {option}")]
    SocketOption {
        /// The option.
        option: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending the dump request failed.
    #[error("cannot request a conntrack table dump")]
    DumpRequest(#[source] io::Error),
    /// Reading from the socket failed (other than a timeout or a lost-events report).
    #[error("cannot read from the ctnetlink socket")]
    Receive(#[source] io::Error),
    /// The kernel refused the dump.
    #[error("the kernel refused the conntrack dump")]
    DumpRefused(#[source] io::Error),
    /// The observer thread could not be started.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
    /// `nft` could not be started.
    #[error("cannot run nft")]
    NftSpawn(#[source] io::Error),
    /// `nft` ran and failed.
    #[error("`nft {args}` failed ({status}): {stderr}")]
    NftFailed {
        /// The arguments.
        args: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `nft -j` printed something that is not the JSON we expect.
    #[error("cannot read nft's JSON output")]
    NftJson(#[source] serde_json::Error),
    /// Dumping a counter set's elements over netlink failed (socket, or the kernel refused).
    #[error("cannot dump set {set} over netlink")]
    SetDump {
        /// The set.
        set: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel's reply to a set dump is malformed.
    #[error("malformed set dump of {set}: {error}")]
    SetDumpMalformed {
        /// The set.
        set: String,
        /// What is wrong.
        error: ctnetlink::ParseError,
    },
}

/// Counters of what the observers saw, shared with `status` and the metrics through atomics.
/// Updated once per batch, never per event.
#[derive(Debug, Default)]
pub struct ObserveStats {
    /// ctnetlink flow messages received (events and dump entries), customer or not.
    pub events_seen: AtomicU64,
    /// Flow messages from customer sources handed on as observations.
    pub events_kept: AtomicU64,
    /// Update events dropped because they carry no signal ([`Updates::Signals`]).
    pub updates_dropped: AtomicU64,
    /// Times the kernel reported lost events (`ENOBUFS`) or an overrun.
    pub lost: AtomicU64,
    /// Malformed or truncated messages.
    pub parse_errors: AtomicU64,
    /// Full table dumps taken (start and resynchronisations).
    pub dumps: AtomicU64,
    /// Flows read by those dumps, customer or not.
    pub dump_flows: AtomicU64,
    /// Counter reads (`nft` invocations) that succeeded.
    pub counter_reads: AtomicU64,
    /// Counter reads that failed.
    pub counter_errors: AtomicU64,
    /// Counter samples sent.
    pub counter_samples: AtomicU64,
}

/// A point-in-time copy of [`ObserveStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// See [`ObserveStats::events_seen`].
    pub events_seen: u64,
    /// See [`ObserveStats::events_kept`].
    pub events_kept: u64,
    /// See [`ObserveStats::updates_dropped`].
    pub updates_dropped: u64,
    /// See [`ObserveStats::lost`].
    pub lost: u64,
    /// See [`ObserveStats::parse_errors`].
    pub parse_errors: u64,
    /// See [`ObserveStats::dumps`].
    pub dumps: u64,
    /// See [`ObserveStats::dump_flows`].
    pub dump_flows: u64,
    /// See [`ObserveStats::counter_reads`].
    pub counter_reads: u64,
    /// See [`ObserveStats::counter_errors`].
    pub counter_errors: u64,
    /// See [`ObserveStats::counter_samples`].
    pub counter_samples: u64,
}

impl ObserveStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            events_seen: r(&self.events_seen),
            events_kept: r(&self.events_kept),
            updates_dropped: r(&self.updates_dropped),
            lost: r(&self.lost),
            parse_errors: r(&self.parse_errors),
            dumps: r(&self.dumps),
            dump_flows: r(&self.dump_flows),
            counter_reads: r(&self.counter_reads),
            counter_errors: r(&self.counter_errors),
            counter_samples: r(&self.counter_samples),
        }
    }
}

pub(crate) fn add(a: &AtomicU64, n: u64) {
    if n != 0 {
        a.fetch_add(n, Ordering::Relaxed);
    }
}
