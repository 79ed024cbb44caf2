//! Where each setting stands in the file: a map from path (`networks[2].prefix`) to line and
//! column, built from the YAML event stream.
//!
//! serde_yaml reports positions for the errors it finds itself, but the typed values it
//! produces carry none. This pass gives the validator a position for every value, so a
//! semantic error ("this reconnect address is not in any customer network") points at the
//! exact place in the file.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

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

/// Positions of every value and mapping key in a YAML document.
#[derive(Debug, Default)]
pub struct Index {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
}

impl Index {
    /// Indexes `text`. A document the event parser cannot read yields whatever it read up to
    /// the error (serde_yaml reports the syntax error itself).
    pub fn new(text: &str) -> Index {
        let mut rx = Receiver {
            index: Index::default(),
            stack: Vec::new(),
        };
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut rx, false);
        rx.index
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
    },
    Seq {
        path: String,
        next: usize,
    },
}

struct Receiver {
    index: Index,
    stack: Vec<Frame>,
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

impl MarkedEventReceiver for Receiver {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        // A scalar where a mapping expects its key is a key, not a value.
        if let Some(Frame::Map { path, key, first }) = self.stack.last_mut()
            && key.is_none()
        {
            match &ev {
                Event::Scalar(k, ..) => {
                    let full = join(path, k);
                    // A block mapping's start event is marked at its first `:`; the first
                    // key is where a reader sees the mapping begin.
                    if *first {
                        self.index.values.insert(path.clone(), pos(mark));
                        *first = false;
                    }
                    self.index.keys.insert(full, pos(mark));
                    *key = Some(k.clone());
                    return;
                }
                Event::MappingEnd => {
                    self.stack.pop();
                    return;
                }
                Event::MappingStart(..) | Event::SequenceStart(..) | Event::Alias(_) => {
                    // A complex key: index it under a placeholder name.
                    *key = Some("<key>".to_owned());
                }
                _ => return,
            }
        }
        let path = match self.stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key, .. }) => join(path, &key.take().unwrap_or_default()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                p
            }
        };
        match ev {
            Event::Scalar(..) | Event::Alias(_) => {
                self.index.values.insert(path, pos(mark));
            }
            Event::MappingStart(..) => {
                // Moved to its first key when one comes (see above).
                self.index.values.insert(path.clone(), pos(mark));
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    first: true,
                });
            }
            Event::SequenceStart(..) => {
                self.index.values.insert(path.clone(), pos(mark));
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
            }
            _ => {}
        }
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
