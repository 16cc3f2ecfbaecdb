//! A pure, incremental parser for server-sent events (the WHATWG `text/event-stream`
//! format), as used by OpenAI-compatible chat completion streams.
//!
//! Bytes arrive in arbitrary chunks (a line, an event, even a CRLF pair can be split
//! between two reads), so the parser keeps the unfinished line and the event being built
//! between calls. It handles LF, CRLF and lone CR line ends, comments (`: ping`),
//! multi-line `data`, `event`/`id`/`retry` fields and a leading byte-order mark. It knows
//! nothing about `[DONE]` or JSON: that is the chat client's business.

/// The longest line (and event) accepted; a peer that sends more is broken or hostile.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field; `None` means the default type `message`.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    /// The last `id:` seen, if any.
    pub id: Option<String>,
}

/// Parse errors. The stream cannot continue after one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    /// A line or event above [`MAX_EVENT_BYTES`].
    #[error("server-sent event larger than {MAX_EVENT_BYTES} bytes")]
    Oversized,
}

/// Incremental parser state.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The unfinished line.
    line: Vec<u8>,
    /// `data` of the event being built.
    data: String,
    /// Whether any `data` field was seen (an event with `data:` and nothing after is valid).
    has_data: bool,
    /// `event` of the event being built.
    event: Option<String>,
    /// Last event id (persists across events per the spec).
    last_id: Option<String>,
    /// The previous chunk ended in CR: a LF at the start of the next one belongs to it.
    skip_lf: bool,
    /// Still at the very start of the stream (a BOM may follow).
    at_start: bool,
    /// Bytes of the start seen so far, while checking for a BOM split across chunks.
    bom_seen: usize,
    /// `retry:` value in ms, when the server sent one.
    retry_ms: Option<u64>,
}

const BOM: &[u8] = &[0xEF, 0xBB, 0xBF];

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self {
            at_start: true,
            ..Self::default()
        }
    }

    /// The server's `retry:` hint, if it sent one.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Feeds one chunk; complete events are appended to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.at_start {
            // Strip a UTF-8 BOM, even when it is split across chunks.
            while self.at_start && !chunk.is_empty() {
                if chunk[0] == BOM[self.bom_seen] {
                    self.bom_seen += 1;
                    chunk = &chunk[1..];
                    if self.bom_seen == BOM.len() {
                        self.at_start = false;
                    }
                } else {
                    // Not a BOM after all: give back the bytes we held.
                    self.line.extend_from_slice(&BOM[..self.bom_seen]);
                    self.at_start = false;
                }
            }
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.skip_lf {
                self.skip_lf = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    self.line.extend_from_slice(&rest[..i]);
                    if rest[i] == b'\r' {
                        self.skip_lf = true;
                    }
                    rest = &rest[i + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, out)?;
                }
                None => {
                    self.line.extend_from_slice(rest);
                    rest = &[];
                }
            }
            if self.line.len() > MAX_EVENT_BYTES {
                return Err(SseError::Oversized);
            }
        }
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line[0] == b':' {
            // A comment (keep-alive such as `: ping`).
            return Ok(());
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                let v = v.strip_prefix(b" ").unwrap_or(v);
                (&line[..i], v)
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match name {
            b"data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
                if self.data.len() > MAX_EVENT_BYTES {
                    return Err(SseError::Oversized);
                }
            }
            b"event" => self.event = Some(value.into_owned()),
            b"id"
                // The spec ignores ids containing NUL.
                if !value.contains('\0') => {
                    self.last_id = Some(value.into_owned());
                }
            b"retry" => {
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry_ms = Some(ms);
                }
            }
            // Unknown fields are ignored by the spec.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if !self.has_data {
            // An event without data is not dispatched (but its type is reset).
            return;
        }
        self.has_data = false;
        out.push(SseEvent {
            event: event.filter(|e| !e.is_empty()),
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Arbitrary bytes in arbitrary chunks: events or an Oversized error, never a
        // panic, and the parser never holds more than the event limit.
        #[test]
        fn arbitrary_bytes_never_panic_and_memory_stays_bounded(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..20),
        ) {
            let mut p = SseParser::new();
            let mut out = Vec::new();
            for c in &chunks {
                if p.push(c, &mut out).is_err() {
                    break;
                }
                proptest::prop_assert!(p.line.len() <= MAX_EVENT_BYTES + 1);
                proptest::prop_assert!(p.data.len() <= MAX_EVENT_BYTES + 1);
            }
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn data_lines_join_and_blank_line_dispatches() {
        // Proves multi-line data joins with LF and only a blank line dispatches the event.
        let ev = parse_all(&[b"data: a\ndata: b\n\ndata: c\n"]);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data, "a\nb");
    }

    #[test]
    fn bom_split_across_chunks_is_stripped() {
        // Proves a byte-order mark split over two reads does not corrupt the first field.
        let ev = parse_all(&[&[0xEF, 0xBB], &[0xBF], b"data: x\n\n"]);
        assert_eq!(ev[0].data, "x");
    }

    #[test]
    fn oversized_line_is_an_error() {
        // Proves a peer cannot make the parser buffer without bound.
        let mut p = SseParser::new();
        let big = vec![b'a'; MAX_EVENT_BYTES + 10];
        assert_eq!(p.push(&big, &mut Vec::new()), Err(SseError::Oversized));
    }
}
