//! Timings of the Twilio side of a call that are constants in production and shorter
//! in tests (stream start, ringing, context validity, REST requests, handler grace).

use std::time::Duration;

/// Limits and timings that are constants in production and shorter in tests.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A media stream must deliver a valid `start` within this time (design: 5 s).
    pub stream_start_timeout: Duration,
    /// Periodic persona rescan, in addition to file notifications (ConfigMap
    /// updates swap a `..data` symlink that watchers can miss).
    pub persona_rescan_interval: Duration,
    /// How long Twilio lets an outbound call ring (`Timeout` on the Calls API).
    pub ring_timeout: Duration,
    /// Validity of the signed call context in `<Parameter>`s after the webhook
    /// answered (Twilio opens the stream within a second or two; the context is
    /// single-use and bound to the CallSid besides).
    pub inbound_context_ttl: Duration,
    /// Extra validity of an outbound call's context beyond the ring timeout.
    pub outbound_context_grace: Duration,
    /// Timeout of each Twilio REST request.
    pub rest_timeout: Duration,
    /// After the stream stops, how long the call handler may take to finish
    /// before it is cancelled.
    pub handler_finish_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            stream_start_timeout: Duration::from_secs(5),
            persona_rescan_interval: Duration::from_secs(2),
            ring_timeout: Duration::from_secs(30),
            inbound_context_ttl: Duration::from_secs(10),
            outbound_context_grace: Duration::from_secs(600),
            rest_timeout: Duration::from_secs(10),
            handler_finish_grace: Duration::from_secs(5),
        }
    }
}
