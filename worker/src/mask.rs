//! Masking secrets in a step's output: every occurrence of a secret's value, and of the
//! forms a step commonly prints it in (base64, standard and URL-safe; URL-encoded; each line
//! of a multi-line value), becomes `***` before the output leaves the worker.
//!
//! Output arrives in chunks, and a value can straddle two of them: [`MaskStream`] holds back
//! the last `longest needle - 1` bytes of a chunk until the next one (or the end) shows
//! whether they start a needle. Matching is one Aho–Corasick automaton over every needle,
//! leftmost-longest, so streaming gives exactly what replacing in the whole output at once
//! would. This module knows nothing of the protocol: it turns bytes into bytes.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use std::sync::Arc;

/// What a secret becomes in the output.
pub const MASK: &[u8] = b"***";

/// Needles shorter than this are not masked: they would match ordinary text. The master
/// refuses secrets this short when it reads its config.
pub const MIN_MASKED_LEN: usize = 4;

/// The needles of a set of secret values, compiled once per step.
pub struct Masker {
    automaton: AhoCorasick,
    /// Bytes a stream holds back: the longest needle's length - 1.
    keep: usize,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker").field("needles", &self.automaton.patterns_len()).finish_non_exhaustive()
    }
}

impl Masker {
    /// A masker for `values`; `None` when none of them is long enough to mask (nothing to do).
    pub fn new<V: AsRef<[u8]>>(values: impl IntoIterator<Item = V>) -> Option<Masker> {
        let mut needles: Vec<Vec<u8>> = values.into_iter().flat_map(|v| needles(v.as_ref())).collect();
        needles.sort();
        needles.dedup();
        let keep = needles.iter().map(Vec::len).max()?.saturating_sub(1);
        let automaton = AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&needles).ok()?;
        Some(Masker { automaton, keep })
    }

    /// `data` with every needle replaced (for text that is whole: a reason, a header line).
    pub fn mask_all(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut pos = 0;
        for m in self.automaton.find_iter(data) {
            out.extend_from_slice(&data[pos..m.start()]);
            out.extend_from_slice(MASK);
            pos = m.end();
        }
        out.extend_from_slice(&data[pos..]);
        out
    }

    /// [`Masker::mask_all`] for text.
    pub fn mask_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.mask_all(text.as_bytes())).into_owned()
    }

    /// A stream of chunks to mask with this masker.
    pub fn stream(self: &Arc<Self>) -> MaskStream {
        MaskStream { masker: self.clone(), held: Vec::new() }
    }
}

/// Masks one output stream chunk by chunk.
#[derive(Debug)]
pub struct MaskStream {
    masker: Arc<Masker>,
    /// The end of what came, not yet known to be free of a needle's start.
    held: Vec<u8>,
}

impl MaskStream {
    /// Masks `chunk` after what was held; returns what is now safe to send (possibly empty)
    /// and holds back what may still begin a needle.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        // A needle starting before `cut` lies wholly inside `buf`, so the leftmost-longest
        // choice there is final; one starting at or after it may still grow.
        let cut = buf.len().saturating_sub(self.masker.keep);
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        for m in self.masker.automaton.find_iter(&buf) {
            if m.start() >= cut {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(MASK);
            pos = m.end();
        }
        let sent = cut.max(pos);
        out.extend_from_slice(&buf[pos..sent]);
        buf.drain(..sent);
        self.held = buf;
        out
    }

    /// The end of the stream: what was held, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let held = std::mem::take(&mut self.held);
        self.masker.mask_all(&held)
    }
}

/// The byte strings that stand for `value` in output: itself, each line of a multi-line
/// value, its base64 (standard and URL-safe, with and without padding, and the part of it
/// that any longer base64 text containing the value at each of the three alignments must
/// contain) and its URL encodings. Needles shorter than [`MIN_MASKED_LEN`] are left out.
pub fn needles(value: &[u8]) -> Vec<Vec<u8>> {
    if value.len() < MIN_MASKED_LEN {
        return Vec::new();
    }
    let mut out = vec![value.to_vec()];
    if value.contains(&b'\n') {
        for line in value.split(|b| *b == b'\n') {
            out.push(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
        }
    }
    for engine in [&STANDARD, &URL_SAFE] {
        out.push(engine.encode(value).into_bytes());
    }
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        out.push(engine.encode(value).into_bytes());
        // Inside longer base64 text the value starts 0, 1 or 2 bytes into a 3-byte group:
        // the characters made of its bits alone are the same whatever surrounds it.
        for shift in 0..3usize {
            let mut padded = vec![0u8; shift];
            padded.extend_from_slice(value);
            let text = engine.encode(&padded).into_bytes();
            let first = (8 * shift).div_ceil(6);
            let end = (8 * (shift + value.len())) / 6;
            if end > first {
                out.push(text[first..end.min(text.len())].to_vec());
            }
        }
    }
    out.push(percent_encode(value, false, b"0123456789ABCDEF"));
    out.push(percent_encode(value, false, b"0123456789abcdef"));
    out.push(percent_encode(value, true, b"0123456789ABCDEF"));
    out.retain(|n| n.len() >= MIN_MASKED_LEN);
    out
}

/// `value` with every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`) as `%XX`; with
/// `form`, a space is `+` (HTML form encoding).
fn percent_encode(value: &[u8], form: bool, hex: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b),
            b' ' if form => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn masker(values: &[&str]) -> Arc<Masker> {
        Arc::new(Masker::new(values.iter().map(|v| v.as_bytes())).expect("something to mask"))
    }

    /// The output of a stream fed `chunks`.
    fn streamed(m: &Arc<Masker>, chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = m.stream();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.finish());
        out
    }

    /// Leftmost-longest replacement by brute force, the reference the automaton must match.
    fn naive(needles: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < data.len() {
            let longest = needles.iter().filter(|n| data[i..].starts_with(n)).map(Vec::len).max();
            match longest {
                Some(len) => {
                    out.extend_from_slice(MASK);
                    i += len;
                }
                None => {
                    out.push(data[i]);
                    i += 1;
                }
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_value_split_at_every_offset_is_masked() {
        let m = masker(&["hunter22"]);
        let text = b"login hunter22 ok, again:hunter22";
        let want = b"login *** ok, again:***".to_vec();
        for a in 0..=text.len() {
            for b in a..=text.len() {
                let got = streamed(&m, &[&text[..a], &text[a..b], &text[b..]]);
                assert_eq!(got, want, "split at {a} and {b}");
            }
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(streamed(&m, &bytes), want);
    }

    #[test]
    fn encodings_of_the_value_are_masked() {
        let value = "s3cr3t/va+lue?&=x y";
        let m = masker(&[value]);
        let forms = [
            STANDARD.encode(value),
            STANDARD_NO_PAD.encode(value),
            URL_SAFE.encode(value),
            URL_SAFE_NO_PAD.encode(value),
            String::from_utf8(percent_encode(value.as_bytes(), false, b"0123456789ABCDEF")).expect("ascii"),
            String::from_utf8(percent_encode(value.as_bytes(), true, b"0123456789ABCDEF")).expect("ascii"),
        ];
        for form in &forms {
            let line = format!("got {form} here\n");
            let out = String::from_utf8(m.mask_all(line.as_bytes())).expect("utf8");
            assert!(out.starts_with("got ") && out.contains("***") && !out.contains(form.as_str()), "{form} → {out}");
        }
        // Inside a longer base64 text, at each alignment, the value's own characters go.
        for prefix in ["", "a", "ab", "abc", "abcd"] {
            for suffix in ["", "z", "zz", "zzz"] {
                for engine in [&STANDARD, &URL_SAFE] {
                    let whole = engine.encode(format!("{prefix}{value}{suffix}"));
                    let out = m.mask_all(whole.as_bytes());
                    assert!(contains(&out, MASK), "{prefix}|{suffix}: {whole}");
                    // What is left is at most the characters shared with the neighbours.
                    assert!(
                        out.len() <= MASK.len() + 2 * 4 + 4,
                        "{prefix}|{suffix}: {}",
                        String::from_utf8_lossy(&out)
                    );
                }
            }
        }
    }

    #[test]
    fn short_values_are_not_masked_and_lines_of_long_ones_are() {
        assert!(Masker::new(["abc"]).is_none());
        let m = masker(&["first line\r\nsecond line"]);
        assert_eq!(m.mask_str("first line and second line"), "*** and ***");
    }

    #[test]
    fn the_longest_overlapping_value_wins() {
        let m = masker(&["token", "token-extended"]);
        assert_eq!(streamed(&m, &[b"a token-ext", b"ended b token c"]), b"a *** b *** c".to_vec());
    }

    proptest! {
        #[test]
        fn streaming_equals_replacing_the_whole(
            secret in "[a-c]{4,7}",
            other in "[a-c]{4,9}",
            data in proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c'), Just(b'\n')], 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let m = masker(&[&secret, &other]);
            let mut all: Vec<Vec<u8>> = needles(secret.as_bytes());
            all.extend(needles(other.as_bytes()));
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts {
                chunks.push(&data[last..c]);
                last = c;
            }
            chunks.push(&data[last..]);
            let got = streamed(&m, &chunks);
            prop_assert_eq!(&got, &naive(&all, &data));
            prop_assert!(!contains(&got, secret.as_bytes()));
        }
    }
}
