//! Where each YAML node starts: a map from a node's path to its line and column.
//!
//! `serde_yaml` gives typed values but no positions for them; this index, built from the
//! event stream of a second, position-aware parser, lets every later pass point at the exact
//! key or value it complains about. Nodes reached through an alias or a `<<` merge have no
//! entry of their own: lookups fall back to the nearest ancestor that has one.

use std::collections::HashMap;
use yaml_rust2::parser::{Event, Parser};

/// One step of a path into a YAML document.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path into a YAML document, e.g. `builders.test.steps[2].run`.
pub type Path = Vec<Seg>;

pub fn key(k: &str) -> Seg {
    Seg::Key(k.to_owned())
}

/// Renders a path as `builders.test.steps[2].run`.
pub fn display(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

/// Paths are stored as 64-bit hashes built segment by segment, so indexing a file allocates
/// nothing per node (a large fleet has hundreds of thousands of nodes).
type PathHash = u64;

const ROOT: PathHash = 0xcbf2_9ce4_8422_2325;

fn mix(parent: PathHash, tag: u8, bytes: &[u8]) -> PathHash {
    // FNV-1a over the segment, seeded with the parent, then a finaliser to spread the bits.
    let mut h = parent ^ u64::from(tag).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

fn child_key(parent: PathHash, k: &str) -> PathHash {
    mix(parent, b'k', k.as_bytes())
}

fn child_index(parent: PathHash, i: usize) -> PathHash {
    mix(parent, b'i', &(i as u64).to_le_bytes())
}

fn hash_path(path: &[Seg]) -> Vec<PathHash> {
    let mut out = Vec::with_capacity(path.len() + 1);
    let mut h = ROOT;
    out.push(h);
    for seg in path {
        h = match seg {
            Seg::Key(k) => child_key(h, k),
            Seg::Index(i) => child_index(h, *i),
        };
        out.push(h);
    }
    out
}

/// A hasher for keys that are already hashes.
#[derive(Default, Clone, Copy)]
struct Passthrough(u64);

impl std::hash::Hasher for Passthrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<PathHash, Pos, std::hash::BuildHasherDefault<Passthrough>>;

#[derive(Debug, Clone, Default)]
pub struct SpanIndex {
    values: Map,
    keys: Map,
    /// Keys that appear a second time in the same mapping, in document order.
    duplicates: Vec<Pos>,
}

enum Frame {
    Map { path: PathHash, pending_key: Option<PathHash>, seen_key: bool },
    Seq { path: PathHash, next: usize },
}

impl SpanIndex {
    /// Indexes `text`. A document the position parser cannot read yields an empty index
    /// (syntax errors are reported from the main parser).
    pub fn build(text: &str) -> SpanIndex {
        let mut index = SpanIndex::default();
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<Frame> = Vec::new();
        while let Ok((event, mark)) = parser.next_token() {
            let pos = Pos { line: mark.line() as u32, col: mark.col() as u32 + 1 };
            match event {
                Event::StreamEnd => break,
                Event::Scalar(value, ..) => {
                    if let Some(path) = index.place_value(&mut stack, pos, Some(&value)) {
                        index.values.entry(path).or_insert(pos);
                    }
                }
                Event::Alias(_) => {
                    if let Some(path) = index.place_value(&mut stack, pos, None) {
                        index.values.entry(path).or_insert(pos);
                    }
                }
                Event::MappingStart(..) => {
                    let path = index.place_value(&mut stack, pos, None).unwrap_or(ROOT);
                    index.values.entry(path).or_insert(pos);
                    stack.push(Frame::Map { path, pending_key: None, seen_key: false });
                }
                Event::SequenceStart(..) => {
                    let path = index.place_value(&mut stack, pos, None).unwrap_or(ROOT);
                    index.values.entry(path).or_insert(pos);
                    stack.push(Frame::Seq { path, next: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                _ => {}
            }
        }
        index
    }

    /// Works out the path of the node that starts now. For a scalar in key position it
    /// records the key and returns `None`.
    fn place_value(&mut self, stack: &mut [Frame], pos: Pos, scalar: Option<&str>) -> Option<PathHash> {
        match stack.last_mut() {
            None => Some(ROOT),
            Some(Frame::Seq { path, next }) => {
                let p = child_index(*path, *next);
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, pending_key, seen_key }) => match pending_key.take() {
                Some(p) => Some(p),
                None => {
                    // A key. Complex (non-scalar) keys get a placeholder name.
                    let p = child_key(*path, scalar.unwrap_or("?"));
                    // A block mapping's start mark sits at its first `:`; its first key is
                    // where a reader sees it begin.
                    if !*seen_key {
                        *seen_key = true;
                        if let Some(start) = self.values.get_mut(path)
                            && (pos.line, pos.col) < (start.line, start.col)
                        {
                            *start = pos;
                        }
                    }
                    // The hash includes the mapping's own path: a repeat is a duplicate key.
                    if let std::collections::hash_map::Entry::Vacant(e) = self.keys.entry(p) {
                        e.insert(pos);
                    } else {
                        self.duplicates.push(pos);
                    }
                    *pending_key = Some(p);
                    None
                }
            },
        }
    }

    /// Position of the value at `path`, or of its nearest indexed ancestor.
    pub fn value(&self, path: &[Seg]) -> Pos {
        let hashes = hash_path(path);
        for h in hashes.iter().rev() {
            if let Some(pos) = self.values.get(h) {
                return *pos;
            }
        }
        Pos { line: 1, col: 1 }
    }

    /// Where a key is repeated in its mapping, first such place.
    pub fn first_duplicate(&self) -> Option<Pos> {
        self.duplicates.first().copied()
    }

    /// Position of the key naming `path` (its last segment), else of the value.
    pub fn key(&self, path: &[Seg]) -> Pos {
        let hashes = hash_path(path);
        match hashes.last().and_then(|h| self.keys.get(h)) {
            Some(pos) => *pos,
            None => self.value(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_keys_values_and_sequence_items() {
        let text = "builders:\n  test:\n    needs: [a, b]\n    steps:\n      - run: x\n";
        let idx = SpanIndex::build(text);
        let p = |s: &[Seg]| idx.value(s);
        assert_eq!(p(&[key("builders"), key("test"), key("needs"), Seg::Index(1)]), Pos { line: 3, col: 16 });
        assert_eq!(idx.key(&[key("builders"), key("test")]), Pos { line: 2, col: 3 });
        assert_eq!(
            p(&[key("builders"), key("test"), key("steps"), Seg::Index(0), key("run")]),
            Pos { line: 5, col: 14 }
        );
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(
            p(&[key("builders"), key("test"), key("nothing"), Seg::Index(3)]),
            idx.value(&[key("builders"), key("test")])
        );
    }
}
