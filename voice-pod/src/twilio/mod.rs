//! Everything Twilio: how it signs requests, what we answer, what it streams.
//!
//! ## Layout
//! - [`signature`]: `X-Twilio-Signature` (HMAC over the public URL and sorted form
//!   parameters), the check every webhook passes first.
//! - [`context`]: our own signed call contexts, carried through Twilio in
//!   `<Parameter>`s (stream) or query strings (answer URL, status callback).
//! - [`twiml`]: TwiML documents written with an XML writer.
//! - [`stream_messages`]: the Media Streams JSON framing, both directions.
//! - [`media_stream`]: one media stream's life: the `start` handshake, the reader
//!   and writer, and the bridge to the call handler ([`crate::session`]).
//! - [`rest`]: the REST client (create a call, hang up).

pub mod context;
pub mod media_stream;
pub mod rest;
pub mod signature;
pub mod stream_messages;
pub mod twiml;

/// A phone number for logs: all but the last four digits masked (`*******0100`).
/// Anything shorter than five characters is masked entirely.
pub fn mask_number(n: &str) -> String {
    let chars: Vec<char> = n.chars().collect();
    if chars.len() < 5 {
        return "*".repeat(chars.len());
    }
    let keep = chars.len() - 4;
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| if i < keep { '*' } else { *c })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_are_masked_but_the_last_four() {
        // Proves log masking keeps only the last four digits.
        assert_eq!(super::mask_number("+14155550100"), "********0100");
        assert_eq!(super::mask_number("123"), "***");
    }
}
