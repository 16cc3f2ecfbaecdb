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
//! - [`outbound`]: the Calls API request for an outbound call (API and scheduler).
//! - [`stream_claims`]: single use of stream contexts (the first stream wins).
//! - [`PublicUrl`]: the base URL Twilio reaches; [`Limits`]: Twilio-side timings.

pub mod context;
mod limits;
pub mod media_stream;
pub mod outbound;
mod public_url;
pub mod rest;
pub mod signature;
pub mod stream_claims;
pub mod stream_messages;
pub mod twiml;

pub use limits::Limits;
pub use public_url::PublicUrl;

#[cfg(test)]
mod tests {
    #[test]
    fn a_twilio_error_naming_the_callee_masks_its_number() {
        // Proves REST errors are safe to log: the number keeps only its last four digits.
        let err = super::rest::RestError::Api(super::rest::TwilioApiError {
            code: Some(21219),
            message: "The 'To' number +14155550100 is not a valid phone number.".into(),
            more_info: None,
            status: 400,
        });
        assert!(!err.to_string().contains("4155550100"), "{err}");
    }
}
