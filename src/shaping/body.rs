//! Top-level JSON body edits that keep every untouched byte as the client sent it.
//!
//! The body is parsed once into an ordered list of `(key, raw value)` pairs borrowed from the
//! input; an edit splices replacement bytes into the original buffer. Messages and every other
//! value are never re-serialised (DESIGN hot-path rules; benchmarked in `benches/hot.rs`).

use crate::error::EdgeError;
use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// A parsed JSON object: its top-level keys and the byte ranges of their values.
#[derive(Debug)]
pub struct TopLevel<'a> {
    body: &'a [u8],
    entries: Vec<Entry<'a>>,
    /// Offset of the closing `}` of the object.
    close: usize,
}

#[derive(Debug)]
struct Entry<'a> {
    key: Cow<'a, str>,
    value: &'a RawValue,
    /// Range of the value in `body`.
    span: Range<usize>,
}

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}

struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k.0, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> TopLevel<'a> {
    /// Parses `body`, which must be a JSON object.
    pub fn parse(body: &'a [u8]) -> Result<Self, EdgeError> {
        // One UTF-8 check of the whole body: parsed from bytes, serde_json would check every
        // key and every raw value again on its own.
        let text = std::str::from_utf8(body).map_err(|e| {
            EdgeError::InvalidJson(format!(
                "the body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        let entries: Entries<'a> = serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                EdgeError::InvalidJson("the body must be a JSON object".to_string())
            } else {
                EdgeError::InvalidJson(e.to_string())
            }
        })?;
        let base = body.as_ptr() as usize;
        let entries = entries
            .0
            .into_iter()
            .map(|(key, value)| {
                // RawValue borrows from `body`, so its offset is its address minus the base.
                let start = value.get().as_ptr() as usize - base;
                let span = start..start + value.get().len();
                Entry { key, value, span }
            })
            .collect();
        let close = body
            .iter()
            .rposition(|&b| b == b'}')
            .ok_or_else(|| EdgeError::InvalidJson("the body must be a JSON object".into()))?;
        Ok(Self {
            body,
            entries,
            close,
        })
    }

    /// The raw JSON text of a top-level value (the last one if a key repeats).
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value)
    }

    /// The value of a top-level string field, unescaped.
    pub fn get_str(&self, key: &str) -> Option<Cow<'a, str>> {
        let raw = self.get(key)?;
        serde_json::from_str::<Cow<'a, str>>(raw.get()).ok()
    }

    /// Whether a top-level boolean field is `true`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)?.get() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// Top-level keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.key.as_ref())
    }

    /// Applies edits and returns the new body. Untouched bytes are copied as they were.
    pub fn apply(&self, edits: &[Edit<'_>]) -> Vec<u8> {
        let mut out = Copied(Vec::with_capacity(self.body.len() + 64));
        self.splice(edits, &mut out);
        out.0
    }

    /// [`apply`](Self::apply) without copying the body: the result is slices of `body`
    /// (which must hold the bytes this was parsed from) around the edited text, for a vectored
    /// write. A rename in a 100 KB chat body then copies a few bytes, not 100 KB.
    pub fn apply_pieces(&self, body: &Bytes, edits: &[Edit<'_>]) -> Pieces {
        debug_assert_eq!(body.as_ref(), self.body);
        let mut out = Sliced {
            body,
            parts: Vec::new(),
            // A small body is copied whole (its runs are short); room for it and the edits.
            text: Vec::with_capacity(self.body.len().min(SLICE_AT_LEAST) + 128),
        };
        self.splice(edits, &mut out);
        if out.parts.is_empty() {
            // No long run: the body was copied whole, as `apply` does.
            return Pieces::whole(Bytes::from(out.text));
        }
        out.flush();
        Pieces::from_parts(out.parts)
    }

    fn splice(&self, edits: &[Edit<'_>], out: &mut impl Splice) {
        // Replacements and removals are keyed by entry index; additions go before the final `}`.
        let mut cursor = 0;
        let mut kept = 0usize;
        for (i, entry) in self.entries.iter().enumerate() {
            let edit = edits.iter().rev().find(|e| e.key() == entry.key);
            match edit {
                Some(Edit::Set(_, value)) => {
                    out.original(self.body, cursor..entry.span.start);
                    out.text(value.as_bytes());
                    cursor = entry.span.end;
                    kept += 1;
                }
                Some(Edit::Remove(_)) => {
                    // Drop from the start of this member (after the previous value, or the `{`)
                    // to the end of its value; the comma handling keeps the object valid.
                    let member_start = if i == 0 {
                        self.opening() + 1
                    } else {
                        self.entries[i - 1].span.end.max(cursor)
                    };
                    out.original(self.body, cursor..member_start);
                    cursor = entry.span.end;
                    if kept == 0 {
                        // Removing the first kept member: skip the comma that follows it.
                        cursor = self.skip_comma(cursor);
                    }
                }
                None => kept += 1,
            }
        }
        out.original(self.body, cursor..self.close);
        let mut has_members = kept > 0;
        for edit in edits {
            if let Edit::Set(key, value) = edit {
                if self.entries.iter().any(|e| e.key == *key) {
                    continue;
                }
                // Trim trailing whitespace before the `}` so the addition reads naturally.
                out.trim_end_whitespace();
                if has_members {
                    out.text(b",");
                }
                out.text(&json_string(key));
                out.text(b":");
                out.text(value.as_bytes());
                has_members = true;
            }
        }
        out.original(self.body, self.close..self.body.len());
    }

    fn opening(&self) -> usize {
        self.body.iter().position(|&b| b == b'{').unwrap_or(0)
    }

    fn skip_comma(&self, mut at: usize) -> usize {
        while at < self.close && self.body[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < self.close && self.body[at] == b',' {
            at += 1;
        }
        at
    }
}

/// A body as the pieces it is sent in (see [`TopLevel::apply_pieces`]). The first piece is
/// kept apart so a body in one piece (the common case for small bodies) needs no list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pieces {
    first: Bytes,
    rest: Vec<Bytes>,
}

impl Pieces {
    /// The body as one piece.
    pub fn whole(body: Bytes) -> Self {
        Self {
            first: body,
            rest: Vec::new(),
        }
    }

    fn from_parts(mut parts: Vec<Bytes>) -> Self {
        if parts.len() <= 1 {
            return Self::whole(parts.pop().unwrap_or_default());
        }
        let first = parts.remove(0);
        Self { first, rest: parts }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.parts().map(Bytes::len).sum()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.parts().all(Bytes::is_empty)
    }

    /// The pieces, in order.
    pub fn parts(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    /// How many pieces.
    pub fn count(&self) -> usize {
        1 + self.rest.len()
    }

    /// The body in one buffer (copied only when it is in several pieces).
    pub fn to_bytes(&self) -> Bytes {
        if self.rest.is_empty() {
            return self.first.clone();
        }
        let mut all = Vec::with_capacity(self.len());
        for p in self.parts() {
            all.extend_from_slice(p);
        }
        Bytes::from(all)
    }
}

/// Where [`TopLevel::splice`] writes the edited body.
trait Splice {
    /// Bytes of the original body, unchanged.
    fn original(&mut self, body: &[u8], range: Range<usize>);
    /// New text.
    fn text(&mut self, text: &[u8]);
    /// Removes ASCII whitespace at the end of what was written so far.
    fn trim_end_whitespace(&mut self);
}

/// Into one new buffer.
struct Copied(Vec<u8>);

impl Splice for Copied {
    fn original(&mut self, body: &[u8], range: Range<usize>) {
        self.0.extend_from_slice(&body[range]);
    }
    fn text(&mut self, text: &[u8]) {
        self.0.extend_from_slice(text);
    }
    fn trim_end_whitespace(&mut self) {
        while self.0.last().is_some_and(|b| b.is_ascii_whitespace()) {
            self.0.pop();
        }
    }
}

/// Into slices of the original body; new text and short original runs (separators between
/// edits) are gathered in `text`, so a body has few pieces however many fields change.
struct Sliced<'b> {
    body: &'b Bytes,
    parts: Vec<Bytes>,
    text: Vec<u8>,
}

/// Original runs shorter than this are copied into the text piece rather than sliced: below a
/// few KiB a copy costs less than another piece (criterion `body_edit/rename_and_inject*`).
const SLICE_AT_LEAST: usize = 4 << 10;

impl Sliced<'_> {
    fn flush(&mut self) {
        if !self.text.is_empty() {
            // What follows a slice is short: separators, edits, the closing brace.
            let next = Vec::with_capacity(128);
            self.parts
                .push(Bytes::from(std::mem::replace(&mut self.text, next)));
        }
    }
}

impl Splice for Sliced<'_> {
    fn original(&mut self, _body: &[u8], range: Range<usize>) {
        if range.len() < SLICE_AT_LEAST {
            self.text.extend_from_slice(&self.body[range]);
        } else {
            self.flush();
            self.parts.push(self.body.slice(range));
        }
    }
    fn text(&mut self, text: &[u8]) {
        self.text.extend_from_slice(text);
    }
    fn trim_end_whitespace(&mut self) {
        loop {
            if !self.text.is_empty() {
                while self.text.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    self.text.pop();
                }
                if !self.text.is_empty() {
                    return;
                }
            }
            let Some(last) = self.parts.last_mut() else {
                return;
            };
            let keep = last
                .iter()
                .rposition(|b| !b.is_ascii_whitespace())
                .map_or(0, |p| p + 1);
            last.truncate(keep);
            if keep > 0 {
                return;
            }
            self.parts.pop();
        }
    }
}

/// One top-level change.
#[derive(Debug, Clone)]
pub enum Edit<'v> {
    /// Set `key` to this raw JSON text (replacing in place, or appending).
    Set(&'v str, Cow<'v, str>),
    /// Remove `key`.
    Remove(&'v str),
}

impl Edit<'_> {
    fn key(&self) -> &str {
        match self {
            Edit::Set(k, _) | Edit::Remove(k) => k,
        }
    }
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> Vec<u8> {
    // Serialising a &str to JSON cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_that_are_not_utf8_are_invalid_json_wherever_the_byte_is() {
        let cases: [&[u8]; 4] = [
            b"{\"model\":\"q\xff\"}",
            b"{\"model\":\"q\",\"messages\":[{\"content\":\"\xc3\"}]}",
            b"{\"m\xe9\":1}",
            b"{\"model\":\"q\"}\xff",
        ];
        for body in cases {
            match TopLevel::parse(body) {
                Err(EdgeError::InvalidJson(m)) => assert!(m.contains("UTF-8"), "{m}"),
                other => panic!(
                    "{:?}: {:?}",
                    String::from_utf8_lossy(body),
                    other.map(|_| ())
                ),
            }
        }
        // A byte-order mark is UTF-8 but not JSON.
        let bom = TopLevel::parse(b"\xef\xbb\xbf{\"model\":\"q\"}");
        assert!(matches!(bom, Err(EdgeError::InvalidJson(_))));
        // Multi-byte characters are fine anywhere, keys included.
        let t = TopLevel::parse("{\"modèle\":\"é\",\"model\":\"q→\"}".as_bytes()).unwrap();
        assert_eq!(t.get_str("model").unwrap(), "q→");
        assert_eq!(t.keys().collect::<Vec<_>>(), ["modèle", "model"]);
    }

    #[test]
    fn model_rename_touches_only_the_model_value() {
        let body = br#"{ "model" : "qwen",  "messages":[{"role":"user","content":"h\u00e9 \"x\""}], "n":1 }"#;
        let t = TopLevel::parse(body).unwrap();
        assert_eq!(t.get_str("model").unwrap(), "qwen");
        let out = t.apply(&[Edit::Set(
            "model",
            Cow::Owned(String::from_utf8(json_string("Qwen/Q")).unwrap()),
        )]);
        let expected = br#"{ "model" : "Qwen/Q",  "messages":[{"role":"user","content":"h\u00e9 \"x\""}], "n":1 }"#;
        assert_eq!(out, expected.to_vec());
    }

    #[test]
    fn additions_and_removals_keep_valid_json() {
        let body = br#"{"a":1,"b":2,"c":3}"#;
        let t = TopLevel::parse(body).unwrap();
        let out = t.apply(&[Edit::Remove("a"), Edit::Set("d", "true".into())]);
        assert_eq!(out, br#"{"b":2,"c":3,"d":true}"#.to_vec());
        let out = t.apply(&[Edit::Remove("b")]);
        assert_eq!(out, br#"{"a":1,"c":3}"#.to_vec());
        let out = t.apply(&[Edit::Remove("c")]);
        assert_eq!(out, br#"{"a":1,"b":2}"#.to_vec());
        let out = t.apply(&[Edit::Remove("a"), Edit::Remove("b"), Edit::Remove("c")]);
        serde_json::from_slice::<serde_json::Value>(&out).unwrap();
        let empty = TopLevel::parse(b"{ }").unwrap();
        assert_eq!(
            empty.apply(&[Edit::Set("x", "1".into())]),
            br#"{"x":1}"#.to_vec()
        );
    }

    #[test]
    fn escaped_keys_are_matched() {
        let t = TopLevel::parse(br#"{"mo\u0064el":"m"}"#).unwrap();
        assert_eq!(t.get_str("model").unwrap(), "m");
    }

    #[test]
    fn non_objects_and_garbage_are_invalid_json() {
        for bad in [
            &b"[1,2]"[..],
            b"\"x\"",
            b"{",
            b"",
            b"{\"a\":}",
            b"{} trailing",
        ] {
            assert!(
                matches!(TopLevel::parse(bad), Err(EdgeError::InvalidJson(_))),
                "{bad:?}"
            );
        }
    }

    /// The pieces say the same bytes as the copy, in few parts, and slice the client's buffer
    /// for long untouched runs.
    #[test]
    fn pieces_match_the_copied_body() {
        let long = "x".repeat(SLICE_AT_LEAST + 100);
        let bodies = [
            format!(r#"{{"model":"q","messages":[{{"content":"{long}"}}],"n":1}}"#),
            format!(r#"{{ "messages":"{long}" ,  "model" : "q"   }}"#),
            format!("{{\"a\":\"{long}\"\n}}\n"),
            r#"{"model":"q"}"#.to_string(),
            "{ }".to_string(),
            format!(r#"{{"model":"q","temperature":0.5,"messages":"{long}","stream":true  }}"#),
        ];
        let edit_sets: [&[Edit]; 6] = [
            &[Edit::Set("model", "\"Qwen/Q\"".into())],
            &[Edit::Set("logprobs", "true".into())],
            &[Edit::Set("x", " 1 ".into()), Edit::Set("y", "2".into())],
            &[Edit::Remove("model"), Edit::Remove("temperature")],
            &[
                Edit::Remove("stream"),
                Edit::Set("model", "\"m\"".into()),
                Edit::Set("top_logprobs", "5".into()),
            ],
            &[],
        ];
        for body in &bodies {
            let bytes = Bytes::from(body.clone());
            let top = TopLevel::parse(&bytes).unwrap();
            for edits in edit_sets {
                let pieces = top.apply_pieces(&bytes, edits);
                let copied = top.apply(edits);
                assert_eq!(pieces.to_bytes(), copied, "{body} {edits:?}");
                assert_eq!(pieces.len(), copied.len());
                assert!(pieces.count() <= 3, "{pieces:?}");
                for p in pieces.parts().filter(|p| p.len() >= SLICE_AT_LEAST) {
                    let inside = bytes.as_ptr_range();
                    assert!(inside.contains(&p.as_ptr()), "a long run was copied");
                }
            }
        }
    }

    #[test]
    fn booleans() {
        let t = TopLevel::parse(br#"{"stream":true,"x":"true"}"#).unwrap();
        assert_eq!(t.get_bool("stream"), Some(true));
        assert_eq!(t.get_bool("x"), None);
    }
}
