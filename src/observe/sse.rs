//! Incremental SSE parsing: splits a byte stream into events across chunk boundaries and
//! yields each event's joined `data:` payload. Only used on observed (traced) responses.

use bytes::BytesMut;
use std::borrow::Cow;

/// One parsed event, borrowing from the bytes fed where it can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// `event:` field, if any.
    pub event: Option<Cow<'a, str>>,
    /// `data:` lines joined with `\n`. The usual one-line event is its bytes as they came,
    /// not yet checked as UTF-8 (a reader that recognises its shape checks only what it
    /// takes); others are text already.
    pub data: Cow<'a, [u8]>,
}

impl SseEvent<'_> {
    /// The data as text (invalid UTF-8 replaced, as a lossy decoder does).
    pub fn text(&self) -> Cow<'_, str> {
        // The standard library's validator is several times faster than the lossy
        // decoder's, and events are almost always valid.
        match std::str::from_utf8(&self.data) {
            Ok(t) => Cow::Borrowed(t),
            Err(_) => String::from_utf8_lossy(&self.data),
        }
    }
}

/// Splits SSE bytes into events. Feed chunks as they arrive; completed events come out.
#[derive(Debug, Default)]
pub struct SseSplitter {
    /// An event begun in an earlier chunk.
    buf: BytesMut,
    /// Longest pending event kept before it is dropped (protects memory on a broken stream).
    max_event: usize,
}

/// Default cap on one pending event: 16 MiB.
pub const DEFAULT_MAX_EVENT: usize = 16 << 20;

impl SseSplitter {
    /// A splitter with the default event cap.
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            max_event: DEFAULT_MAX_EVENT,
        }
    }

    /// Feeds a chunk, calling `on_event` for every event it completes. Events that lie
    /// whole in `chunk` are read in place; only an event cut by a chunk boundary is copied.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let Some(mut rest) = self.complete(chunk, &mut on_event) else {
            return;
        };
        while let Some((ev, len)) = next_event(rest) {
            if let Some(ev) = ev {
                on_event(ev);
            }
            rest = &rest[len..];
        }
        self.keep(rest);
    }

    /// Completes the pending event (if any) with the start of `chunk`, calling `on_event`
    /// for it, and returns the rest of `chunk`, to be read in place (with [`next_event`],
    /// then [`Self::keep`]). `None`: the chunk did not complete the pending event and is
    /// kept with it. Only the pending event is read from a copy, so the events after it
    /// are read as cheaply as those of a chunk that starts on an event.
    pub fn complete<'c>(
        &mut self,
        chunk: &'c [u8],
        mut on_event: impl FnMut(SseEvent<'_>),
    ) -> Option<&'c [u8]> {
        if self.buf.is_empty() {
            return Some(chunk);
        }
        let held = self.buf.len();
        self.buf.extend_from_slice(chunk);
        let Some((end, sep, one_line)) = find_boundary(&self.buf) else {
            if self.buf.len() > self.max_event {
                self.buf.clear();
            }
            return None;
        };
        if let Some(ev) = self
            .buf
            .get(..end)
            .and_then(|raw| parse_event(raw, one_line))
        {
            on_event(ev);
        }
        self.buf.clear();
        // The held bytes hold no blank line, so the event ends in `chunk`.
        chunk.get((end + sep).saturating_sub(held)..)
    }

    /// Keeps the start of an event that the next chunk completes. For a caller that reads
    /// whole events itself with [`next_event`] while nothing is pending, and hands over the
    /// rest.
    pub fn keep(&mut self, partial: &[u8]) {
        if partial.len() <= self.max_event {
            self.buf.extend_from_slice(partial);
        }
    }

    /// Bytes of a partial event still pending (a stream that ended mid-event).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The first whole event of `b` (`None` inside for one without data) and its length with the
/// blank line that ends it; `None` when `b` holds no whole event. Reads events in place, as
/// [`SseSplitter::feed`] does while nothing is pending.
pub fn next_event(b: &[u8]) -> Option<(Option<SseEvent<'_>>, usize)> {
    let (end, sep, one_line) = find_boundary(b)?;
    Some((parse_event(b.get(..end)?, one_line), end + sep))
}

/// Position of the first blank line (`\n\n`, `\r\n\r\n` or `\r\r`), its length, and whether
/// the event before it is a single line (the boundary was the first line end found).
fn find_boundary(b: &[u8]) -> Option<(usize, usize, bool)> {
    // Jump between line ends (memchr) instead of testing every byte.
    let mut from = 0;
    while let Some(off) = memchr::memchr2(b'\n', b'\r', b.get(from..)?) {
        let i = from + off;
        match b[i] {
            b'\n' if b.get(i + 1) == Some(&b'\n') => return Some((i, 2, from == 0)),
            b'\r' if b.get(i + 1) == Some(&b'\n') => {
                if b.get(i + 2) == Some(&b'\r') && b.get(i + 3) == Some(&b'\n') {
                    return Some((i, 4, from == 0));
                }
                if b.get(i + 2) == Some(&b'\n') {
                    return Some((i, 3, from == 0));
                }
            }
            b'\r' if b.get(i + 1) == Some(&b'\r') => return Some((i, 2, from == 0)),
            _ => {}
        }
        from = i + 1;
    }
    None
}

/// One event's fields; `one_line` says the splitter found no line end inside it.
fn parse_event(raw: &[u8], one_line: bool) -> Option<SseEvent<'_>> {
    // The usual event is one `data: ` line.
    if let Some(payload) = raw.strip_prefix(b"data: ") {
        if one_line || memchr::memchr2(b'\n', b'\r', payload).is_none() {
            return Some(SseEvent {
                event: None,
                data: Cow::Borrowed(payload),
            });
        }
    }
    // The standard library's validator is much faster than the lossy decoder's; events are
    // almost always valid UTF-8.
    let text = match std::str::from_utf8(raw) {
        Ok(t) => Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(raw),
    };
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "data" => match data.as_mut() {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            "event" => event = Some(Cow::Owned(value.to_string())),
            _ => {}
        }
    }
    data.map(|data| SseEvent {
        event,
        data: Cow::Owned(data.into_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events as (event, data), owned.
    fn all(chunks: &[&[u8]]) -> Vec<(Option<String>, String)> {
        let mut s = SseSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |e| {
                out.push((
                    e.event.as_deref().map(str::to_string),
                    e.text().into_owned(),
                ))
            });
        }
        out
    }

    #[test]
    fn events_split_across_chunks() {
        let evs = all(&[b"data: {\"a\"", b":1}\n", b"\ndata: [DONE]\n\n"]);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].1, "{\"a\":1}");
        assert_eq!(evs[1].1, "[DONE]");
    }

    #[test]
    fn event_names_multiline_data_and_crlf() {
        let evs = all(&[b"event: message_start\r\ndata: x\r\ndata: y\r\n\r\n: comment\n\n"]);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].0.as_deref(), Some("message_start"));
        assert_eq!(evs[0].1, "x\ny");
    }

    #[test]
    fn a_stream_cut_anywhere_in_two_gives_the_same_events() {
        let src: &[u8] =
            b"data: {\"a\":1}\n\n: c\r\n\r\nevent: e\r\ndata: x\r\ndata: y\r\n\r\ndata: z\r\rdata: [DONE]\n\n";
        let whole = all(&[src]);
        assert_eq!(whole.len(), 4);
        for cut in 0..=src.len() {
            assert_eq!(all(&[&src[..cut], &src[cut..]]), whole, "cut at {cut}");
            for second in cut..=src.len() {
                let three = [&src[..cut], &src[cut..second], &src[second..]];
                assert_eq!(all(&three), whole, "cut at {cut} and {second}");
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let src = b"data: 1\n\ndata: 2\n\n";
        let chunks: Vec<&[u8]> = src.chunks(1).collect();
        let evs = all(&chunks);
        assert_eq!(
            evs.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
    }
}
