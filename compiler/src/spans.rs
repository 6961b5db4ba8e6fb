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

#[derive(Debug, Default)]
pub struct SpanIndex {
    values: HashMap<Path, Pos>,
    keys: HashMap<Path, Pos>,
    /// Keys that appear a second time in the same mapping, in document order.
    duplicates: Vec<(Path, Pos)>,
}

enum Frame {
    Map { path: Path, pending_key: Option<String> },
    Seq { path: Path, next: usize },
}

impl SpanIndex {
    /// Indexes `text`. A document the position parser cannot read yields an empty index
    /// (syntax errors are reported from the main parser).
    pub fn build(text: &str) -> SpanIndex {
        let mut index = SpanIndex::default();
        let mut parser = Parser::new_from_str(text);
        let mut stack: Vec<Frame> = Vec::new();
        let mut depth_guard = 0usize;
        loop {
            let Ok((event, mark)) = parser.next_token() else {
                break;
            };
            depth_guard += 1;
            if depth_guard > 5_000_000 {
                break;
            }
            let pos = Pos { line: mark.line() as u32, col: mark.col() as u32 + 1 };
            match event {
                Event::StreamEnd => break,
                Event::Scalar(value, ..) => {
                    if let Some(path) = index.place_value(&mut stack, pos, Some(value)) {
                        index.values.entry(path).or_insert(pos);
                    }
                }
                Event::Alias(_) => {
                    if let Some(path) = index.place_value(&mut stack, pos, None) {
                        index.values.entry(path).or_insert(pos);
                    }
                }
                Event::MappingStart(..) => {
                    let path = index.place_value(&mut stack, pos, None).unwrap_or_default();
                    index.values.entry(path.clone()).or_insert(pos);
                    stack.push(Frame::Map { path, pending_key: None });
                }
                Event::SequenceStart(..) => {
                    let path = index.place_value(&mut stack, pos, None).unwrap_or_default();
                    index.values.entry(path.clone()).or_insert(pos);
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
    fn place_value(&mut self, stack: &mut [Frame], pos: Pos, scalar: Option<String>) -> Option<Path> {
        match stack.last_mut() {
            None => Some(Vec::new()),
            Some(Frame::Seq { path, next }) => {
                let mut p = path.clone();
                p.push(Seg::Index(*next));
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, pending_key }) => match pending_key.take() {
                Some(k) => {
                    let mut p = path.clone();
                    p.push(Seg::Key(k));
                    Some(p)
                }
                None => {
                    // A key. Complex (non-scalar) keys get a placeholder name.
                    let k = scalar.unwrap_or_else(|| "?".to_owned());
                    // A block mapping's start mark sits at its first `:`; its first key is
                    // where a reader sees it begin.
                    if let Some(start) = self.values.get_mut(path.as_slice()) {
                        if (pos.line, pos.col) < (start.line, start.col) {
                            *start = pos;
                        }
                    }
                    let mut p = path.clone();
                    p.push(Seg::Key(k.clone()));
                    if self.keys.contains_key(&p) {
                        self.duplicates.push((p, pos));
                    } else {
                        self.keys.insert(p, pos);
                    }
                    *pending_key = Some(k);
                    None
                }
            },
        }
    }

    /// Position of the value at `path`, or of its nearest indexed ancestor.
    pub fn value(&self, path: &[Seg]) -> Pos {
        for len in (0..=path.len()).rev() {
            if let Some(pos) = self.values.get(&path[..len]) {
                return *pos;
            }
        }
        Pos { line: 1, col: 1 }
    }

    /// Where a key is repeated in its mapping, first such place.
    pub fn first_duplicate(&self) -> Option<&(Path, Pos)> {
        self.duplicates.first()
    }

    /// Position of the key naming `path` (its last segment), else of the value.
    pub fn key(&self, path: &[Seg]) -> Pos {
        match self.keys.get(path) {
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
