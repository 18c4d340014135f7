//! Reads an OpenAI stream chunk (chat or completions) into borrowed views, without a JSON
//! tree and without serde's visitor machinery: one pass over the bytes that keeps the fields a
//! trace needs and skips the rest. Strings without escapes are borrowed; escaped ones are
//! decoded by serde_json. Token ids and logprobs are read in place into plain vectors (see
//! [`Read`]); the other structured parts a trace keeps as values (tool calls, usage) come out
//! as raw JSON text, parsed by the caller only when present.
//!
//! Anything it does not expect (a field of another type, a duplicate key, invalid JSON, deep
//! nesting) makes it decline with `None`; the caller then parses the chunk in full, so a
//! decline costs time, never correctness. Traced streams call this once per event, where a
//! serde-derived parse cost about 5,000 instructions for a typical 230-byte chunk.

use std::borrow::Cow;

mod shape;
pub use shape::{Filled, Shape};

/// A chunk's fields, as far as a trace needs them.
#[derive(Debug, Default, PartialEq)]
pub struct Chunk<'a> {
    /// `id`.
    pub id: Option<Cow<'a, str>>,
    /// `model`.
    pub model: Option<Cow<'a, str>>,
    /// `choices` (absent and `null` are both `None`).
    pub choices: Option<Vec<Choice<'a>>>,
    /// `usage`, raw.
    pub usage: Option<&'a str>,
    /// `prompt_token_ids` (vLLM).
    pub prompt_token_ids: Option<PromptIds<'a>>,
}

/// A chunk's token ids or logprobs: read in place, or the value's raw text when it has a
/// shape the in-place read declines (the caller then reads it through a `Value`). vLLM sends
/// both in every chunk of a traced RL stream; reading them in place, instead of skipping them
/// and parsing their text again, is most of what such a chunk costs.
#[derive(Debug, PartialEq)]
pub enum Read<'a, T> {
    /// What the general path reads from the value: the ids of an array of integers, or the
    /// per-token logprobs of a `logprobs` object (each `logprob` of `content`, else the
    /// `token_logprobs`, `null` as NaN).
    Values(Vec<T>),
    /// The value's text.
    Raw(&'a str),
}

/// A chunk's prompt token ids, as text: a long prompt has thousands, which a record writes
/// back as they came rather than converting each and writing it again.
#[derive(Debug, PartialEq)]
pub enum PromptIds<'a> {
    /// An array of integers that fit `i64`, with no whitespace, each as serde_json writes it
    /// (no leading zero, no `-0`): the text serde_json would write for those values.
    Tight(&'a str),
    /// Any other value's text (the caller reads it through a `Value`).
    Raw(&'a str),
}

/// One element of `choices`.
#[derive(Debug, Default, PartialEq)]
pub struct Choice<'a> {
    /// `index`.
    pub index: Option<u64>,
    /// `delta` (chat).
    pub delta: Option<Delta<'a>>,
    /// `text` (completions).
    pub text: Option<Cow<'a, str>>,
    /// `token_ids` (vLLM).
    pub token_ids: Option<Read<'a, i64>>,
    /// `prompt_token_ids` (vLLM completions).
    pub prompt_token_ids: Option<PromptIds<'a>>,
    /// `logprobs`.
    pub logprobs: Option<Read<'a, f64>>,
    /// `finish_reason`.
    pub finish_reason: Option<Cow<'a, str>>,
    /// Where a `null` `finish_reason` sits in the chunk: a [`Template`] learned from this
    /// chunk also fits the reply's last chunk, which carries the reason there.
    pub null_finish_at: Option<usize>,
}

/// A chat choice's `delta`.
#[derive(Debug, Default, PartialEq)]
pub struct Delta<'a> {
    /// `role`.
    pub role: Option<Cow<'a, str>>,
    /// `content`.
    pub content: Option<Cow<'a, str>>,
    /// `reasoning_content` (vLLM, DeepSeek).
    pub reasoning_content: Option<Cow<'a, str>>,
    /// `reasoning` (newer vLLM).
    pub reasoning: Option<Cow<'a, str>>,
    /// `tool_calls`, raw.
    pub tool_calls: Option<&'a str>,
    /// `token_ids` (vLLM).
    pub token_ids: Option<Read<'a, i64>>,
}

/// Reads `data` (one event's payload); `None` when it is not a chunk of the expected shape.
pub fn scan(data: &str) -> Option<Chunk<'_>> {
    scan_after(data, &mut Head::default())
}

/// The text of a stream's chunks before their `choices` value
/// (`{"id":…,"object":…,"created":…,"model":…,"choices":`), which every chunk of a stream
/// repeats byte for byte. A chunk that starts with the remembered head is read from its
/// `choices` on, as if the head's keys had just been read: about half the scanning of a
/// plain text chunk. The head's fields are not reported again; callers keep the first `id`
/// and `model`, which the chunk that set the head already gave them.
#[derive(Debug, Default)]
pub struct Head {
    text: Vec<u8>,
    /// Top-level keys the head holds, as [`Scanner::chunk`] counts them.
    seen: [bool; TOP_KEYS],
}

/// Longest head remembered; longer ones are read in full each time.
const MAX_HEAD: usize = 512;

/// Top-level keys a chunk keeps: id, model, choices, usage, prompt_token_ids.
const TOP_KEYS: usize = 5;

/// As [`scan`], reading from the `choices` of a chunk that starts with `head`, and
/// remembering the head of a chunk read in full. A head is only remembered when repeating
/// it changes nothing for the caller: it may hold `id` and `model` (the first ones are
/// kept) and keys that are skipped, never `usage` or `prompt_token_ids`.
pub fn scan_after<'a>(data: &'a str, head: &mut Head) -> Option<Chunk<'a>> {
    let mut s = Scanner::new(data);
    let resume = (!head.text.is_empty() && s.b.starts_with(&head.text)).then_some(&*head);
    let (chunk, new_head) = s.chunk(resume)?;
    s.ws();
    if s.i != s.b.len() {
        return None;
    }
    if let Some((len, seen)) = new_head {
        head.text.clear();
        head.text.extend_from_slice(s.b.get(..len)?);
        head.seen = seen;
    }
    Some(chunk)
}

/// A stream's plain text chunk as a template: its text before and after the one string
/// that changes from chunk to chunk (a token of text). A chunk made of the same two parts
/// around a run of plain characters (no quote, backslash or control character) reads
/// exactly as the template's chunk with another string in that place, so it needs no scan:
/// two comparisons and a search for stop bytes.
#[derive(Debug, Default)]
pub struct Template {
    before: Vec<u8>,
    after: Vec<u8>,
    /// Where the choice's `null` `finish_reason` sits in `after`: a chunk with a string
    /// there instead (the reply's last token) fits too, and reads as that reason.
    finish: Option<usize>,
    /// Neither part holds a line end, so a `data: ` line of the template's chunk followed by
    /// a blank line is one whole event ([`Template::fill_event`]).
    one_line: bool,
}

/// Longest template kept (both parts).
const MAX_TEMPLATE: usize = 1024;

impl Template {
    /// Makes `data` the template, around `value` (a string of `data`, borrowed by
    /// [`scan`]), with the `null` finish reason the scan found at `null_finish_at`
    /// ([`Choice::null_finish_at`] of `value`'s choice). Leaves the template as it was when
    /// `value` does not lie in `data`.
    pub fn learn(&mut self, data: &str, value: &str, null_finish_at: Option<usize>) {
        // The string's place, from its address: a borrowed value points into `data`.
        let Some(start) = (value.as_ptr() as usize).checked_sub(data.as_ptr() as usize) else {
            return;
        };
        let end = start + value.len();
        if end > data.len() || data.len() - value.len() > MAX_TEMPLATE {
            return;
        }
        let (Some(before), Some(after)) = (data.get(..start), data.get(end..)) else {
            return;
        };
        // The string must sit between its quotes (an escaped value is never borrowed).
        if !before.ends_with('"') || !after.starts_with('"') {
            return;
        }
        self.before.clear();
        self.before.extend_from_slice(before.as_bytes());
        self.after.clear();
        self.after.extend_from_slice(after.as_bytes());
        self.finish = null_finish_at
            .and_then(|at| at.checked_sub(end))
            .filter(|&at| after.as_bytes().get(at..at + 4) == Some(b"null"));
        let line_end = |t: &str| memchr::memchr2(b'\n', b'\r', t.as_bytes()).is_some();
        self.one_line = !line_end(before) && !line_end(after);
    }

    /// The string in the template's place, when `data` fits the template: bytes that are
    /// valid UTF-8 (the parts around them are the template's, valid text that ends and
    /// starts with a quote). They come as bytes because the usual token of text is ASCII,
    /// which a byte test proves; the UTF-8 validator cost about a hundred instructions for
    /// each few-byte token (callgrind, traced S3).
    pub fn fill<'a>(&self, data: &'a [u8]) -> Option<&'a [u8]> {
        if self.before.is_empty()
            || data.len() < self.before.len() + self.after.len()
            || !data.starts_with(&self.before)
            || !data.ends_with(&self.after)
        {
            return None;
        }
        let value = data.get(self.before.len()..data.len() - self.after.len())?;
        if find_stop(value).is_some() {
            return None;
        }
        checked_text(value)
    }

    /// The template's chunk as one whole event at the start of `b`: `data: `, the chunk, a
    /// blank line (`\n\n`). Returns the string in the template's place (as [`Self::fill`])
    /// and the event's length with its blank line. This is the event [`SseSplitter`] would
    /// cut there, found without searching for the event's end: the string's closing quote
    /// is the first stop byte after the template's first part, and neither part holds a
    /// line end.
    ///
    /// [`SseSplitter`]: crate::observe::sse::SseSplitter
    pub fn fill_event<'a>(&self, b: &'a [u8]) -> Option<(&'a [u8], usize)> {
        if !self.one_line || self.before.is_empty() {
            return None;
        }
        let data = b.strip_prefix(b"data: ")?.strip_prefix(&self.before[..])?;
        let end = find_stop(data)?;
        let (value, rest) = data.split_at(end);
        let rest = rest.strip_prefix(&self.after[..])?.strip_prefix(b"\n\n")?;
        Some((checked_text(value)?, b.len() - rest.len()))
    }

    /// The reply's last chunk: the template with a finish reason (a run of plain characters)
    /// in place of its `null` one. Returns the text (as [`Self::fill`]) and the reason. Apart
    /// from [`Self::fill`] so that the fill of every other chunk stays as cheap.
    pub fn fill_last<'a>(&self, data: &'a [u8]) -> Option<(&'a [u8], &'a str)> {
        let (text, reason, rest) = self.read_last(data)?;
        rest.is_empty().then_some((text, reason))
    }

    /// Reads the template with a finish reason from the start of `data`: the text, the
    /// reason and the rest.
    fn read_last<'a>(&self, data: &'a [u8]) -> Option<(&'a [u8], &'a str, &'a [u8])> {
        let (head, tail) = self.after.split_at(self.finish?);
        if self.before.is_empty() {
            return None;
        }
        let data = data.strip_prefix(&self.before[..])?;
        let end = find_stop(data)?;
        let (value, rest) = data.split_at(end);
        let text = checked_text(value)?;
        let rest = rest.strip_prefix(head)?.strip_prefix(b"\"")?;
        let n = find_stop(rest)?;
        let (reason, rest) = rest.split_at(n);
        let rest = rest.strip_prefix(b"\"")?.strip_prefix(tail.get(4..)?)?;
        Some((text, std::str::from_utf8(reason).ok()?, rest))
    }
}

/// `value` when it is valid UTF-8 (ASCII is, and is the cheap test).
fn checked_text(value: &[u8]) -> Option<&[u8]> {
    (value.is_ascii() || std::str::from_utf8(value).is_ok()).then_some(value)
}

/// The integer at `b[i..]` as [`Scanner::integer_here`] reads it, and where it ends.
#[inline(always)]
fn integer_at(b: &[u8], mut i: usize) -> Option<(i64, usize)> {
    if let Some(short) = short_integer_at(b, i) {
        return Some(short);
    }
    let negative = b.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let start = i;
    // Up to 19 digits fit `u64` exactly, and more never fit `i64`: no checked step per digit.
    let mut n: u64 = 0;
    while let Some(&c) = b.get(i) {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            break;
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(d));
        i += 1;
    }
    let len = i - start;
    if len == 0
        || len > 19
        || (len > 1 && b.get(start) == Some(&b'0'))
        || matches!(b.get(i), Some(b'.' | b'e' | b'E'))
        || (negative && n == 0)
    {
        return None;
    }
    let n = if negative {
        0i64.checked_sub_unsigned(n)?
    } else {
        i64::try_from(n).ok()?
    };
    Some((n, i))
}

/// [`integer_at`] for the usual token id, 1 to 7 digits without a sign, when 8 bytes can be
/// read at `i`: the digits are found and converted together, a word at a time (SWAR), where
/// a byte at a time cost about 90 instructions per id of a long prompt's `prompt_token_ids`
/// (callgrind). `None` when that form does not apply: the caller reads byte by byte.
#[inline(always)]
fn short_integer_at(b: &[u8], i: usize) -> Option<(i64, usize)> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOPS: u64 = 0x8080_8080_8080_8080;
    let w = u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?);
    // Each byte less `0`: a digit is 0..=9. A borrow (a byte below `0`) or a carry (adding
    // 0x76 to a byte of 0x8a or more) only reaches bytes above a non-digit, so the lowest
    // non-digit is found exactly, and the digits below it are intact.
    let t = w.wrapping_sub(ONES * u64::from(b'0'));
    let non_digits = (t.wrapping_add(ONES * 0x76) | t) & TOPS;
    let len = (non_digits.trailing_zeros() / 8) as usize;
    if len == 0 || len == 8 {
        return None;
    }
    let after = (w >> (8 * len)) as u8;
    if (len > 1 && t as u8 == 0) || matches!(after, b'.' | b'e' | b'E') {
        return None;
    }
    // The digits moved to the top of the word (zero digits in front of them), then summed in
    // pairs, fours and eights: the first byte is the most significant digit.
    let d = t << (8 * (8 - len));
    let d = (d.wrapping_mul(10 * 256 + 1) >> 8) & 0x00FF_00FF_00FF_00FF;
    let d = (d.wrapping_mul(100 * 65_536 + 1) >> 16) & 0x0000_FFFF_0000_FFFF;
    let n = d.wrapping_mul(10_000 * (1 << 32) + 1) >> 32;
    Some((n as i64, i + len))
}

/// Bytes that end a run of plain string content: quote, backslash, control characters.
static STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Offset of the first quote, backslash or control character in `b`, eight bytes per step
/// (SWAR: each test flags a byte by its top bit). A borrow can flag a byte wrongly only above
/// a byte rightly flagged, so the lowest flag is exact. Chunk strings are short (keys, ids,
/// a token of text): memchr's setup costs more there, and a table lookup per byte was the
/// largest single cost of a traced stream (callgrind: 43k of its 120k extra instructions).
pub(super) fn find_stop(b: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOPS: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    let mut i = 0;
    while let Some(w) = b.get(i..i + 8) {
        let Ok(w) = <[u8; 8]>::try_from(w) else {
            break;
        };
        let x = u64::from_le_bytes(w);
        let hit = (zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x))
            & TOPS;
        if hit != 0 {
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let tail = b.get(i..)?;
    tail.iter().position(|&c| STOP[c as usize]).map(|p| i + p)
}

/// Appends the per-token logprobs of a choice's raw `logprobs` to `out`, as the general
/// path (a `Value` tree) reads them: each `logprob` of `content` (chat), else the
/// `token_logprobs` (completions, `null` as NaN). Returns `None`, leaving `out` as it was, to
/// decline anything else: not an object, a duplicate key, an entry or a value of another
/// type, a number out of range. Traced vLLM streams carry logprobs in every chunk, where the
/// tree cost about 40% of a chunk's reading (criterion `chat_1000_events`).
#[cfg(test)]
pub fn logprobs_into(raw: &str, out: &mut Vec<f64>) -> Option<()> {
    read_whole(raw, out, Scanner::logprobs)
}

/// Appends the token ids of a raw `token_ids` (or `prompt_token_ids`) array to `out`, as the
/// general path reads them. Returns `None`, leaving `out` as it was, to decline anything but
/// an array of integers that fit `i64` (the general path reads the rest).
#[cfg(test)]
pub fn ids_into(raw: &str, out: &mut Vec<i64>) -> Option<()> {
    read_whole(raw, out, Scanner::ids)
}

/// `raw` read whole by `read` into `out`, which a decline leaves as it was.
#[cfg(test)]
fn read_whole<'a, T>(
    raw: &'a str,
    out: &mut Vec<T>,
    read: impl FnOnce(&mut Scanner<'a>, &mut Vec<T>) -> Option<()>,
) -> Option<()> {
    let start = out.len();
    let done = Scanner::new(raw).whole(|s| read(s, out));
    if done.is_none() {
        out.truncate(start);
    }
    done
}

/// Deepest nesting skipped; deeper input is declined rather than recursed into.
const MAX_DEPTH: usize = 64;

struct Scanner<'a> {
    src: &'a str,
    b: &'a [u8],
    i: usize,
}

/// Sets a field once; a second occurrence of the key declines the chunk, as serde would.
fn once<T>(slot: &mut Option<T>, seen: &mut bool, v: Option<T>) -> Option<()> {
    if std::mem::replace(seen, true) {
        return None;
    }
    *slot = v;
    Some(())
}

impl<'a> Scanner<'a> {
    fn new(src: &'a str) -> Self {
        Self {
            src,
            b: src.as_bytes(),
            i: 0,
        }
    }

    /// Reads all of the input with `read` (whitespace around it allowed).
    #[cfg(test)]
    fn whole(mut self, read: impl FnOnce(&mut Self) -> Option<()>) -> Option<()> {
        read(&mut self)?;
        self.ws();
        (self.i == self.b.len()).then_some(())
    }

    /// A scanner over bytes not known to be UTF-8, for [`Shape`]'s holes: it reads numbers
    /// and punctuation, which are ASCII; anything that would borrow text declines, as its
    /// text is empty.
    fn over_bytes(b: &'a [u8]) -> Self {
        Self { src: "", b, i: 0 }
    }

    /// The text of the bytes from `start` to the position, which a number's grammar has
    /// checked to be ASCII.
    fn ascii_since(&self, start: usize) -> Option<&'a str> {
        std::str::from_utf8(self.b.get(start..self.i)?).ok()
    }

    /// A number as `f64`. The standard parse is correctly rounded, as serde_json's is with
    /// `float_roundtrip` (on in Cargo.toml), integers included; [`Self::number`] declined
    /// what is out of range.
    fn f64(&mut self) -> Option<f64> {
        self.ws();
        self.f64_here()
    }

    /// [`Self::f64`] at the position, with no whitespace before it.
    fn f64_here(&mut self) -> Option<f64> {
        let start = self.i;
        self.number()?;
        self.ascii_since(start)?.parse().ok()
    }

    /// A choice's `logprobs` object: each `logprob` of `content` (chat) appended, else the
    /// `token_logprobs` (completions). Declines another shape, a duplicate key, an entry or
    /// a value of another type.
    fn logprobs(&mut self, out: &mut Vec<f64>) -> Option<()> {
        let mut seen = [false; 2];
        let mut content = false;
        let mut token_logprobs: Option<Vec<f64>> = None;
        self.object(|s, key| match key {
            "content" => {
                if std::mem::replace(&mut seen[0], true) {
                    return None;
                }
                content = s.logprob_entries(out)?;
                Some(())
            }
            "token_logprobs" => {
                if std::mem::replace(&mut seen[1], true) {
                    return None;
                }
                token_logprobs = s.token_logprobs()?;
                Some(())
            }
            _ => s.skip(1),
        })?;
        if !content {
            out.extend(token_logprobs.unwrap_or_default());
        }
        Some(())
    }

    /// `content`: the `logprob` of each entry appended, and whether it was an array (any
    /// other value is skipped, as the general path ignores it).
    fn logprob_entries(&mut self, out: &mut Vec<f64>) -> Option<bool> {
        if self.peek()? != b'[' {
            self.skip(2)?;
            return Some(false);
        }
        self.array(|s| {
            let mut logprob = None;
            let mut seen = false;
            s.object(|s, key| match key {
                "logprob" => once(&mut logprob, &mut seen, Some(s.f64()?)),
                _ => s.skip(3),
            })?;
            out.push(logprob?);
            Some(())
        })?;
        Some(true)
    }

    /// `token_logprobs` (completions): numbers, `null` read as NaN; `None` inside when it is
    /// not an array.
    fn token_logprobs(&mut self) -> Option<Option<Vec<f64>>> {
        if self.peek()? != b'[' {
            self.skip(2)?;
            return Some(None);
        }
        let mut v = Vec::new();
        self.array(|s| {
            v.push(if s.null()? { f64::NAN } else { s.f64()? });
            Some(())
        })?;
        Some(Some(v))
    }

    /// An array of integers that fit `i64`, appended; declines anything else.
    fn ids(&mut self, out: &mut Vec<i64>) -> Option<()> {
        // The usual array has no whitespace in it: read without looking for any.
        self.ws();
        let (at, len) = (self.i, out.len());
        if self.tight_ints(|id| out.push(id)).is_some() {
            return Some(());
        }
        self.i = at;
        out.truncate(len);
        self.array(|s| {
            let id = s.integer()?;
            out.push(id);
            Some(())
        })
    }

    /// An array of integers that fit `i64` at the position, with no whitespace in it
    /// (vLLM writes none), each given to `each`.
    fn tight_ints(&mut self, mut each: impl FnMut(i64)) -> Option<()> {
        self.tight_array(|b, i| {
            let (n, end) = integer_at(b, i)?;
            each(n);
            Some(end)
        })
    }

    /// An array with no whitespace in it at the position, each element read by `element`
    /// from where it starts (returning where it ends). The position is kept in a local
    /// between elements: a long prompt's `prompt_token_ids` has thousands.
    fn tight_array(
        &mut self,
        mut element: impl FnMut(&[u8], usize) -> Option<usize>,
    ) -> Option<()> {
        let b = self.b;
        let mut i = self.i;
        if b.get(i) != Some(&b'[') {
            return None;
        }
        i += 1;
        if b.get(i) == Some(&b']') {
            self.i = i + 1;
            return Some(());
        }
        loop {
            let end = element(b, i)?;
            match b.get(end) {
                Some(b',') => i = end + 1,
                Some(b']') => {
                    self.i = end + 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An integer that fits `i64`, read in one pass. Declines a fraction or exponent (a
    /// float, which the general path skips as an id), `-0` (serde_json reads it as -0.0),
    /// leading zeros and overflow.
    fn integer(&mut self) -> Option<i64> {
        self.ws();
        self.integer_here()
    }

    /// [`Self::integer`] at the position, with no whitespace before it.
    fn integer_here(&mut self) -> Option<i64> {
        let (n, end) = integer_at(self.b, self.i)?;
        self.i = end;
        Some(n)
    }

    /// Calls `item` for each element of an array, positioned at it.
    fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            item(self)?;
            if !self.more(b']')? {
                return Some(());
            }
        }
    }

    /// After an element of an array or object: `true` past a comma (another follows),
    /// `false` past `close` (the end); declines anything else.
    #[inline]
    fn more(&mut self, close: u8) -> Option<bool> {
        let c = self.peek()?;
        if c != b',' && c != close {
            return None;
        }
        self.i += 1;
        Some(c == b',')
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// Calls `field` for each key of an object, positioned at its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.key()?;
            self.eat(b':')?;
            field(self, key)?;
            if !self.more(b'}')? {
                return Some(());
            }
        }
    }

    /// A key; keys with escapes are declined (none of the keys we keep has one).
    fn key(&mut self) -> Option<&'a str> {
        match self.string()? {
            Cow::Borrowed(k) => Some(k),
            Cow::Owned(_) => None,
        }
    }

    /// A string value: borrowed when it has no escapes, else decoded by serde_json.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.eat(b'"')?;
        let start = self.i;
        let n = find_stop(self.b.get(start..)?)?;
        // The common string (a key, an id, a token of text) has no escape: one search, no
        // loop. Kept apart from the escape path, this costs about half as much per string
        // (callgrind, traced S3L).
        if self.b.get(start + n) == Some(&b'"') {
            self.i = start + n + 1;
            return self.src.get(start..start + n).map(Cow::Borrowed);
        }
        self.i = start + n;
        self.escaped_string(start)
    }

    /// The rest of a string from its first stop byte on (see [`Self::string`]), `start`
    /// being just after its opening quote.
    #[cold]
    #[inline(never)]
    fn escaped_string(&mut self, start: usize) -> Option<Cow<'a, str>> {
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' => {}
                _ => return None, // a raw control character
            }
            self.i += 1;
            match *self.b.get(self.i)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                b'u' => {
                    let hex = self.b.get(self.i + 1..self.i + 5)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i += 4;
                }
                _ => return None,
            }
            self.i += 1;
            self.i += find_stop(self.b.get(self.i..)?)?;
        }
        let end = self.i;
        self.i += 1;
        // Quotes included: serde_json decodes escapes and surrogate pairs, and rejects lone
        // surrogates, exactly as the full parse would. The bytes are checked as UTF-8 here,
        // as a scanner over bytes ([`Shape`]'s) has not checked them.
        let text = std::str::from_utf8(self.b.get(start - 1..end + 1)?).ok()?;
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        if self.b.get(self.i..self.i + word.len())? == word {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// `null` (consumed) gives `Some(true)`; anything else is left in place.
    fn null(&mut self) -> Option<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(true);
        }
        Some(false)
    }

    fn opt_string(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.null()? {
            return Some(None);
        }
        self.string().map(Some)
    }

    /// An unsigned integer that fits `u64` (`index`); `null` is `None`.
    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.null()? {
            return Some(None);
        }
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        let digits = self.src.get(start..self.i)?;
        // A fraction or exponent makes it a float, which `index` is not.
        if digits.is_empty()
            || (digits.len() > 1 && digits.starts_with('0'))
            || matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        digits.parse().ok().map(Some)
    }

    /// A value read in place by `read`, or, when `read` declines, its text; `None` for
    /// `null`. A decline costs a second pass over the value, never the chunk.
    fn read_or_raw<T>(
        &mut self,
        read: impl FnOnce(&mut Self, &mut Vec<T>) -> Option<()>,
    ) -> Option<Option<Read<'a, T>>> {
        if self.null()? {
            return Some(None);
        }
        let start = self.i;
        // Room for a short prompt's ids without growing from nothing.
        let mut values = Vec::with_capacity(16);
        if read(self, &mut values).is_some() {
            return Some(Some(Read::Values(values)));
        }
        self.i = start;
        Some(self.raw()?.map(Read::Raw))
    }

    fn ids_or_raw(&mut self) -> Option<Option<Read<'a, i64>>> {
        self.read_or_raw(Self::ids)
    }

    /// Prompt token ids, checked as a tight array of integers (not converted), else raw;
    /// `None` for `null`.
    fn prompt_ids(&mut self) -> Option<Option<PromptIds<'a>>> {
        if self.null()? {
            return Some(None);
        }
        let start = self.i;
        if self.tight_ints(drop).is_some() {
            return Some(Some(PromptIds::Tight(self.src.get(start..self.i)?)));
        }
        self.i = start;
        Some(self.raw()?.map(PromptIds::Raw))
    }

    /// Skips any value and returns its text; `None` for `null`.
    fn raw(&mut self) -> Option<Option<&'a str>> {
        self.ws();
        let start = self.i;
        self.skip(0)?;
        let text = self.src.get(start..self.i)?;
        Some((text != "null").then_some(text))
    }

    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|s, _| s.skip(depth + 1)),
            // Arrays of numbers (logprobs' `bytes`, ids) are common: no recursion for their
            // elements.
            b'[' => self.array(|s| match s.peek()? {
                b'-' | b'0'..=b'9' => s.number(),
                _ => s.skip(depth + 1),
            }),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A JSON number, checked against the grammar and against `f64`'s range, as serde_json
    /// checks it (it rejects a number that reads as infinite, and reads integers too long
    /// for 64 bits as floats).
    fn number(&mut self) -> Option<()> {
        let start = self.i;
        let could_overflow = self.number_grammar()?;
        if could_overflow {
            let v: f64 = self.ascii_since(start)?.parse().ok()?;
            if !v.is_finite() {
                return None;
            }
        }
        Some(())
    }

    /// [`Self::number`]'s grammar; returns whether the number may be out of range (a
    /// positive exponent, or more integer digits than `f64::MAX` has).
    fn number_grammar(&mut self) -> Option<bool> {
        let digits = |s: &mut Self| {
            let start = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            s.i - start
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let lead = self.b.get(self.i).copied();
        let n = digits(self);
        if n == 0 || (n > 1 && lead == Some(b'0')) {
            return None;
        }
        let mut could_overflow = n > 300;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            match self.b.get(self.i) {
                Some(b'-') => self.i += 1,
                Some(b'+') => {
                    self.i += 1;
                    could_overflow = true;
                }
                _ => could_overflow = true,
            }
            if digits(self) == 0 {
                return None;
            }
        }
        Some(could_overflow)
    }

    /// The top-level object, from its start or, with `resume`, from the `choices` value
    /// after the head. Also returns the head of a chunk read from its start that may be
    /// remembered (its length and the keys it holds).
    #[allow(clippy::type_complexity)]
    fn chunk(
        &mut self,
        resume: Option<&Head>,
    ) -> Option<(Chunk<'a>, Option<(usize, [bool; TOP_KEYS])>)> {
        let mut c = Chunk::default();
        let mut seen = [false; TOP_KEYS];
        let mut head = None;
        let mut key = match resume {
            Some(h) => {
                self.i = h.text.len();
                seen = h.seen;
                "choices"
            }
            None => {
                self.eat(b'{')?;
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some((c, None));
                }
                let k = self.key()?;
                self.eat(b':')?;
                k
            }
        };
        loop {
            if key == "choices" && resume.is_none() && !seen[2] && !seen[3] && !seen[4] {
                head = (self.i <= MAX_HEAD).then_some((self.i, seen));
            }
            match key {
                "id" => once(&mut c.id, &mut seen[0], self.opt_string()?),
                "model" => once(&mut c.model, &mut seen[1], self.opt_string()?),
                "choices" => once(&mut c.choices, &mut seen[2], self.choices()?),
                "usage" => once(&mut c.usage, &mut seen[3], self.raw()?),
                "prompt_token_ids" => {
                    once(&mut c.prompt_token_ids, &mut seen[4], self.prompt_ids()?)
                }
                _ => self.skip(1),
            }?;
            if !self.more(b'}')? {
                return Some((c, head));
            }
            key = self.key()?;
            self.eat(b':')?;
        }
    }

    fn choices(&mut self) -> Option<Option<Vec<Choice<'a>>>> {
        if self.null()? {
            return Some(None);
        }
        let mut out = Vec::with_capacity(1);
        self.array(|s| {
            out.push(s.choice()?);
            Some(())
        })?;
        Some(Some(out))
    }

    fn choice(&mut self) -> Option<Choice<'a>> {
        let mut c = Choice::default();
        let mut seen = [false; 7];
        self.object(|s, key| match key {
            "index" => once(&mut c.index, &mut seen[0], s.opt_u64()?),
            "delta" => {
                let d = if s.null()? { None } else { Some(s.delta()?) };
                once(&mut c.delta, &mut seen[1], d)
            }
            "text" => once(&mut c.text, &mut seen[2], s.opt_string()?),
            "token_ids" => once(&mut c.token_ids, &mut seen[3], s.ids_or_raw()?),
            "prompt_token_ids" => once(&mut c.prompt_token_ids, &mut seen[4], s.prompt_ids()?),
            "logprobs" => {
                let lp = s.read_or_raw(Self::logprobs)?;
                once(&mut c.logprobs, &mut seen[5], lp)
            }
            "finish_reason" => {
                s.ws();
                let at = s.i;
                let reason = s.opt_string()?;
                if reason.is_none() {
                    c.null_finish_at = Some(at);
                }
                once(&mut c.finish_reason, &mut seen[6], reason)
            }
            _ => s.skip(2),
        })?;
        Some(c)
    }

    fn delta(&mut self) -> Option<Delta<'a>> {
        let mut d = Delta::default();
        let mut seen = [false; 6];
        self.object(|s, key| match key {
            "role" => once(&mut d.role, &mut seen[0], s.opt_string()?),
            "content" => once(&mut d.content, &mut seen[1], s.opt_string()?),
            "reasoning_content" => once(&mut d.reasoning_content, &mut seen[2], s.opt_string()?),
            "reasoning" => once(&mut d.reasoning, &mut seen[3], s.opt_string()?),
            "tool_calls" => once(&mut d.tool_calls, &mut seen[4], s.raw()?),
            "token_ids" => once(&mut d.token_ids, &mut seen[5], s.ids_or_raw()?),
            _ => s.skip(3),
        })?;
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON's integer grammar and `i64`'s range, read the slow way.
    fn reference_integer(s: &[u8]) -> Option<(i64, usize)> {
        let sign = usize::from(s.first() == Some(&b'-'));
        let len = s[sign..].iter().take_while(|c| c.is_ascii_digit()).count();
        let end = sign + len;
        let digits = &s[sign..end];
        if len == 0
            || (len > 1 && digits[0] == b'0')
            || matches!(s.get(end), Some(b'.' | b'e' | b'E'))
            || (sign == 1 && digits.iter().all(|&c| c == b'0'))
        {
            return None;
        }
        let v: i64 = std::str::from_utf8(&s[..end]).ok()?.parse().ok()?;
        Some((v, end))
    }

    #[test]
    fn integers_read_as_json_and_i64_read_them() {
        let mut cases: Vec<Vec<u8>> = Vec::new();
        let numbers = (0..2000u64)
            .chain([
                9999, 10000, 99_999, 1_000_000, 9_999_999, 10_000_000, 12_345_678,
            ])
            .chain([99_999_999, 100_000_000, 123_456_789_012, i64::MAX as u64])
            .chain([i64::MAX as u64 + 1, u64::MAX]);
        for n in numbers {
            for sign in ["", "-"] {
                for lead in ["", "0"] {
                    for tail in ["", ",", "]", ".5", "e3", "E", "x", "9", "\0", "é"] {
                        cases.push(format!("{sign}{lead}{n}{tail}").into_bytes());
                    }
                }
            }
        }
        for c in 0..=255u8 {
            cases.push(vec![b'4', c, b']']);
            cases.push(vec![c, b'4', b']']);
            // With room for a word read after the number (the id arrays' fast form).
            for digits in [
                "7", "12", "305", "1000", "99999", "123456", "1234567", "12345678",
            ] {
                cases.push(digits.bytes().chain([c]).chain(*b"0000000]").collect());
            }
        }
        let padded: Vec<Vec<u8>> = cases
            .iter()
            .map(|c| [&c[..], b"        "].concat())
            .collect();
        cases.extend(padded);
        for case in cases {
            let mut s = Scanner::over_bytes(&case);
            let got = s.integer_here().map(|v| (v, s.i));
            assert_eq!(
                got,
                reference_integer(&case),
                "{:?}",
                String::from_utf8_lossy(&case)
            );
        }
    }

    #[test]
    fn prompt_ids_are_kept_as_text_only_when_it_is_serde_jsons() {
        let prompt = |ids: &str| {
            let chunk = format!(r#"{{"choices":[],"prompt_token_ids":{ids}}}"#);
            // `None`: the chunk was declined (the general path reads it).
            scan(&chunk).map(|c| match c.prompt_token_ids {
                Some(PromptIds::Tight(t)) => Ok(t.to_string()),
                Some(PromptIds::Raw(t)) => Err(t.to_string()),
                None => Err("null".into()),
            })
        };
        let long: Vec<i64> = (0..3000).map(|i| i * 7919 % 200_003 - 50).collect();
        let long_text = serde_json::to_string(&long).unwrap();
        for tight in [
            "[]".to_string(),
            "[0]".into(),
            "[1,-2,30,400,5000,60000,700000,8000000,90000000,123456789012]".into(),
            format!("[{},{}]", i64::MAX, i64::MIN),
            long_text,
        ] {
            let back: Vec<i64> = serde_json::from_str(&tight).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), tight);
            assert_eq!(prompt(&tight), Some(Ok(tight.clone())), "{tight}");
        }
        assert_eq!(prompt(" [1,2]"), Some(Ok("[1,2]".into())));
        // Anything serde_json would write otherwise is read through a value.
        for other in [
            "[1, 2]",
            "[-0]",
            "[1.0]",
            "[1e3]",
            "[9223372036854775808]",
            r#"["1"]"#,
            "{}",
            "7",
        ] {
            assert_eq!(prompt(other), Some(Err(other.to_string())), "{other}");
        }
        for declined in ["[01]", "[1,]", "[1"] {
            assert_eq!(prompt(declined), None, "{declined}");
        }
        assert_eq!(prompt("null"), Some(Err("null".into())));
    }

    #[test]
    fn find_stop_finds_the_first_stop_byte_at_every_offset() {
        for len in 0..40 {
            for at in 0..=len {
                for stop in [b'"', b'\\', 0x00, 0x01, 0x1f] {
                    // Bytes next to the stop values in every lane: 0x20, 0x21, 0x5b, 0x5d,
                    // 0x7f, 0x80, 0xff must never be flagged.
                    let filler = [0x20u8, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0xff, b'a', b'#'];
                    let mut b: Vec<u8> = (0..len).map(|k| filler[k % filler.len()]).collect();
                    if at < len {
                        b[at] = stop;
                        // A second stop byte above the first must not hide it.
                        if at + 1 < len {
                            b[at + 1] = 0x00;
                        }
                    }
                    let want = b.iter().position(|&c| STOP[c as usize]);
                    assert_eq!(find_stop(&b), want, "{b:?}");
                }
            }
        }
    }

    /// The text of a template fill (a template learned without a finish reason, which no
    /// last chunk fits).
    fn fill_text(t: &Template, data: &[u8]) -> Option<Vec<u8>> {
        assert_eq!(t.fill_last(data), None);
        t.fill(data).map(<[u8]>::to_vec)
    }

    /// [`fill_text`] of a whole event, with the event's length.
    fn event_text(t: &Template, b: &[u8]) -> Option<(Vec<u8>, usize)> {
        t.fill_event(b).map(|(text, len)| (text.to_vec(), len))
    }

    #[test]
    fn a_template_is_filled_only_by_a_run_of_plain_characters() {
        let first = r#"{"choices":[{"delta":{"content":"abc"}}],"id":"x"}"#;
        let c = scan(first).unwrap();
        let delta = c.choices.as_ref().unwrap()[0].delta.as_ref().unwrap();
        let Some(Cow::Borrowed(text)) = delta.content else {
            panic!("not borrowed");
        };
        let mut t = Template::default();
        assert_eq!(
            fill_text(&t, first.as_bytes()),
            None,
            "an empty template fits nothing"
        );
        t.learn(first, text, None);
        assert_eq!(fill_text(&t, first.as_bytes()), Some(b"abc".to_vec()));
        let chunk =
            |s: &str| format!(r#"{{"choices":[{{"delta":{{"content":"{s}"}}}}],"id":"x"}}"#);
        assert_eq!(fill_text(&t, chunk("").as_bytes()), Some(b"".to_vec()));
        let fitted = chunk(" tok 😀 é");
        assert_eq!(
            fill_text(&t, fitted.as_bytes()),
            Some(" tok 😀 é".as_bytes().to_vec())
        );
        let mut bad = chunk("aZ").into_bytes();
        let at = bad.iter().position(|&c| c == b'Z').unwrap();
        bad[at] = 0xff;
        assert_eq!(fill_text(&t, &bad), None, "a fill must be UTF-8");
        for stop in [r#"a\"b"#, r#"a\nb"#, "a\tb", "a\u{1}b", r#"","x":""#] {
            assert_eq!(fill_text(&t, chunk(stop).as_bytes()), None, "{stop:?}");
        }
        assert_eq!(
            fill_text(&t, br#"{"choices":[{"delta":{"content":"abc"}}],"id":"y"}"#),
            None
        );
        assert_eq!(fill_text(&t, br#"{"choices":[{"delta":{"content":""#), None);
        // A string that is not part of the chunk, or not between quotes, is not learned.
        let mut t = Template::default();
        t.learn(first, "abc", None);
        assert_eq!(fill_text(&t, first.as_bytes()), None);
        t.learn(first, &first[3..9], None);
        assert_eq!(fill_text(&t, first.as_bytes()), None);
    }

    #[test]
    fn a_template_event_is_the_event_the_splitter_would_cut() {
        let first = r#"{"id":"x","choices":[{"delta":{"content":"abc"}}]}"#;
        let mut t = Template::default();
        let Some(Cow::Borrowed(text)) = scan(first).unwrap().choices.unwrap()[0]
            .delta
            .as_ref()
            .unwrap()
            .content
        else {
            panic!("not borrowed");
        };
        t.learn(first, text, None);
        let event = |s: &str| format!("data: {}\n\n", first.replace("abc", s));
        let two = format!("{}{}", event("de"), event("fg"));
        assert_eq!(
            event_text(&t, two.as_bytes()),
            Some((b"de".to_vec(), two.len() / 2))
        );
        let e = event("😀 é");
        assert_eq!(
            event_text(&t, e.as_bytes()),
            Some(("😀 é".as_bytes().to_vec(), e.len()))
        );
        for other in [
            event("a\\\"b"),                       // an escape
            event("a\tb"),                         // a control character
            event("").replace("\n\n", "\r\n\r\n"), // another blank line
            event("ab").replace("\n\n", "\n"),     // not ended yet
            event("ab").replace("data: ", "data:"),
            event("ab").replace("\"x\"", "\"y\""),
            format!(": comment\n{}", event("ab")),
        ] {
            assert_eq!(event_text(&t, other.as_bytes()), None, "{other:?}");
        }
        let mut bad = event("aZ").into_bytes();
        let at = bad.iter().position(|&c| c == b'Z').unwrap();
        bad[at] = 0xff;
        assert_eq!(event_text(&t, &bad), None, "a fill must be UTF-8");
        // A template whose parts span lines is never read as one event.
        let spread = "{\"id\":\"x\",\n\"choices\":[{\"delta\":{\"content\":\"abc\"}}]}";
        let mut t = Template::default();
        t.learn(spread, &spread[spread.find("abc").unwrap()..][..3], None);
        assert_eq!(fill_text(&t, spread.as_bytes()), Some(b"abc".to_vec()));
        assert_eq!(
            event_text(&t, format!("data: {spread}\n\n").as_bytes()),
            None
        );
    }

    #[test]
    fn a_template_reads_the_last_chunk_finish_reason_where_its_own_is_null() {
        let chunk = |text: &str, reason: &str| {
            format!(
                r#"{{"id":"x","choices":[{{"index":0,"delta":{{"content":"{text}"}},"finish_reason" : {reason},"stop_reason":null}}]}}"#
            )
        };
        let learned = |first: &str| {
            let c = scan(first).unwrap();
            let choice = &c.choices.as_ref().unwrap()[0];
            let Some(Cow::Borrowed(text)) = choice.delta.as_ref().unwrap().content else {
                panic!("not borrowed");
            };
            let mut t = Template::default();
            t.learn(first, text, choice.null_finish_at);
            t
        };
        let first = chunk("abc", "null");
        let t = learned(&first);
        // What the chunk reads as: its text, and its finish reason when it is the last one.
        let reason = |data: &str| {
            let b = data.as_bytes();
            match (t.fill(b), t.fill_last(b)) {
                (Some(text), None) => Some((text.to_vec(), None)),
                (None, Some((text, r))) => Some((text.to_vec(), Some(r.to_string()))),
                (None, None) => None,
                both => panic!("fits both ways: {both:?}"),
            }
        };
        assert_eq!(reason(&first), Some((b"abc".to_vec(), None)));
        assert_eq!(
            reason(&chunk("de", r#""stop""#)),
            Some((b"de".to_vec(), Some("stop".into())))
        );
        assert_eq!(
            reason(&chunk("", r#""tool_calls""#)),
            Some((Vec::new(), Some("tool_calls".into())))
        );
        // A whole event of it is left to the splitter (and then read by `fill_last`).
        let event = format!("data: {}\n\n", chunk("z", r#""length""#));
        assert_eq!(t.fill_event(event.as_bytes()), None);
        assert_eq!(
            reason(&chunk("z", r#""length""#)),
            Some((b"z".to_vec(), Some("length".into())))
        );
        // Anything but a run of plain characters is scanned instead (and read the same).
        for other in [
            chunk("de", r#""st\"op""#),
            chunk("de", "\"st\nop\""),
            chunk("de", "\"st\top\""),
            chunk("de", "1"),
            chunk("de", "nul"),
            chunk("de", r#""stop"#),
            chunk("de", r#""stop","#),
            chunk("de", r#""stop""#).replace("stop_reason", "stop_reasons"),
        ] {
            assert_eq!(reason(&other), None, "{other}");
        }
        let mut bad = chunk("de", r#""sZop""#).into_bytes();
        let at = bad.iter().position(|&c| c == b'Z').unwrap();
        bad[at] = 0xff;
        assert_eq!(t.fill_last(&bad), None, "a reason must be UTF-8");
        bad[at] = b't';
        assert_eq!(t.fill_last(&bad), Some((&b"de"[..], "stop")));

        // The `null` must be the choice's finish reason: another key's `null` is not a place
        // for one, and neither is a template learned without a finish reason.
        let other_key = first.replace(
            r#""finish_reason" : null,"stop_reason":null"#,
            r#""stop_reason":null"#,
        );
        let t = learned(&other_key);
        let last = other_key.replace(r#""stop_reason":null"#, r#""stop_reason":"stop""#);
        assert_eq!(t.fill_last(last.as_bytes()), None);
        assert!(t.fill(other_key.as_bytes()).is_some());
        let in_delta = r#"{"choices":[{"delta":{"content":"abc","finish_reason":null}}]}"#;
        let t = learned(in_delta);
        assert!(t.fill(in_delta.as_bytes()).is_some());
        let stopped = in_delta.replace("null", r#""stop""#);
        assert_eq!(t.fill_last(stopped.as_bytes()), None);
    }

    #[test]
    fn reads_a_plain_chunk_borrowing_its_strings() {
        let c = scan(r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","choices":[{"index":0,"delta":{"content":" tok"},"logprobs":null,"finish_reason":null}]}"#).unwrap();
        assert!(matches!(c.id, Some(Cow::Borrowed("chatcmpl-1"))));
        assert_eq!(c.model.as_deref(), Some("m"));
        let ch = c.choices.unwrap();
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].index, Some(0));
        assert!(matches!(
            ch[0].delta.as_ref().unwrap().content,
            Some(Cow::Borrowed(" tok"))
        ));
        assert_eq!(ch[0].logprobs, None);
        assert_eq!(ch[0].finish_reason, None);
    }

    #[test]
    fn keeps_raw_parts_and_decodes_escapes() {
        let c = scan(
            " {\"choices\" : [ {\"index\":1,\"delta\":{\"content\":\"a\\n\\\"b\\\" \\u00e9 \\ud83d\\ude00\",\"token_ids\":[1, 2]},\
             \"logprobs\":{\"content\":[{\"logprob\":-1.5e-3}]}} ],\"usage\":{\"total_tokens\":3}} \n",
        )
        .unwrap();
        let ch = &c.choices.as_ref().unwrap()[0];
        let d = ch.delta.as_ref().unwrap();
        assert_eq!(d.content.as_deref(), Some("a\n\"b\" é 😀"));
        assert_eq!(d.token_ids, Some(Read::Values(vec![1, 2])));
        assert_eq!(ch.logprobs, Some(Read::Values(vec![-1.5e-3])));
        assert_eq!(c.usage, Some(r#"{"total_tokens":3}"#));
        // A shape the in-place read declines is kept as text, and the chunk is still read.
        let c =
            scan(r#"{"choices":[{"token_ids":[1.5, "x"],"logprobs":{"content":[7]}}]}"#).unwrap();
        let ch = &c.choices.as_ref().unwrap()[0];
        assert_eq!(ch.token_ids, Some(Read::Raw(r#"[1.5, "x"]"#)));
        assert_eq!(ch.logprobs, Some(Read::Raw(r#"{"content":[7]}"#)));
        // Invalid JSON there still declines the whole chunk.
        assert_eq!(scan(r#"{"choices":[{"token_ids":[1,,2]}]}"#), None);
    }

    #[test]
    fn declines_what_the_full_parse_would_reject_or_read_otherwise() {
        for bad in [
            "",
            "[]",
            r#"{"choices":[{"index":0,"delta":{"content":5}}]}"#,
            r#"{"choices":[{"index":-1}]}"#,
            r#"{"choices":[{"index":1.0}]}"#,
            r#"{"choices":[{"index":01}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"id":"a","id":"b"}"#,
            r#"{"id":"a"} x"#,
            r#"{"id":"a",}"#,
            r#"{"id":"a\x"}"#,
            r#"{"id":"\ud800"}"#,
            "{\"id\":\"tab\there\"}",
            r#"{"x":[1,2,]}"#,
            r#"{"x":-}"#,
            r#"{"x":1.}"#,
            r#"{"x":tru}"#,
            r#"{"choices":{}}"#,
        ] {
            assert_eq!(scan(bad), None, "{bad}");
            // Where the full parse accepts the text, it is for a reason the views cannot hold.
        }
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert_eq!(scan(&deep), None);
        assert!(scan(r#"{"x":[[{"a":[true,false,null,-0.5E+2,"s"]}]],"choices":null}"#).is_some());
    }
}
