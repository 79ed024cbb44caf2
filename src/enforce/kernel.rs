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
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

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
    /// `comment`, when set.
    pub comment: Option<String>,
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

/// Parses `nft -j list table inet <table>` output.
pub fn parse_table(text: &str, table: &str) -> Result<KernelTable, ParseError> {
    read_table(text.as_bytes(), table)
}

/// Parses `nft -j list table inet <table>` output as it is read. The per-source counter and
/// meter sets hold hundreds of thousands of elements in a storm, which the agent never
/// compares (the packet path fills them): their elements are skipped as they stream past,
/// so a listing costs the memory of the sets the agent manages, not tens of megabytes of
/// text.
pub fn read_table(reader: impl std::io::Read, table: &str) -> Result<KernelTable, ParseError> {
    let mut b = Builder {
        table,
        out: KernelTable::default(),
        seen_table: false,
        shape: None,
    };
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(reader));
    let parsed = Top(&mut b).deserialize(&mut de).and_then(|()| de.end());
    if let Some(e) = b.shape {
        return Err(e);
    }
    parsed.map_err(ParseError::Json)?;
    if !b.seen_table {
        return Err(shape(format!(
            "table inet {table} missing from its listing"
        )));
    }
    Ok(b.out)
}

/// What the listing has shown so far.
struct Builder<'t> {
    table: &'t str,
    out: KernelTable,
    seen_table: bool,
    /// The first shape error: the parse stops there.
    shape: Option<ParseError>,
}

impl Builder<'_> {
    /// Records a shape error, returning the error that stops the parse.
    fn fail<E: de::Error>(&mut self, e: ParseError) -> E {
        let msg = e.to_string();
        self.shape.get_or_insert(e);
        E::custom(msg)
    }

    fn ours(&self, family: Option<&str>, table: Option<&str>) -> bool {
        family == Some("inet") && table == Some(self.table)
    }

    /// Takes in a `table`, `chain` or `rule` object.
    fn object(&mut self, kind: &str, body: &Value) -> Result<(), ParseError> {
        let field = |k: &str| body.get(k).and_then(Value::as_str);
        match kind {
            "table" if field("family") == Some("inet") && field("name") == Some(self.table) => {
                self.seen_table = true;
            }
            "chain" if self.ours(field("family"), field("table")) => {
                let name = str_field(body, "name")?;
                let c = self.out.chains.entry(name.to_owned()).or_default();
                c.chain_type = field("type").map(str::to_owned);
                c.hook = field("hook").map(str::to_owned);
                c.prio = body.get("prio").and_then(Value::as_i64);
                c.policy = field("policy").map(str::to_owned);
            }
            "rule" if self.ours(field("family"), field("table")) => {
                let chain = str_field(body, "chain")?;
                let rule = normalise_rule(body);
                self.out
                    .chains
                    .entry(chain.to_owned())
                    .or_default()
                    .rules
                    .push(rule);
            }
            _ => {}
        }
        Ok(())
    }
}

/// `{"nftables": [...]}`.
struct Top<'a, 't>(&'a mut Builder<'t>);

impl<'de> DeserializeSeed<'de> for Top<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Top<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with `nftables`")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some(k) = m.next_key::<String>()? {
            if k == "nftables" {
                m.next_value_seed(Objects(&mut *self.0))?;
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The array of objects.
struct Objects<'a, 't>(&'a mut Builder<'t>);

impl<'de> DeserializeSeed<'de> for Objects<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Objects<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        while s.next_element_seed(Object(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// One object: `{"<kind>": {...}}`.
struct Object<'a, 't>(&'a mut Builder<'t>);

impl<'de> DeserializeSeed<'de> for Object<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Object<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while let Some(kind) = m.next_key::<String>()? {
            match kind.as_str() {
                "set" => m.next_value_seed(SetObject(&mut *self.0))?,
                "table" | "chain" | "rule" => {
                    let body: Value = m.next_value()?;
                    if let Err(e) = self.0.object(&kind, &body) {
                        return Err(self.0.fail(e));
                    }
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A `set` object: its elements are skipped when it is a counting set (nft lists the name
/// before the elements) or another table's.
struct SetObject<'a, 't>(&'a mut Builder<'t>);

impl<'de> DeserializeSeed<'de> for SetObject<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SetObject<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a set object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let (mut family, mut table, mut name) = (None::<String>, None::<String>, None::<String>);
        let mut body = serde_json::Map::new();
        while let Some(k) = m.next_key::<String>()? {
            match k.as_str() {
                "family" => family = Some(m.next_value()?),
                "table" => table = Some(m.next_value()?),
                "name" => name = Some(m.next_value()?),
                "type" | "flags" | "size" | "timeout" | "comment" => {
                    body.insert(k, m.next_value()?);
                }
                "elem" => {
                    let theirs = (family.is_some() && table.is_some())
                        && !self.0.ours(family.as_deref(), table.as_deref());
                    let counting = name.as_deref().is_some_and(counting_set);
                    if theirs || counting {
                        m.next_value::<IgnoredAny>()?;
                    } else {
                        body.insert(k, m.next_value()?);
                    }
                }
                _ => {
                    m.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !self.0.ours(family.as_deref(), table.as_deref()) {
            return Ok(());
        }
        let Some(name) = name else {
            return Err(self.0.fail(shape("missing `name`")));
        };
        if counting_set(&name) {
            body.remove("elem");
        }
        match parse_set(&Value::Object(body)) {
            Ok(set) => {
                self.0.out.sets.insert(name, set);
                Ok(())
            }
            Err(e) => Err(self.0.fail(e)),
        }
    }
}

/// Whether `name` is one of the sets the packet path fills.
fn counting_set(name: &str) -> bool {
    SetId::all().any(|s| s.role.counting() && s.name() == name)
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
        comment: body
            .get("comment")
            .and_then(Value::as_str)
            .map(str::to_owned),
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
               "size": 65535, "flags": ["timeout"], "timeout": 300,
               "elem": [{"elem": {"val": "10.1.2.3", "timeout": 300, "expires": 299,
                                  "counter": {"packets": 1, "bytes": 60}}}]}},
      {"set": {"family": "inet", "name": "meter_pps4", "table": "egressguard", "type": "ipv4_addr", "handle": 9,
               "flags": ["timeout"], "timeout": 60,
               "elem": [{"elem": {"val": "10.1.2.3", "limit": {"rate": 2000, "burst": 400}}}]}},
      {"set": {"family": "inet", "name": "other", "table": "filter", "type": "ipv4_addr", "handle": 3,
               "elem": [{"weird": true}]}},
      {"set": {"elem": ["10.9.9.9"], "family": "inet", "table": "egressguard", "name": "allow4",
               "type": "ipv4_addr", "flags": ["interval"]}},
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
        // The packet path's sets: defined, their elements skipped.
        assert!(t.sets["src_counters4"].elems.is_empty());
        assert_eq!(t.sets["meter_pps4"].timeout, Some(60));
        assert!(t.sets["meter_pps4"].elems.is_empty());
        // Elements before the name are read all the same.
        assert_eq!(t.sets["allow4"].elems.len(), 1);
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
