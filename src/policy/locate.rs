//! Where each setting stands in the file: a map from path (`networks[2].prefix`) to line and
//! column, built from the YAML event stream; and the limits that keep a hostile file from
//! costing the agent its memory or its stack.
//!
//! serde_yaml reports positions for the errors it finds itself, but the typed values it
//! produces carry none. This pass gives the validator a position for every value, so a
//! semantic error ("this reconnect address is not in any customer network") points at the
//! exact place in the file.
//!
//! It is also the gate in front of serde: it walks the events one by one (never
//! recursively, so nesting cannot overflow a stack) and refuses, at the place in the file
//! where the limit is crossed, a document nested deeper than [`MAX_DEPTH`], one that would
//! expand (every alias counted at the full size of what it names: "billion laughs") to more
//! than [`MAX_NODES`] values or [`MAX_EXPANDED_BYTES`] bytes of text, and a mapping key
//! longer than [`MAX_KEY_BYTES`]. A file the event parser cannot read is refused here with
//! its error, so serde never reads text this pass did not check. [`MAX_POLICY_BYTES`]
//! bounds the file itself (checked before the file is read whole: [`super::read_text`]).

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// The largest policy file accepted, in bytes. The shipped examples are under 10 KB; a
/// policy with 5,000 reconnect entries and a 20,000-prefix allowlist is about 1.2 MB.
pub const MAX_POLICY_BYTES: usize = 2 << 20;
/// The deepest nesting of mappings and sequences (the schema's deepest setting is 5 levels).
pub const MAX_DEPTH: usize = 32;
/// The most values (scalars, mappings, sequences), aliases expanded, in one file.
pub const MAX_NODES: u64 = 250_000;
/// The most scalar text, aliases expanded, in one file.
pub const MAX_EXPANDED_BYTES: u64 = 8 << 20;
/// The longest mapping key.
pub const MAX_KEY_BYTES: usize = 1024;

/// How the message of a [`Refusal`] for a syntax error starts.
pub const SYNTAX: &str = "YAML syntax: ";

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl Pos {
    /// The start of the file.
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// Why the reader refused a document before serde saw it: where, what, and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Where the limit was crossed (or the syntax error is).
    pub at: Pos,
    /// What is wrong.
    pub message: String,
    /// What to write instead.
    pub help: Option<String>,
}

/// Positions of every value and mapping key in a YAML document.
#[derive(Debug, Default)]
pub struct Index {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
}

impl Index {
    /// Indexes `text`; a document the event parser cannot read yields whatever it read up to
    /// the error, and one over a limit whatever it read up to the limit. See [`Index::read`].
    pub fn new(text: &str) -> Index {
        match Index::read(text) {
            Ok(ix) => ix,
            Err(refused) => refused.0,
        }
    }

    /// Indexes `text` within the limits of this module; a syntax error or a limit crossed
    /// is a [`Refusal`] (with the index of what was read before it).
    pub fn read(text: &str) -> Result<Index, Box<(Index, Refusal)>> {
        let mut rx = Receiver {
            index: Index::default(),
            stack: Vec::new(),
            budget: Budget::default(),
        };
        let mut parser = Parser::new_from_str(text);
        loop {
            match parser.next_token() {
                Ok((Event::StreamEnd, _)) => return Ok(rx.index),
                Ok((ev, mark)) => {
                    if let Err(r) = rx.on_event(ev, mark) {
                        return Err(Box::new((rx.index, r)));
                    }
                }
                Err(e) => {
                    let r = Refusal {
                        at: pos(*e.marker()),
                        message: format!("{SYNTAX}{}", e.info()),
                        help: Some(
                            "check the indentation, the quotes and the brackets near this place"
                                .into(),
                        ),
                    };
                    return Err(Box::new((rx.index, r)));
                }
            }
        }
    }

    /// The position of the value at `path`, or of its nearest ancestor that exists.
    pub fn value(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if p.is_empty() {
                return Pos::START;
            }
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            match parent(p) {
                Some(up) => p = up,
                None => return Pos::START,
            }
        }
    }

    /// The position of the key that introduces `path` (for "remove this" or "misplaced"
    /// messages), falling back to the value's position.
    pub fn key(&self, path: &str) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value(path))
    }

    /// Whether `path` is written in the file.
    pub fn has(&self, path: &str) -> bool {
        self.values.contains_key(path)
    }
}

/// `a.b[3]` → `a.b`; `a.b` → `a`; `a` → ``; `` → none.
fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        first: bool,
        anchor: usize,
        start: Size,
        height: usize,
    },
    Seq {
        path: String,
        next: usize,
        anchor: usize,
        start: Size,
        height: usize,
    },
}

impl Frame {
    fn close(&self) -> (usize, Size, usize) {
        match self {
            Frame::Map {
                anchor,
                start,
                height,
                ..
            }
            | Frame::Seq {
                anchor,
                start,
                height,
                ..
            } => (*anchor, *start, *height),
        }
    }

    fn grow(&mut self, h: usize) {
        match self {
            Frame::Map { height, .. } | Frame::Seq { height, .. } => *height = (*height).max(h),
        }
    }
}

/// Values and bytes of scalar text, aliases expanded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Size {
    nodes: u64,
    bytes: u64,
}

/// What the document expands to so far, and what each anchor expands to.
#[derive(Default)]
struct Budget {
    total: Size,
    /// Per anchor id: its expanded size and its height (levels of nesting it adds).
    anchors: HashMap<usize, (Size, usize)>,
}

struct Receiver {
    index: Index,
    stack: Vec<Frame>,
    budget: Budget,
}

fn pos(m: Marker) -> Pos {
    Pos {
        line: m.line().max(1),
        column: m.col() + 1,
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl Receiver {
    /// Counts a value of `size` and `height` (an alias brings those of its anchor) placed at
    /// the current depth; refuses when a limit is crossed.
    fn account(&mut self, size: Size, height: usize, mark: Marker) -> Result<(), Refusal> {
        let t = &mut self.budget.total;
        t.nodes = t.nodes.saturating_add(size.nodes);
        t.bytes = t.bytes.saturating_add(size.bytes);
        let depth = self.stack.len() + height;
        if let Some(top) = self.stack.last_mut() {
            top.grow(height);
        }
        let at = pos(mark);
        if depth > MAX_DEPTH {
            return Err(Refusal {
                at,
                message: format!(
                    "nested {depth} levels deep here; the policy reader accepts at most {MAX_DEPTH}"
                ),
                help: Some(
                    "no setting is nested this deep: check the indentation, or the alias used here"
                        .into(),
                ),
            });
        }
        if t.nodes > MAX_NODES {
            return Err(Refusal {
                at,
                message: format!(
                    "the policy expands to more than {MAX_NODES} values here (aliases counted at their full size)"
                ),
                help: Some(
                    "write the lists out instead of multiplying them with anchors and aliases, or split what is not needed"
                        .into(),
                ),
            });
        }
        if t.bytes > MAX_EXPANDED_BYTES {
            return Err(Refusal {
                at,
                message: format!(
                    "the policy expands to more than {} MiB of text here (aliases counted at their full size)",
                    MAX_EXPANDED_BYTES >> 20
                ),
                help: Some("do not repeat long values with anchors and aliases".into()),
            });
        }
        Ok(())
    }

    fn on_event(&mut self, ev: Event, mark: Marker) -> Result<(), Refusal> {
        // A scalar where a mapping expects its key is a key, not a value.
        if let Some(Frame::Map {
            path, key, first, ..
        }) = self.stack.last_mut()
            && key.is_none()
        {
            match &ev {
                Event::Scalar(k, ..) => {
                    if k.len() > MAX_KEY_BYTES {
                        return Err(Refusal {
                            at: pos(mark),
                            message: format!(
                                "a mapping key of {} bytes; the policy reader accepts at most {MAX_KEY_BYTES}",
                                k.len()
                            ),
                            help: Some("no setting or name is this long: check the quotes".into()),
                        });
                    }
                    let full = join(path, k);
                    // A block mapping's start event is marked at its first `:`; the first
                    // key is where a reader sees the mapping begin.
                    if *first {
                        self.index.values.insert(path.clone(), pos(mark));
                        *first = false;
                    }
                    self.index.keys.insert(full, pos(mark));
                    *key = Some(k.clone());
                    let bytes = k.len() as u64;
                    return self.account(Size { nodes: 1, bytes }, 0, mark);
                }
                Event::MappingEnd => return self.end(mark),
                Event::MappingStart(..) | Event::SequenceStart(..) | Event::Alias(_) => {
                    // A complex key: index it under a placeholder name.
                    *key = Some("<key>".to_owned());
                }
                _ => return Ok(()),
            }
        }
        let path = match self.stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key, .. }) => join(path, &key.take().unwrap_or_default()),
            Some(Frame::Seq { path, next, .. }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                p
            }
        };
        match ev {
            Event::Scalar(v, _, anchor, _) => {
                self.index.values.insert(path, pos(mark));
                let size = Size {
                    nodes: 1,
                    bytes: v.len() as u64,
                };
                if anchor != 0 {
                    self.budget.anchors.insert(anchor, (size, 0));
                }
                self.account(size, 0, mark)
            }
            Event::Alias(id) => {
                self.index.values.insert(path, pos(mark));
                let (size, height) = self
                    .budget
                    .anchors
                    .get(&id)
                    .copied()
                    .unwrap_or((Size { nodes: 1, bytes: 0 }, 0));
                self.account(size, height, mark)
            }
            Event::MappingStart(anchor, _) | Event::SequenceStart(anchor, _) => {
                let map = matches!(ev, Event::MappingStart(..));
                // Moved to its first key when one comes (see above).
                self.index.values.insert(path.clone(), pos(mark));
                self.account(Size { nodes: 1, bytes: 0 }, 1, mark)?;
                let start = self.budget.total;
                self.stack.push(if map {
                    Frame::Map {
                        path,
                        key: None,
                        first: true,
                        anchor,
                        start,
                        height: 0,
                    }
                } else {
                    Frame::Seq {
                        path,
                        next: 0,
                        anchor,
                        start,
                        height: 0,
                    }
                });
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => self.end(mark),
            _ => Ok(()),
        }
    }

    /// A mapping or sequence ends: its anchor, if any, remembers what it expands to.
    fn end(&mut self, _mark: Marker) -> Result<(), Refusal> {
        let Some(frame) = self.stack.pop() else {
            return Ok(());
        };
        let (anchor, start, height) = frame.close();
        if let Some(parent) = self.stack.last_mut() {
            parent.grow(height + 1);
        }
        if anchor != 0 {
            let t = self.budget.total;
            let size = Size {
                // The container itself was counted before `start` was taken.
                nodes: t.nodes - start.nodes + 1,
                bytes: t.bytes - start.bytes,
            };
            self.budget.anchors.insert(anchor, (size, height + 1));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
mode: enforce
networks:
  - prefix: 203.0.113.0/24
    profile: default
  - prefix: 2001:db8::/48
profiles:
  default:
    flood: {pps: 100, window: 10s}
";

    #[test]
    fn positions_of_values_and_keys() {
        let ix = Index::new(DOC);
        assert_eq!(ix.value("mode"), Pos { line: 1, column: 7 });
        assert_eq!(
            ix.value("networks[0].prefix"),
            Pos {
                line: 3,
                column: 13
            }
        );
        assert_eq!(
            ix.value("networks[1].prefix"),
            Pos {
                line: 5,
                column: 13
            }
        );
        assert_eq!(ix.key("networks[0].profile"), Pos { line: 4, column: 5 });
        assert_eq!(
            ix.value("profiles.default.flood.window"),
            Pos {
                line: 8,
                column: 31
            }
        );
    }

    #[test]
    fn missing_paths_fall_back_to_the_nearest_ancestor() {
        let ix = Index::new(DOC);
        assert_eq!(ix.value("networks[1].profile"), ix.value("networks[1]"));
        assert_eq!(ix.value("nothing.here"), Pos::START);
        assert!(!ix.has("networks[1].profile"));
    }
}
