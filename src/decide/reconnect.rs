//! Reconnect authorisations: the outcome of checking one `policy.reconnect` entry.
//!
//! An entry is checked on start and on every reload, in this order: ticket not used before;
//! not expired; every condition of `reconnect_requires` attested; the address currently held;
//! the ticket first seen (in any policy the agent read) no earlier than the hold began — so an
//! entry left in the file cannot lift a *later* hold; the address not terminated, unless
//! the entry says `override_termination: true`. The first failing check is the refusal.

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::messages::Time;

/// The result of checking one reconnect authorisation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectOutcome {
    /// The ticket.
    pub ticket: String,
    /// The address it is for.
    pub address: IpNet,
    /// Applied or refused.
    pub result: ReconnectResult,
}

/// Applied, or refused with a reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "reason", rename_all = "snake_case")]
pub enum ReconnectResult {
    /// The hold was lifted now and the ticket recorded as used.
    Applied,
    /// Nothing changed.
    Refused(Refusal),
}

/// Why a reconnect authorisation was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
pub enum Refusal {
    /// The ticket already lifted a hold; an authorisation is used once.
    UsedBefore {
        /// When it was applied.
        applied_at: Time,
        /// The address it lifted.
        address: IpNet,
    },
    /// The authorisation's `expires` has passed.
    Expired {
        /// Its expiry.
        expires: Time,
    },
    /// Conditions the policy requires are not attested.
    MissingConditions {
        /// The missing conditions.
        missing: Vec<String>,
    },
    /// The address is not held.
    NotBlocked,
    /// The ticket was first seen before the current hold began: it was written for an
    /// earlier incident.
    PredatesBlock {
        /// When the agent first read the ticket.
        seen: Time,
        /// When the current hold began.
        blocked_since: Time,
    },
    /// The address is terminated and the entry does not override that.
    Terminated,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::UsedBefore {
                applied_at,
                address,
            } => write!(
                f,
                "the ticket was already used at {applied_at} for {address}; an authorisation lifts one block only, write a new ticket"
            ),
            Refusal::Expired { expires } => {
                write!(f, "the authorisation expired at {expires}")
            }
            Refusal::MissingConditions { missing } => write!(
                f,
                "required conditions not attested: {}",
                missing.join(", ")
            ),
            Refusal::NotBlocked => f.write_str("the address is not blocked"),
            Refusal::PredatesBlock {
                seen,
                blocked_since,
            } => write!(
                f,
                "the ticket was first read at {seen}, before the current block began at {blocked_since}: it belongs to an earlier incident, write a new ticket"
            ),
            Refusal::Terminated => f.write_str(
                "the address is terminated; only an authorisation with `override_termination: true` lifts it",
            ),
        }
    }
}

impl fmt::Display for ReconnectOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            ReconnectResult::Applied => {
                write!(f, "reconnect {} for {}: applied", self.ticket, self.address)
            }
            ReconnectResult::Refused(r) => write!(
                f,
                "reconnect {} for {}: refused: {r}",
                self.ticket, self.address
            ),
        }
    }
}
