//! What the kernel holds of the agent's table: the parsed output of
//! `nft -j list table inet <name>`.
//!
//! Only what the enforcer compares is kept: each set's definition and elements, each chain's
//! hook and its rules (normalised: handles dropped, counter values zeroed). The listing comes
//! from outside the agent, so anything malformed is a [`ParseError`], never a panic; objects
//! of kinds the agent does not create are ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;
use serde_json::value::RawValue;

use super::layout::{ElemKey, SetId};

/// Why a listing could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The text is not JSON.
    #[error("`nft -j` printed something that is not JSON")]
    Json(#[source] serde_json::Error),
    /// The JSON does not have the shape nft documents (libnftables-json(5)).
    #[error("unexpected `nft -j` output: {0}")]
    Shape(String),
}

/// One element of a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelElem {
    /// The address, prefix or range.
    pub key: ElemKey,
    /// Its timeout in seconds, when it has one.
    pub timeout: Option<u64>,
    /// Seconds until it expires, when it has a timeout.
    pub expires: Option<u64>,
}

/// One set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSet {
    /// `ipv4_addr`, `ipv6_addr`, ...
    pub set_type: String,
    /// Flags as listed (sorted).
    pub flags: Vec<String>,
    /// `size`, when set.
    pub size: Option<u64>,
    /// Default `timeout`, when set.
    pub timeout: Option<u64>,
    /// Elements.
    pub elems: Vec<KernelElem>,
}

/// One chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelChain {
    /// `filter`, ... (`None` for a regular chain).
    pub chain_type: Option<String>,
    /// Hook name.
    pub hook: Option<String>,
    /// Priority.
    pub prio: Option<i64>,
    /// Policy.
    pub policy: Option<String>,
    /// Rules in order, normalised ([`normalise_rule`]).
    pub rules: Vec<Value>,
}

/// The agent's table as listed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTable {
    /// Sets by name.
    pub sets: BTreeMap<String, KernelSet>,
    /// Chains by name.
    pub chains: BTreeMap<String, KernelChain>,
}

fn shape(msg: impl Into<String>) -> ParseError {
    ParseError::Shape(msg.into())
}

/// The listing's top level, each object's body left unparsed until it is known to be needed.
#[derive(serde::Deserialize)]
struct Listing<'a> {
    #[serde(borrow)]
    nftables: Vec<BTreeMap<std::borrow::Cow<'a, str>, &'a RawValue>>,
}

/// Which table a set belongs to, read without its elements.
#[derive(serde::Deserialize)]
struct SetHead {
    family: Option<String>,
    table: Option<String>,
    name: Option<String>,
}

/// A set's definition without its elements: the per-source counter sets can hold hundreds
/// of thousands, which the agent never compares (the packet path fills them). Building them
/// as a JSON tree would cost about 2 KB of heap each, per listing.
#[derive(serde::Deserialize)]
struct SetNoElems {
    #[serde(rename = "type")]
    set_type: Option<Value>,
    flags: Option<Value>,
    size: Option<Value>,
    timeout: Option<Value>,
}

/// Parses `nft -j list table inet <table>` output.
pub fn parse_table(text: &str, table: &str) -> Result<KernelTable, ParseError> {
    let root: Listing<'_> = serde_json::from_str(text).map_err(ParseError::Json)?;
    let counters: Vec<&str> = SetId::all()
        .filter(|s| s.role.counting())
        .map(SetId::name)
        .collect();
    let mut out = KernelTable::default();
    let mut seen_table = false;
    for obj in &root.nftables {
        for (kind, raw) in obj {
            let kind = kind.as_ref();
            if !matches!(kind, "table" | "set" | "chain" | "rule") {
                continue;
            }
            if kind == "set" {
                let head: SetHead = serde_json::from_str(raw.get()).map_err(ParseError::Json)?;
                if head.family.as_deref() != Some("inet") || head.table.as_deref() != Some(table) {
                    continue;
                }
                let name = head.name.ok_or_else(|| shape("missing `name`"))?;
                let body: Value = if counters.contains(&name.as_str()) {
                    let d: SetNoElems =
                        serde_json::from_str(raw.get()).map_err(ParseError::Json)?;
                    let mut m = serde_json::Map::new();
                    for (k, v) in [
                        ("type", d.set_type),
                        ("flags", d.flags),
                        ("size", d.size),
                        ("timeout", d.timeout),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.to_owned(), v);
                        }
                    }
                    Value::Object(m)
                } else {
                    serde_json::from_str(raw.get()).map_err(ParseError::Json)?
                };
                out.sets.insert(name, parse_set(&body)?);
                continue;
            }
            let body: Value = serde_json::from_str(raw.get()).map_err(ParseError::Json)?;
            let ours = |b: &Value| {
                b.get("family").and_then(Value::as_str) == Some("inet")
                    && b.get("table").and_then(Value::as_str) == Some(table)
            };
            match kind {
                "table"
                    if body.get("family").and_then(Value::as_str) == Some("inet")
                        && body.get("name").and_then(Value::as_str) == Some(table) =>
                {
                    seen_table = true;
                }
                "chain" if ours(&body) => {
                    let name = str_field(&body, "name")?;
                    let c = out.chains.entry(name.to_owned()).or_default();
                    c.chain_type = body.get("type").and_then(Value::as_str).map(str::to_owned);
                    c.hook = body.get("hook").and_then(Value::as_str).map(str::to_owned);
                    c.prio = body.get("prio").and_then(Value::as_i64);
                    c.policy = body
                        .get("policy")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                "rule" if ours(&body) => {
                    let chain = str_field(&body, "chain")?;
                    let rule = normalise_rule(&body);
                    out.chains
                        .entry(chain.to_owned())
                        .or_default()
                        .rules
                        .push(rule);
                }
                _ => {}
            }
        }
    }
    if !seen_table {
        return Err(shape(format!(
            "table inet {table} missing from its listing"
        )));
    }
    Ok(out)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, ParseError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| shape(format!("`{key}` missing or not a string")))
}

fn parse_set(body: &Value) -> Result<KernelSet, ParseError> {
    let set_type = match body.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => return Err(shape("set without `type`")),
    };
    let mut flags: Vec<String> = match body.get("flags") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|f| {
                f.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| shape("set flag not a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(shape("set `flags` of unexpected type")),
    };
    flags.sort();
    let elems = match body.get("elem") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(parse_elem).collect::<Result<_, _>>()?,
        Some(_) => return Err(shape("set `elem` not an array")),
    };
    Ok(KernelSet {
        set_type,
        flags,
        size: body.get("size").and_then(Value::as_u64),
        timeout: body.get("timeout").and_then(Value::as_u64),
        elems,
    })
}

fn parse_elem(v: &Value) -> Result<KernelElem, ParseError> {
    if let Some(e) = v.get("elem") {
        let val = e.get("val").ok_or_else(|| shape("`elem` without `val`"))?;
        return Ok(KernelElem {
            key: parse_key(val)?,
            timeout: e.get("timeout").and_then(Value::as_u64),
            expires: e.get("expires").and_then(Value::as_u64),
        });
    }
    Ok(KernelElem {
        key: parse_key(v)?,
        timeout: None,
        expires: None,
    })
}

fn parse_addr(v: &Value) -> Result<IpAddr, ParseError> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| shape(format!("`{v}` is not an address")))
}

fn parse_key(v: &Value) -> Result<ElemKey, ParseError> {
    match v {
        Value::String(_) => Ok(ElemKey::Net(IpNet::from(parse_addr(v)?))),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr = parse_addr(p.get("addr").unwrap_or(&Value::Null))?;
                let len = p
                    .get("len")
                    .and_then(Value::as_u64)
                    .and_then(|l| u8::try_from(l).ok())
                    .ok_or_else(|| shape("prefix without a usable `len`"))?;
                let net = IpNet::new(addr, len)
                    .map_err(|_| shape(format!("prefix length {len} too long for {addr}")))?;
                Ok(ElemKey::Net(net))
            } else if let Some(Value::Array(r)) = o.get("range") {
                match r.as_slice() {
                    [a, b] => Ok(ElemKey::Range(parse_addr(a)?, parse_addr(b)?)),
                    _ => Err(shape("range without two bounds")),
                }
            } else {
                Err(shape(format!("unknown element `{v}`")))
            }
        }
        _ => Err(shape(format!("unknown element `{v}`"))),
    }
}

/// A rule as compared between two listings: its `expr` and `comment`, with counter values
/// zeroed (they change with traffic) and the handle left out.
pub fn normalise_rule(rule: &Value) -> Value {
    let mut expr = rule.get("expr").cloned().unwrap_or(Value::Null);
    zero_counters(&mut expr);
    serde_json::json!({
        "expr": expr,
        "comment": rule.get("comment").cloned().unwrap_or(Value::Null),
    })
}

fn zero_counters(v: &mut Value) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "counter" && child.is_object() {
                    *child = Value::Null;
                } else {
                    zero_counters(child);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(zero_counters),
        _ => {}
    }
}

/// The comments of a chain's rules, in order (`None` for a rule without one).
pub fn rule_comments(chain: &KernelChain) -> Vec<Option<&str>> {
    chain
        .rules
        .iter()
        .map(|r| r.get("comment").and_then(Value::as_str))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
      {"table": {"family": "inet", "name": "egressguard", "handle": 1}},
      {"set": {"family": "inet", "name": "blocked4", "table": "egressguard", "type": "ipv4_addr", "handle": 4,
               "flags": ["timeout", "interval"],
               "elem": [{"elem": {"val": "10.0.0.0", "timeout": 600, "expires": 599}}, "10.0.0.9",
                        {"prefix": {"addr": "192.0.2.0", "len": 28}},
                        {"range": ["192.0.2.100", "192.0.2.102"]}]}},
      {"set": {"family": "inet", "name": "src_counters4", "table": "egressguard", "type": "ipv4_addr", "handle": 3,
               "size": 65535, "flags": ["timeout"], "timeout": 300}},
      {"set": {"family": "inet", "name": "other", "table": "filter", "type": "ipv4_addr", "handle": 3}},
      {"chain": {"family": "inet", "table": "egressguard", "name": "forward", "handle": 1, "type": "filter",
                 "hook": "forward", "prio": -10, "policy": "accept"}},
      {"rule": {"family": "inet", "table": "egressguard", "chain": "forward", "handle": 6, "comment": "egressguard:x",
                "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@blocked4"}},
                         {"counter": {"packets": 12, "bytes": 1008}}, {"drop": null}]}}]}"#;

    #[test]
    fn parses_sets_chains_and_rules() {
        let t = parse_table(LISTING, "egressguard").unwrap();
        let b = &t.sets["blocked4"];
        assert_eq!(b.flags, ["interval", "timeout"]);
        assert_eq!(b.elems.len(), 4);
        assert_eq!(b.elems[0].timeout, Some(600));
        assert_eq!(b.elems[0].expires, Some(599));
        assert_eq!(b.elems[1].key, ElemKey::Net("10.0.0.9/32".parse().unwrap()));
        assert_eq!(
            b.elems[2].key,
            ElemKey::Net("192.0.2.0/28".parse().unwrap())
        );
        assert!(matches!(b.elems[3].key, ElemKey::Range(..)));
        assert_eq!(t.sets["src_counters4"].size, Some(65535));
        assert!(
            !t.sets.contains_key("other"),
            "other tables' sets are not ours"
        );
        let f = &t.chains["forward"];
        assert_eq!(f.prio, Some(-10));
        assert_eq!(rule_comments(f), [Some("egressguard:x")]);
        assert!(!f.rules[0].to_string().contains("1008"), "counters zeroed");
    }

    #[test]
    fn malformed_listings_are_errors_not_panics() {
        for bad in [
            "",
            "[]",
            r#"{"nftables": 3}"#,
            r#"{"nftables": [1]}"#,
            r#"{"nftables": []}"#,
            r#"{"nftables": [{"table": {"family": "inet", "name": "egressguard"}},
                {"set": {"family": "inet", "table": "egressguard", "name": "s", "type": "ipv4_addr", "elem": [{"prefix": {"addr": "10.0.0.0", "len": 99}}]}}]}"#,
            r#"{"nftables": [{"table": {"family": "inet", "name": "egressguard"}},
                {"set": {"family": "inet", "table": "egressguard", "name": "s", "type": "ipv4_addr", "elem": ["nope"]}}]}"#,
            r#"{"nftables": [{"table": {"family": "inet", "name": "egressguard"}},
                {"set": {"family": "inet", "table": "egressguard", "name": "s", "type": "ipv4_addr", "elem": [{"range": ["10.0.0.1"]}]}}]}"#,
        ] {
            assert!(parse_table(bad, "egressguard").is_err(), "{bad}");
        }
    }
}
