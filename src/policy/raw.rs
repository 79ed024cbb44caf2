//! The policy file as written: serde's view, before validation.
//!
//! Every struct denies unknown fields, so a typo is an error with its line and column rather
//! than a silently ignored setting. Values that need parsing (prefixes, durations, addresses,
//! timestamps, rates) are kept as [`Scalar`] text here and parsed by `super::validate`, so
//! that `egressguard check` reports every bad value at once, each at its own position.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::messages::{Announce, Category};

/// A YAML scalar kept as text, whatever YAML typed it as (`60`, `1h`, `true`, `10.0.0.0/8`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a single value (text or number), not a list or a mapping")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `mode:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Detect, decide and enforce.
    Enforce,
    /// Detect and decide; log what would be enforced; enforce nothing.
    DryRun,
}

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: Option<u32>,
    pub mode: Option<Mode>,
    #[serde(default)]
    pub networks: Vec<RawNetwork>,
    #[serde(default)]
    pub profiles: BTreeMap<String, RawProfile>,
    #[serde(default)]
    pub allow: Vec<Scalar>,
    pub protect_infrastructure: Option<bool>,
    #[serde(default)]
    pub actions: BTreeMap<Category, RawAction>,
    pub operator_blocks: Option<RawOperatorBlocks>,
    pub escalation: Option<RawEscalation>,
    pub reconnect_requires: Option<Vec<String>>,
    #[serde(default)]
    pub reconnect: Vec<RawReconnect>,
    pub enforcement: Option<RawEnforcement>,
    pub circuit_breaker: Option<RawBreaker>,
    pub anti_spoofing: Option<RawAntiSpoofing>,
    pub bgp: Option<RawBgp>,
    pub notify: Option<RawNotify>,
    pub metrics: Option<RawMetrics>,
    pub detection: Option<RawDetection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    pub prefix: Scalar,
    pub profile: Option<String>,
    pub name: Option<String>,
    pub customer_prefix: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub flood: Option<RawFlood>,
    pub brute_force: Option<RawBruteForce>,
    pub port_scan: Option<RawPortScan>,
    pub network_scan: Option<RawNetworkScan>,
    pub spam: Option<RawSpam>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlood {
    pub enabled: Option<bool>,
    pub window: Option<Scalar>,
    pub pps: Option<Scalar>,
    pub bps: Option<Scalar>,
    pub udp_pps: Option<Scalar>,
    pub icmp_pps: Option<Scalar>,
    pub new_flows_per_sec: Option<Scalar>,
    pub unreplied_syn_per_sec: Option<Scalar>,
    pub amplification_ports: Option<Vec<u16>>,
    pub amplification_flows_per_sec: Option<Scalar>,
    pub max_targets: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBruteForce {
    pub enabled: Option<bool>,
    pub window: Option<Scalar>,
    pub attempts: Option<Scalar>,
    pub max_flow_duration: Option<Scalar>,
    pub ports: Option<Vec<u16>>,
    pub spread: Option<RawSpread>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpread {
    pub enabled: Option<bool>,
    pub attempts: Option<Scalar>,
    pub distinct_targets: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPortScan {
    pub enabled: Option<bool>,
    pub window: Option<Scalar>,
    pub distinct_ports: Option<Scalar>,
    pub min_unanswered_ratio: Option<Scalar>,
    pub udp_distinct_ports: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetworkScan {
    pub enabled: Option<bool>,
    pub window: Option<Scalar>,
    pub distinct_destinations: Option<Scalar>,
    pub min_unanswered_ratio: Option<Scalar>,
    pub answered_distinct_destinations: Option<Scalar>,
    pub min_incomplete_ratio: Option<Scalar>,
    pub slow: Option<RawSlowScan>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSlowScan {
    pub enabled: Option<bool>,
    pub window: Option<Scalar>,
    pub distinct_destinations: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpam {
    pub enabled: Option<bool>,
    pub window: Option<Scalar>,
    pub distinct_destinations: Option<Scalar>,
    pub ports: Option<Vec<u16>>,
}

/// What to do about a category, besides climbing the ladder.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    pub start_at: Option<Scalar>,
    pub announce: Option<Vec<Announce>>,
    pub flowspec_match: Option<FlowspecMatch>,
    pub rate_limit: Option<Scalar>,
}

/// What to announce for the holds an operator makes (`egressguard block`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOperatorBlocks {
    pub announce: Option<Vec<Announce>>,
    pub rate_limit: Option<Scalar>,
}

/// How narrowly a flowspec rule matches the offender's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowspecMatch {
    /// Everything from the source.
    Source,
    /// Only the category's protocol and destination ports (port 25 for spam, ...).
    Service,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEscalation {
    pub forget_after: Option<Scalar>,
    pub ladder: Option<Vec<RawRung>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRung {
    pub action: RungAction,
    #[serde(rename = "for")]
    pub for_: Option<Scalar>,
    pub until: Option<String>,
    pub announce: Option<bool>,
}

/// The action of a ladder rung.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RungAction {
    Quarantine,
    Block,
    Terminate,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReconnect {
    pub address: Scalar,
    pub ticket: Scalar,
    pub authorised_by: String,
    #[serde(default)]
    pub conditions: Vec<String>,
    pub expires: Scalar,
    pub override_termination: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnforcement {
    pub table: Option<String>,
    #[serde(default)]
    pub walled_garden: Vec<Scalar>,
    pub blackhole: Option<RawBlackhole>,
    pub ipv6_block_prefix: Option<Scalar>,
    pub reconcile_interval: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBlackhole {
    pub enabled: Option<bool>,
    pub table: Option<Scalar>,
    pub protocol: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub max_new_blocks_per_minute: Option<Scalar>,
    pub max_blocks_per_network: Option<Scalar>,
    pub cool_down: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAntiSpoofing {
    pub enabled: Option<bool>,
    pub learn: Option<bool>,
    #[serde(default)]
    pub bindings: Vec<RawBinding>,
    #[serde(default)]
    pub exempt: Vec<Scalar>,
    pub rebind_after: Option<Scalar>,
    pub packets: Option<Scalar>,
    pub window: Option<Scalar>,
    pub max_bindings: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBinding {
    pub address: Scalar,
    pub mac: Scalar,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBgp {
    pub local_as: Scalar,
    pub router_id: Scalar,
    #[serde(default)]
    pub peers: Vec<RawPeer>,
    pub listen: Option<Scalar>,
    pub graceful_restart: Option<RawGracefulRestart>,
}

/// `bgp.graceful_restart:` (RFC 4724, RFC 9494).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGracefulRestart {
    pub restart_time: Option<Scalar>,
    pub long_lived_stale_time: Option<Scalar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: Option<String>,
    pub address: Scalar,
    pub port: Option<Scalar>,
    pub remote_as: Scalar,
    pub local_address: Option<Scalar>,
    pub hold_time: Option<Scalar>,
    pub families: Option<Vec<String>>,
    pub announce: Option<Vec<Announce>>,
    #[serde(default)]
    pub rtbh_communities: Vec<Scalar>,
    #[serde(default)]
    pub flowspec_communities: Vec<Scalar>,
    pub rtbh_next_hop_v4: Option<Scalar>,
    pub rtbh_next_hop_v6: Option<Scalar>,
    pub accept_flowspec: Option<bool>,
    pub max_learned: Option<Scalar>,
    pub md5_password_file: Option<String>,
    pub passive: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub command: Option<Vec<String>>,
    pub timeout: Option<Scalar>,
    pub retries: Option<Scalar>,
    pub report_dir: Option<String>,
    pub reporter: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDetection {
    pub evaluation_interval: Option<Scalar>,
    pub counter_interval: Option<Scalar>,
    pub max_sources: Option<Scalar>,
    pub flood_tolerance: Option<Scalar>,
    pub sample_flows_above: Option<Scalar>,
}
