//! The SSE parser against the shapes chat streams take on the wire, fed in every
//! possible split: the result must never depend on where the network cut the bytes.

use rand::{Rng, SeedableRng, rngs::StdRng};
use voice_pod::providers::sse::{SseEvent, SseParser};

fn parse_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
    let mut p = SseParser::new();
    let mut out = Vec::new();
    for c in chunks {
        p.push(c, &mut out).expect("valid stream");
    }
    out
}

fn parse_whole(input: &[u8]) -> Vec<SseEvent> {
    parse_chunks(&[input])
}

/// A realistic Cerebras stream: comments, CRLF and LF, a multi-line data field, an
/// error event, a keep-alive, `[DONE]`.
const STREAM: &[u8] = b": ping\r\n\r\n\
data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n\
data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
: keep-alive\n\
data: {\"choices\":[{\"delta\":\n\
data: {\"content\":\"lo\"}}]}\n\n\
event: error\r\n\
data: {\"message\":\"boom\"}\r\n\r\n\
id: 7\n\
data: [DONE]\n\n";

fn expected() -> Vec<SseEvent> {
    vec![
        SseEvent {
            event: None,
            data: "{\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}".into(),
            id: None,
        },
        SseEvent {
            event: None,
            data: "{\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}".into(),
            id: None,
        },
        SseEvent {
            event: None,
            data: "{\"choices\":[{\"delta\":\n{\"content\":\"lo\"}}]}".into(),
            id: None,
        },
        SseEvent {
            event: Some("error".into()),
            data: "{\"message\":\"boom\"}".into(),
            id: None,
        },
        SseEvent {
            event: None,
            data: "[DONE]".into(),
            id: Some("7".into()),
        },
    ]
}

#[test]
fn whole_stream_yields_data_events_error_event_and_done() {
    // Proves comments and keep-alives vanish, CRLF/LF both end lines, multi-line data joins, `event:` is kept.
    assert_eq!(parse_whole(STREAM), expected());
}

#[test]
fn every_two_way_split_gives_the_same_events() {
    // Proves a chunk boundary at any byte (inside a CRLF, a field name, a UTF-8 char) changes nothing.
    for cut in 0..=STREAM.len() {
        let (a, b) = STREAM.split_at(cut);
        assert_eq!(parse_chunks(&[a, b]), expected(), "split at byte {cut}");
    }
}

#[test]
fn byte_by_byte_feeding_gives_the_same_events() {
    // Proves the parser keeps all state between calls, down to single bytes.
    let chunks: Vec<&[u8]> = STREAM.chunks(1).collect();
    assert_eq!(parse_chunks(&chunks), expected());
}

#[test]
fn random_splits_of_random_streams_match_the_unsplit_parse() {
    // Proves (fuzz, fixed seed) that arbitrary chunking of arbitrary event mixes never changes the result.
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let pieces: [&[u8]; 10] = [
        b"data: a\n",
        b"data: \xc3\xa9t\xc3\xa9\r\n",
        b": comment\n",
        b"\n",
        b"\r\n",
        b"event: error\n",
        b"data:no-space\r",
        b"id: 1\n",
        b"retry: 100\n",
        b"data: [DONE]\n\n",
    ];
    for _ in 0..2000 {
        let mut stream = Vec::new();
        for _ in 0..rng.random_range(1..20) {
            stream.extend_from_slice(pieces[rng.random_range(0..pieces.len())]);
        }
        let whole = parse_whole(&stream);
        let mut chunks = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = rng.random_range(1..=rest.len().min(7));
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
        assert_eq!(
            parse_chunks(&chunks),
            whole,
            "stream {:?}",
            String::from_utf8_lossy(&stream)
        );
    }
}

#[test]
fn lone_cr_ends_a_line_and_a_following_lf_is_not_a_second_blank_line() {
    // Proves CR, LF and CRLF are each one line end, even when CR and LF arrive apart.
    assert_eq!(parse_whole(b"data: x\r\rdata: y\n\n").len(), 2);
    let events = parse_chunks(&[b"data: x\r", b"\ndata: y\r\n\r\n"]);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data, "x\ny");
}

#[test]
fn unterminated_event_at_end_of_stream_is_not_dispatched() {
    // Proves a truncated stream never yields a half event (the client reports truncation instead).
    assert!(parse_whole(b"data: {\"choices\":[").is_empty());
    assert!(parse_whole(b"data: [DONE]\n").is_empty());
}

#[test]
fn event_without_data_is_dropped_and_resets_its_type() {
    // Proves `event: error` with no data does not leak its type onto the next event.
    let events = parse_whole(b"event: error\n\ndata: ok\n\n");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, None);
}
