//! A traced stream's token chunk as a shape: the chunk's text with holes where the values
//! that change from token to token sit (the text of the delta, and in vLLM's logprobs the
//! token, its logprob, its bytes, the top logprobs' values, and the token ids). A chunk made
//! of the same text around other values of the same kinds reads as the learned chunk with
//! those values, so it needs no scan: a comparison per stretch of text between holes, and a
//! read of each hole. vLLM sends such a chunk for every token of a traced RL stream, where
//! scanning keys and dispatching on them was most of a chunk's cost (callgrind, traced S3L:
//! about 5,000 instructions per chunk).
//!
//! Holes are read strictly: strings as the scan reads them (valid UTF-8, escapes decoded by
//! serde_json), numbers by the JSON grammar and within `f64`'s range, arrays of integers
//! without whitespace. Anything else makes the chunk not fit; the caller then scans it, so a miss
//! costs time, never correctness.

use super::{checked_text, find_stop, Scanner};
use std::borrow::Cow;

/// What a hole of a [`Shape`] holds, and what a fill does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    /// The delta's `content`: a string, kept as the fill's text.
    Text,
    /// Another string of the logprobs (a token): a string, not kept.
    Str,
    /// A number of the logprobs that is not kept (a top logprob).
    Num,
    /// The `logprob` of an entry of the logprobs' `content`: a number, kept.
    Logprob,
    /// `token_ids`: an array of integers, kept.
    Ids,
    /// `finish_reason`: `null`, or a string, kept (the last token's chunk).
    Finish,
    /// Another array of integers in the logprobs (`bytes`), not kept.
    Ints,
}

/// A learned token chunk: its text without the holes, and where each hole sits in it.
#[derive(Debug, Default)]
pub struct Shape {
    text: Vec<u8>,
    /// Offsets in `text`, in order, and what each hole holds. A learned shape has exactly
    /// one [`Hole::Text`], at most one [`Hole::Ids`] and at most one [`Hole::Finish`].
    holes: Vec<(usize, Hole)>,
    /// `text` holds no line end, so a `data: ` line of a fitting chunk followed by a blank
    /// line is one whole event ([`Shape::fill_event`]).
    one_line: bool,
}

/// What a fitting chunk holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Filled<'a> {
    /// The delta's text: UTF-8, as it was checked (borrowed unless it had escapes).
    pub text: Cow<'a, [u8]>,
    /// `finish_reason`, when it is not `null`.
    pub finish: Option<String>,
}

/// Longest chunk learned, and most holes: a token chunk is a few hundred bytes.
const MAX_LEARNED: usize = 8192;
const MAX_HOLES: usize = 512;

/// A hole's span in the learned chunk.
type Spans = Vec<(usize, usize, Hole)>;

impl Shape {
    /// Learns `data`, a chat chunk whose only effect on a trace is to add its delta's
    /// `content` and, if present, its logprobs (`content` entries) and one `token_ids` to
    /// one choice, with a `null` finish reason (the caller has read it and checked that). Returns whether it was
    /// learned; otherwise the shape is left empty, fitting nothing.
    pub fn learn(&mut self, data: &str) -> bool {
        self.clear();
        if data.len() > MAX_LEARNED {
            return false;
        }
        let mut spans = Spans::with_capacity(16);
        let mut s = Scanner::new(data);
        if top(&mut s, &mut spans).is_none() {
            return false;
        }
        s.ws();
        let count = |kind| spans.iter().filter(|h| h.2 == kind).count();
        if s.i != data.len()
            || spans.len() > MAX_HOLES
            || count(Hole::Text) != 1
            || count(Hole::Ids) > 1
            || count(Hole::Finish) > 1
        {
            return false;
        }
        self.text.reserve(data.len());
        let mut at = 0;
        for (start, end, kind) in spans {
            // Spans lie in order within `data` (the scanner's positions).
            let Some(part) = data.as_bytes().get(at..start) else {
                self.clear();
                return false;
            };
            self.text.extend_from_slice(part);
            self.holes.push((self.text.len(), kind));
            at = end;
        }
        self.text
            .extend_from_slice(data.as_bytes().get(at..).unwrap_or_default());
        self.one_line = memchr::memchr2(b'\n', b'\r', &self.text).is_none();
        true
    }

    /// Forgets the learned chunk: it then fits nothing.
    fn clear(&mut self) {
        self.text.clear();
        self.holes.clear();
    }

    /// What `data` holds when it fits the shape, its logprobs appended to `logprobs` and its
    /// token ids to `ids`. When it does not fit, both are left as they were.
    pub fn fill<'a>(
        &self,
        data: &'a [u8],
        logprobs: &mut Vec<f64>,
        ids: &mut Vec<i64>,
    ) -> Option<Filled<'a>> {
        self.guarded(logprobs, ids, |lp, ids| {
            let (filled, end) = self.read(data, lp, ids)?;
            (end == data.len()).then_some(filled)
        })
    }

    /// As [`Self::fill`], for a fitting chunk as one whole event at the start of `b`:
    /// `data: `, the chunk, a blank line (`\n\n`). Returns what it holds and the event's length
    /// with its blank line: the event [`SseSplitter`] would cut there, as no hole holds a
    /// line end and neither does the text around them.
    ///
    /// [`SseSplitter`]: crate::observe::sse::SseSplitter
    pub fn fill_event<'a>(
        &self,
        b: &'a [u8],
        logprobs: &mut Vec<f64>,
        ids: &mut Vec<i64>,
    ) -> Option<(Filled<'a>, usize)> {
        if !self.one_line || self.holes.is_empty() {
            return None;
        }
        let data = b.strip_prefix(b"data: ")?;
        self.guarded(logprobs, ids, |lp, ids| {
            let (filled, end) = self.read(data, lp, ids)?;
            data.get(end..)?
                .starts_with(b"\n\n")
                .then_some((filled, b.len() - data.len() + end + 2))
        })
    }

    /// Runs `f`, undoing what it appended when it fails.
    fn guarded<T>(
        &self,
        logprobs: &mut Vec<f64>,
        ids: &mut Vec<i64>,
        f: impl FnOnce(&mut Vec<f64>, &mut Vec<i64>) -> Option<T>,
    ) -> Option<T> {
        let (lp_len, ids_len) = (logprobs.len(), ids.len());
        let out = f(logprobs, ids);
        if out.is_none() {
            logprobs.truncate(lp_len);
            ids.truncate(ids_len);
        }
        out
    }

    /// Reads the shape from the start of `data`: the text between holes compared, each
    /// hole read. Returns what the holes held and where the shape ended.
    fn read<'a>(
        &self,
        data: &'a [u8],
        logprobs: &mut Vec<f64>,
        ids: &mut Vec<i64>,
    ) -> Option<(Filled<'a>, usize)> {
        if self.holes.is_empty() {
            return None;
        }
        let mut s = Scanner::over_bytes(data);
        let mut at = 0;
        let mut filled = Filled {
            text: Cow::Borrowed(&[]),
            finish: None,
        };
        for &(off, kind) in &self.holes {
            s.fixed(self.text.get(at..off)?)?;
            at = off;
            match kind {
                Hole::Text => filled.text = s.shape_string()?,
                Hole::Str => drop(s.shape_string()?),
                Hole::Num => s.number()?,
                Hole::Logprob => logprobs.push(s.f64_here()?),
                Hole::Ids => s.tight_ints(|id| ids.push(id))?,
                Hole::Ints => s.skip_tight_ints()?,
                Hole::Finish => {
                    if s.b.get(s.i) == Some(&b'n') {
                        s.fixed(b"null")?;
                    } else {
                        let text = s.shape_string()?.into_owned();
                        filled.finish = Some(String::from_utf8(text).ok()?);
                    }
                }
            }
        }
        s.fixed(self.text.get(at..)?)?;
        Some((filled, s.i))
    }
}

impl<'a> Scanner<'a> {
    /// Exactly `part` at the position.
    fn fixed(&mut self, part: &[u8]) -> Option<()> {
        let end = self.i + part.len();
        (self.b.get(self.i..end)? == part).then(|| self.i = end)
    }

    /// A string at the position, checked as UTF-8: borrowed when it is a run of plain
    /// characters (see [`super::Template::fill`]), else decoded as the scan decodes it.
    /// Tokens with a newline or a quote are common in a reply (code, lists), and each such
    /// chunk scanned and learned again cost about three filled ones.
    fn shape_string(&mut self) -> Option<Cow<'a, [u8]>> {
        let start = self.i + 1;
        if self.b.get(self.i) != Some(&b'"') {
            return None;
        }
        let n = find_stop(self.b.get(start..)?)?;
        if self.b.get(start + n) != Some(&b'"') {
            self.i = start + n;
            let text = self.escaped_string(start)?;
            return Some(Cow::Owned(text.into_owned().into_bytes()));
        }
        self.i = start + n + 1;
        checked_text(self.b.get(start..start + n)?).map(Cow::Borrowed)
    }

    /// An array of integers at the position whose values are not kept (logprobs' `bytes`),
    /// with no whitespace in it: only their grammar is checked (a sign, digits without a
    /// leading zero). No number of it can be out of `f64`'s range, which the scan checks,
    /// as it has at most 19 digits.
    fn skip_tight_ints(&mut self) -> Option<()> {
        self.tight_array(|b, mut i| {
            if b.get(i) == Some(&b'-') {
                i += 1;
            }
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            let len = i - start;
            (len > 0 && len <= 19 && (len == 1 || b.get(start) != Some(&b'0'))).then_some(i)
        })
    }
}

/// Records the value at the position as a hole of `kind`, read by `read`.
fn hole(
    s: &mut Scanner<'_>,
    spans: &mut Spans,
    kind: Hole,
    read: impl FnOnce(&mut Scanner<'_>) -> Option<()>,
) -> Option<()> {
    s.ws();
    let start = s.i;
    read(s)?;
    spans.push((start, s.i, kind));
    Some(())
}

/// The learned chunk: holes in its (single) choice; everything else is fixed text.
fn top(s: &mut Scanner<'_>, spans: &mut Spans) -> Option<()> {
    s.object(|s, key| match key {
        "choices" => s.array(|s| choice(s, spans)),
        _ => s.skip(1),
    })
}

fn choice(s: &mut Scanner<'_>, spans: &mut Spans) -> Option<()> {
    s.object(|s, key| match key {
        "delta" => s.object(|s, key| match key {
            "content" => hole(s, spans, Hole::Text, |s| s.string().map(drop)),
            "token_ids" => ids(s, spans),
            _ => s.skip(3),
        }),
        "logprobs" => {
            if s.null()? {
                return Some(());
            }
            // Only chat's `content` entries: another key is not learned.
            s.object(|s, key| match key {
                "content" => s.array(|s| entry(s, spans, true)),
                _ => None,
            })
        }
        "token_ids" => ids(s, spans),
        "finish_reason" => hole(s, spans, Hole::Finish, |s| s.literal(b"null")),
        _ => s.skip(2),
    })
}

/// `token_ids`: a hole when it is an array of integers, fixed text when `null`.
fn ids(s: &mut Scanner<'_>, spans: &mut Spans) -> Option<()> {
    if s.null()? {
        return Some(());
    }
    hole(s, spans, Hole::Ids, |s| s.tight_ints(drop))
}

/// An entry of the logprobs' `content` (`kept`: its `logprob` is the token's) or of an
/// entry's `top_logprobs`: strings, numbers and arrays of integers are holes, the
/// `top_logprobs` entries are read in their turn, and anything else is fixed text.
fn entry(s: &mut Scanner<'_>, spans: &mut Spans, kept: bool) -> Option<()> {
    s.object(|s, key| {
        if kept && key == "logprob" {
            return hole(s, spans, Hole::Logprob, |s| s.f64_here().map(drop));
        }
        match s.peek()? {
            b'[' if kept && key == "top_logprobs" => s.array(|s| entry(s, spans, false)),
            b'"' => hole(s, spans, Hole::Str, |s| s.string().map(drop)),
            b'-' | b'0'..=b'9' => hole(s, spans, Hole::Num, |s| s.number()),
            b'[' => {
                let at = s.i;
                if hole(s, spans, Hole::Ints, |s| s.skip_tight_ints()).is_some() {
                    return Some(());
                }
                s.i = at;
                s.skip(4)
            }
            _ => s.skip(4),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" tok"},"logprobs":{"content":[{"token":" tok","logprob":-0.25,"bytes":[32,116,111,107],"top_logprobs":[{"token":" t","logprob":-2.5,"bytes":[32,116]}]}]},"finish_reason":null,"token_ids":[1234]}]}"#;

    fn fill(shape: &Shape, data: &str) -> Option<(String, Vec<f64>, Vec<i64>)> {
        let (mut lp, mut ids) = (vec![9.0], vec![9]);
        let Some(filled) = shape.fill(data.as_bytes(), &mut lp, &mut ids) else {
            assert_eq!((lp, ids), (vec![9.0], vec![9]), "a miss appends nothing");
            return None;
        };
        assert_eq!(filled.finish, None);
        let text = String::from_utf8(filled.text.into_owned()).unwrap();
        Some((text, lp[1..].to_vec(), ids[1..].to_vec()))
    }

    #[test]
    fn holes_are_cut_where_the_token_values_sit() {
        let mut shape = Shape::default();
        assert_eq!(fill(&shape, CHUNK), None, "an empty shape fits nothing");
        assert!(shape.learn(CHUNK));
        let kinds: Vec<Hole> = shape.holes.iter().map(|h| h.1).collect();
        use Hole::*;
        assert_eq!(
            kinds,
            [Text, Str, Logprob, Ints, Str, Num, Ints, Finish, Ids],
            "{:?}",
            String::from_utf8_lossy(&shape.text)
        );
        assert_eq!(
            fill(&shape, CHUNK),
            Some((" tok".into(), vec![-0.25], vec![1234]))
        );
        let other = CHUNK
            .replace(" tok", "é 😀")
            .replace("-0.25", "-1.5e-7")
            .replace("[32,116,111,107]", "[]")
            .replace("-2.5", "0")
            .replace("[1234]", "[-3,9223372036854775807]");
        assert_eq!(
            fill(&shape, &other),
            Some(("é 😀".into(), vec![-1.5e-7], vec![-3, i64::MAX]))
        );
        // Escapes are decoded, as the scan decodes them.
        let escaped = CHUNK.replace(" tok", r#"a\n\"b\" \u00e9\ud83d\ude00"#);
        assert_eq!(
            fill(&shape, &escaped),
            Some(("a\n\"b\" é😀".into(), vec![-0.25], vec![1234]))
        );
        for (from, to) in [
            (r#"" tok""#, "\"a\tb\""),
            (r#"" tok""#, r#""a\xb""#),
            (r#"" tok""#, r#""\ud800""#),
            (r#"" tok""#, r#""a\u00e""#),
            (r#"" tok""#, r#""a\""#),
            (r#"" tok""#, "5"),
            ("-0.25", "-0.25e999"),
            ("-0.25", "- 0.25"),
            ("-0.25", "null"),
            ("-0.25", "01"),
            ("-2.5", "1e400"),
            ("[1234]", "[1234, 5]"),
            ("[1234]", "[1.5]"),
            ("[1234]", "[-0]"),
            ("[1234]", "[9223372036854775808]"),
            ("[1234]", "null"),
            (r#""bytes":[32,116]"#, r#""bytes":[32,1e2]"#),
            ("\"index\":0", "\"index\":1"),
            ("null,", "nul,"),
            ("null,", "5,"),
        ] {
            let edited = CHUNK.replacen(from, to, 1);
            assert_ne!(edited, CHUNK, "{from}");
            assert_eq!(fill(&shape, &edited), None, "{edited}");
        }
        assert_eq!(fill(&shape, &format!("{CHUNK} ")), None);
        // The last token's chunk: its finish reason is kept.
        let (mut lp, mut ids) = (vec![], vec![]);
        let last = CHUNK.replacen("null,", r#""stop","#, 1);
        let filled = shape.fill(last.as_bytes(), &mut lp, &mut ids).unwrap();
        assert_eq!(&*filled.text, b" tok");
        assert_eq!(filled.finish.as_deref(), Some("stop"));
        let last = CHUNK.replacen("null,", r#""st\nop","#, 1);
        let filled = shape.fill(last.as_bytes(), &mut lp, &mut ids).unwrap();
        assert_eq!(filled.finish.as_deref(), Some("st\nop"));
        assert_eq!(fill(&shape, &CHUNK[..CHUNK.len() - 1]), None);
        let mut bad = CHUNK.replacen(" tok", "aZ", 1).into_bytes();
        let at = bad.iter().position(|&c| c == b'Z').unwrap();
        bad[at] = 0xff;
        let (mut lp, mut ids) = (vec![], vec![]);
        assert_eq!(shape.fill(&bad, &mut lp, &mut ids), None, "UTF-8 only");
        assert!((lp.is_empty() && ids.is_empty()));
    }

    #[test]
    fn only_chunks_with_one_text_and_at_most_one_ids_are_learned() {
        let mut shape = Shape::default();
        for chunk in [
            r#"{"choices":[{"index":0,"delta":{"role":"assistant"},"token_ids":[1]}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","token_ids":[1]},"token_ids":[2]}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"tokens":["a"],"token_logprobs":[-1]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}]} x"#,
        ] {
            assert!(!shape.learn(chunk), "{chunk}");
            assert_eq!(fill(&shape, chunk), None);
        }
        // Kept ids with whitespace in them are not learned: they could not be a hole.
        let spaced = r#"{"choices":[{"index":0,"delta":{"content":"a"},"token_ids":[ 1 ]}]}"#;
        assert!(!shape.learn(spaced));
        // `null` logprobs and ids, whitespace and arrays of other values are fixed text.
        let chunk = r#"{ "choices" : [{"index":0,"delta":{"content":"a","token_ids":null},"logprobs":null,"x":[ 1 ]}]}"#;
        assert!(shape.learn(chunk));
        assert_eq!(shape.holes.len(), 1);
        let b = chunk.replace("\"a\"", "\"b\"");
        assert_eq!(fill(&shape, &b), Some(("b".into(), vec![], vec![])));
        assert_eq!(fill(&shape, &chunk.replace("[ 1 ]", "[ 2 ]")), None);
        let chunk = r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[{"token":"a","logprob":-1,"bytes":null,"extra":[[1]],"top_logprobs":null}]},"token_ids":[1]}]}"#;
        assert!(shape.learn(chunk));
        assert_eq!(
            fill(&shape, &chunk.replace("-1,", "-2,").replace("[1]}", "[2]}")),
            Some(("a".into(), vec![-2.0], vec![2]))
        );
    }

    #[test]
    fn a_shape_event_is_the_event_the_splitter_would_cut() {
        let mut shape = Shape::default();
        assert!(shape.learn(CHUNK));
        let event = |text: &str| format!("data: {}\n\n", CHUNK.replacen(" tok", text, 1));
        let two = format!("{}{}", event("de"), event("fg"));
        let (mut lp, mut ids) = (vec![], vec![]);
        let text = Filled {
            text: Cow::Borrowed(b"de"),
            finish: None,
        };
        assert_eq!(
            shape.fill_event(two.as_bytes(), &mut lp, &mut ids),
            Some((text, two.len() / 2))
        );
        assert_eq!((lp, ids), (vec![-0.25], vec![1234]));
        for other in [
            event("ab").replace("\n\n", "\r\n\r\n"),
            event("ab").replace("\n\n", "\n"),
            event("ab").replace("data: ", "data:"),
            event("ab").replace("[1234]", "[1234,\n5]"),
            format!(": comment\n{}", event("ab")),
        ] {
            let (mut lp, mut ids) = (vec![], vec![]);
            assert_eq!(
                shape.fill_event(other.as_bytes(), &mut lp, &mut ids),
                None,
                "{other:?}"
            );
            assert!(lp.is_empty() && ids.is_empty());
        }
        // A shape whose text spans lines is never read as one event.
        let spread = CHUNK.replacen(",\"model\"", ",\n\"model\"", 1);
        assert!(shape.learn(&spread));
        let (mut lp, mut ids) = (vec![], vec![]);
        assert!(shape.fill(spread.as_bytes(), &mut lp, &mut ids).is_some());
        let e = format!("data: {spread}\n\n");
        assert_eq!(shape.fill_event(e.as_bytes(), &mut lp, &mut ids), None);
    }
}
