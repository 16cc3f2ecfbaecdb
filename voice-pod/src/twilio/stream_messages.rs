//! Twilio Media Streams framing: the JSON text frames of a bidirectional stream.
//!
//! Field names are exactly Twilio's (camelCase, `streamSid`, `sequenceNumber`);
//! `sequenceNumber`, `chunk` and `timestamp` arrive as strings ([`NumStr`] also
//! accepts numbers, to be lenient with look-alike peers). Outbound messages carry
//! exactly the fields Twilio accepts: an extra field is warning 31951.
//!
//! [`parse_inbound`] classifies failures the way `voice_socket_errors_total{kind}`
//! counts them: not JSON, an event we do not know, or a known event with the wrong
//! shape.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::metrics::SocketErrorKind;
use crate::session::{CallInput, CallOutput};

/// A count or time that Twilio sends as a string (`"1"`), parsed leniently.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NumStr(pub String);

impl NumStr {
    /// The value as an integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }
}

impl<'de> Deserialize<'de> for NumStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::S(s) => NumStr(s),
            Raw::N(n) => NumStr(n.to_string()),
        })
    }
}

impl Serialize for NumStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Messages Twilio sends to us.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Inbound {
    /// First message: `{"event":"connected","protocol":"Call","version":"1.0.0"}`.
    Connected {
        /// `Call`.
        #[serde(default)]
        protocol: String,
        /// `1.0.0`.
        #[serde(default)]
        version: String,
    },
    /// The stream's metadata and our `<Parameter>`s.
    Start {
        /// Message counter.
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: NumStr,
        /// `MZ...`.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// Metadata.
        start: StartMeta,
    },
    /// 20 ms of caller audio.
    Media {
        /// Message counter.
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: NumStr,
        /// `MZ...`.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The audio.
        media: MediaIn,
    },
    /// A key press.
    Dtmf {
        /// Message counter.
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: NumStr,
        /// `MZ...`.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The digit.
        dtmf: DtmfIn,
    },
    /// Our mark came back: the audio before it has played (or was cleared).
    Mark {
        /// Message counter.
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: NumStr,
        /// `MZ...`.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The label we sent.
        mark: MarkBody,
    },
    /// Last message: the call ended or the stream was stopped.
    Stop {
        /// Message counter.
        #[serde(rename = "sequenceNumber", default)]
        sequence_number: NumStr,
        /// `MZ...`.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// Account and call.
        #[serde(default)]
        stop: StopMeta,
    },
}

/// The events Twilio sends, for telling an unknown event from a malformed one.
pub const INBOUND_EVENTS: &[&str] = &["connected", "start", "media", "dtmf", "mark", "stop"];

/// `start.start`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct StartMeta {
    /// `MZ...`.
    #[serde(rename = "streamSid")]
    pub stream_sid: String,
    /// `AC...`.
    #[serde(rename = "accountSid")]
    pub account_sid: String,
    /// `CA...`.
    #[serde(rename = "callSid")]
    pub call_sid: String,
    /// `["inbound"]` on `<Connect><Stream>`.
    #[serde(default)]
    pub tracks: Vec<String>,
    /// Our `<Parameter>`s, name -> value.
    #[serde(rename = "customParameters", default)]
    pub custom_parameters: BTreeMap<String, String>,
    /// Audio format of the inbound track.
    #[serde(rename = "mediaFormat")]
    pub media_format: MediaFormat,
}

/// `start.mediaFormat`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct MediaFormat {
    /// `audio/x-mulaw`.
    pub encoding: String,
    /// 8000.
    #[serde(rename = "sampleRate")]
    pub sample_rate: u32,
    /// 1.
    pub channels: u32,
}

impl MediaFormat {
    /// True for the only format a bidirectional stream uses: mu-law, 8 kHz, mono.
    pub fn is_mulaw_8k_mono(&self) -> bool {
        self.encoding == "audio/x-mulaw" && self.sample_rate == 8000 && self.channels == 1
    }
}

/// `media.media` from Twilio.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct MediaIn {
    /// `inbound`.
    #[serde(default)]
    pub track: String,
    /// Frame counter from "1".
    #[serde(default)]
    pub chunk: NumStr,
    /// Milliseconds since the stream started.
    #[serde(default)]
    pub timestamp: NumStr,
    /// Base64 mu-law, no header.
    pub payload: String,
}

/// `dtmf.dtmf`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct DtmfIn {
    /// `inbound_track`.
    #[serde(default)]
    pub track: String,
    /// `0`-`9`, `*`, `#` (and `A`-`D` on some networks).
    pub digit: String,
}

/// `mark.mark`, both directions.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct MarkBody {
    /// Our label.
    pub name: String,
}

/// `stop.stop`.
#[derive(Clone, Debug, PartialEq, Default, Deserialize, Serialize)]
pub struct StopMeta {
    /// `AC...`.
    #[serde(rename = "accountSid", default)]
    pub account_sid: String,
    /// `CA...`.
    #[serde(rename = "callSid", default)]
    pub call_sid: String,
}

/// Messages we send to Twilio: exactly `media`, `mark` and `clear`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Outbound {
    /// `{"event":"media","streamSid":"MZ...","media":{"payload":"<base64 mu-law>"}}`.
    Media {
        /// The active stream.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The audio.
        media: MediaOut,
    },
    /// `{"event":"mark","streamSid":"MZ...","mark":{"name":"..."}}`.
    Mark {
        /// The active stream.
        #[serde(rename = "streamSid")]
        stream_sid: String,
        /// The label.
        mark: MarkBody,
    },
    /// `{"event":"clear","streamSid":"MZ..."}`: drop buffered audio (barge-in).
    Clear {
        /// The active stream.
        #[serde(rename = "streamSid")]
        stream_sid: String,
    },
}

/// `media.media` to Twilio: only the payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaOut {
    /// Base64 mu-law 8 kHz.
    pub payload: String,
}

impl Outbound {
    /// The JSON text frame.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs to a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What one message of a started stream means for the call, decoded completely
/// (base64 audio, a checked DTMF digit): the connection only routes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// Audio, a key or a returned mark, for the call handler.
    Input(CallInput),
    /// The stream is over (Twilio's last message).
    Stop,
}

/// A message of a started stream that is skipped, with the error kind it counts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unusable {
    /// `voice_socket_errors_total{kind}`.
    pub kind: SocketErrorKind,
    /// For the (rate-limited) log line.
    pub detail: String,
}

impl Unusable {
    fn new(kind: SocketErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

impl Inbound {
    /// The event name, as Twilio writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Inbound::Connected { .. } => "connected",
            Inbound::Start { .. } => "start",
            Inbound::Media { .. } => "media",
            Inbound::Dtmf { .. } => "dtmf",
            Inbound::Mark { .. } => "mark",
            Inbound::Stop { .. } => "stop",
        }
    }

    /// Decodes a message that arrived after `start` on the stream `stream_sid`.
    pub fn into_stream_event(self, stream_sid: &str) -> Result<StreamEvent, Unusable> {
        match self {
            Inbound::Media {
                media,
                stream_sid: sid,
                ..
            } => {
                if sid != stream_sid {
                    return Err(Unusable::new(
                        SocketErrorKind::Protocol,
                        "media for another stream",
                    ));
                }
                let payload = STANDARD.decode(media.payload.as_bytes()).map_err(|err| {
                    Unusable::new(
                        SocketErrorKind::BadPayload,
                        format!("media payload is not base64: {err}"),
                    )
                })?;
                if payload.is_empty() {
                    return Err(Unusable::new(
                        SocketErrorKind::BadPayload,
                        "empty media payload",
                    ));
                }
                Ok(StreamEvent::Input(CallInput::Audio {
                    payload: Bytes::from(payload),
                    timestamp_ms: media.timestamp.as_u64().unwrap_or(0),
                }))
            }
            Inbound::Dtmf { dtmf, .. } => {
                let mut chars = dtmf.digit.chars();
                match (chars.next(), chars.next()) {
                    (Some(d), None) if d.is_ascii_digit() || matches!(d, '*' | '#' | 'A'..='D') => {
                        Ok(StreamEvent::Input(CallInput::Dtmf(d)))
                    }
                    _ => Err(Unusable::new(
                        SocketErrorKind::BadPayload,
                        "dtmf digit is not one of 0-9 * # A-D",
                    )),
                }
            }
            Inbound::Mark { mark, .. } => Ok(StreamEvent::Input(CallInput::Mark(mark.name))),
            Inbound::Stop { .. } => Ok(StreamEvent::Stop),
            other @ (Inbound::Start { .. } | Inbound::Connected { .. }) => Err(Unusable::new(
                SocketErrorKind::OutOfOrder,
                format!("second {}", other.name()),
            )),
        }
    }
}

impl Outbound {
    /// The message for a handler's output on stream `stream_sid`; `None` for what is
    /// not a message (empty audio, the hangup).
    pub fn for_output(output: &CallOutput, stream_sid: &str) -> Option<Self> {
        let stream_sid = stream_sid.to_owned();
        match output {
            CallOutput::Audio(audio) if audio.is_empty() => None,
            CallOutput::Audio(audio) => Some(Outbound::Media {
                stream_sid,
                media: MediaOut {
                    payload: STANDARD.encode(audio),
                },
            }),
            CallOutput::Mark(name) => Some(Outbound::Mark {
                stream_sid,
                mark: MarkBody { name: name.clone() },
            }),
            CallOutput::Clear => Some(Outbound::Clear { stream_sid }),
            CallOutput::Hangup => None,
        }
    }
}

/// Why an inbound frame could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not JSON, or JSON without a string `event`.
    #[error("not a JSON event: {0}")]
    MalformedJson(String),
    /// An event name Twilio does not send.
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    /// A known event with missing or mistyped fields.
    #[error("{event} with the wrong shape: {detail}")]
    Shape {
        /// The event.
        event: String,
        /// serde's explanation.
        detail: String,
    },
}

impl FrameError {
    /// The `voice_socket_errors_total{kind}` this error counts as.
    pub fn kind(&self) -> SocketErrorKind {
        match self {
            FrameError::MalformedJson(_) => SocketErrorKind::MalformedJson,
            FrameError::UnknownEvent(_) => SocketErrorKind::UnknownEvent,
            FrameError::Shape { .. } => SocketErrorKind::Protocol,
        }
    }
}

/// Parses one text frame from Twilio.
pub fn parse_inbound(text: &str) -> Result<Inbound, FrameError> {
    #[derive(Deserialize)]
    struct Envelope {
        event: String,
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameError::MalformedJson(e.to_string()))?;
    let event = Envelope::deserialize(&value)
        .map_err(|e| FrameError::MalformedJson(e.to_string()))?
        .event;
    if !INBOUND_EVENTS.contains(&event.as_str()) {
        // Truncated: the name is logged, and a peer controls its length.
        return Err(FrameError::UnknownEvent(event.chars().take(40).collect()));
    }
    Inbound::deserialize(value).map_err(|e| FrameError::Shape {
        event,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(text: &str) -> Result<StreamEvent, Unusable> {
        parse_inbound(text)
            .expect("a Twilio frame")
            .into_stream_event("MZ1")
    }

    #[test]
    fn media_dtmf_marks_and_stop_decode_completely_for_the_call() {
        assert_eq!(
            started(
                r#"{"event":"media","streamSid":"MZ1","media":{"payload":"//8A","timestamp":"40"}}"#
            ),
            Ok(StreamEvent::Input(CallInput::Audio {
                payload: Bytes::from_static(&[0xff, 0xff, 0x00]),
                timestamp_ms: 40
            }))
        );
        assert_eq!(
            started(r##"{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"#"}}"##),
            Ok(StreamEvent::Input(CallInput::Dtmf('#')))
        );
        assert_eq!(
            started(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"c3"}}"#),
            Ok(StreamEvent::Input(CallInput::Mark("c3".into())))
        );
        assert_eq!(
            started(r#"{"event":"stop","streamSid":"MZ1","stop":{}}"#),
            Ok(StreamEvent::Stop)
        );
    }

    #[test]
    fn unusable_messages_say_which_error_they_count_as() {
        let kind = |text: &str| started(text).map_err(|u| u.kind);
        assert_eq!(
            kind(r#"{"event":"media","streamSid":"MZ2","media":{"payload":"//8A"}}"#),
            Err(SocketErrorKind::Protocol),
            "another stream's media"
        );
        assert_eq!(
            kind(r#"{"event":"media","streamSid":"MZ1","media":{"payload":"not base64!"}}"#),
            Err(SocketErrorKind::BadPayload)
        );
        assert_eq!(
            kind(r#"{"event":"media","streamSid":"MZ1","media":{"payload":""}}"#),
            Err(SocketErrorKind::BadPayload)
        );
        for digit in ["", "12", "E", "x"] {
            let text =
                format!(r#"{{"event":"dtmf","streamSid":"MZ1","dtmf":{{"digit":"{digit}"}}}}"#);
            assert_eq!(kind(&text), Err(SocketErrorKind::BadPayload), "{digit:?}");
        }
        assert_eq!(
            kind(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#),
            Err(SocketErrorKind::OutOfOrder)
        );
    }

    #[test]
    fn handler_outputs_become_twilio_messages_and_the_hangup_none() {
        let media = Outbound::for_output(&CallOutput::Audio(Bytes::from_static(&[0xff; 3])), "MZ1");
        assert_eq!(
            media.map(|m| m.to_json()).as_deref(),
            Some(r#"{"event":"media","streamSid":"MZ1","media":{"payload":"////"}}"#)
        );
        assert_eq!(
            Outbound::for_output(&CallOutput::Audio(Bytes::new()), "MZ1"),
            None
        );
        assert_eq!(
            Outbound::for_output(&CallOutput::Clear, "MZ1"),
            Some(Outbound::Clear {
                stream_sid: "MZ1".into()
            })
        );
        assert_eq!(Outbound::for_output(&CallOutput::Hangup, "MZ1"), None);
    }

    proptest::proptest! {
        // Any text, and any values in each event's shape, parse or fail with a
        // FrameError: never a panic (the reader counts and skips the frame).
        #[test]
        fn arbitrary_twilio_frames_never_panic(
            text in "(?s).{0,300}",
            event in proptest::sample::select(vec!["connected", "start", "media", "dtmf", "mark", "stop", "other"]),
            value in "(?s).{0,60}",
            number in proptest::prelude::any::<i64>(),
        ) {
            let _ = parse_inbound(&text);
            for shaped in [
                format!("{{\"event\":{event:?},\"sequenceNumber\":{value:?},\"streamSid\":{value:?}}}"),
                format!("{{\"event\":{event:?},\"start\":{{\"callSid\":{value:?},\"customParameters\":{{{value:?}:{value:?}}},\"mediaFormat\":{{\"encoding\":{value:?},\"sampleRate\":{number},\"channels\":{number}}}}},\"streamSid\":\"MZ1\"}}"),
                format!("{{\"event\":{event:?},\"media\":{{\"payload\":{value:?},\"timestamp\":{number},\"chunk\":{value:?}}},\"streamSid\":\"MZ1\"}}"),
                format!("{{\"event\":{event:?},\"dtmf\":{{\"digit\":{value:?}}},\"mark\":{{\"name\":{value:?}}}}}"),
            ] {
                if let Ok(m) = parse_inbound(&shaped) {
                    let _ = m.into_stream_event("MZ1");
                }
                if let Ok(Inbound::Media { media, .. }) = parse_inbound(&shaped) {
                    let _ = media.timestamp.as_u64();
                }
                if let Ok(Inbound::Start { start, .. }) = parse_inbound(&shaped) {
                    let _ = start.media_format.is_mulaw_8k_mono();
                }
            }
        }
    }

    #[test]
    fn parses_every_event_as_twilio_sends_it() {
        // Proves each documented inbound message (protocols.md 1.2) parses with string counters.
        let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
        assert!(matches!(
            parse_inbound(connected).unwrap(),
            Inbound::Connected { .. }
        ));

        let start = r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1","start":{"streamSid":"MZ1","accountSid":"AC1","callSid":"CA1","tracks":["inbound"],"customParameters":{"persona":"p","sig":"x"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;
        match parse_inbound(start).unwrap() {
            Inbound::Start {
                start,
                sequence_number,
                ..
            } => {
                assert_eq!(sequence_number.as_u64(), Some(1));
                assert_eq!(start.call_sid, "CA1");
                assert_eq!(start.custom_parameters["persona"], "p");
                assert!(start.media_format.is_mulaw_8k_mono());
            }
            other => panic!("{other:?}"),
        }

        let media = r#"{"event":"media","sequenceNumber":"3","streamSid":"MZ1","media":{"track":"inbound","chunk":"2","timestamp":"5","payload":"//8="}}"#;
        match parse_inbound(media).unwrap() {
            Inbound::Media { media, .. } => {
                assert_eq!(media.timestamp.as_u64(), Some(5));
                assert_eq!(media.chunk.as_u64(), Some(2));
            }
            other => panic!("{other:?}"),
        }

        let dtmf = r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#;
        assert!(
            matches!(parse_inbound(dtmf).unwrap(), Inbound::Dtmf { dtmf, .. } if dtmf.digit == "1")
        );

        let mark =
            r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"m1"}}"#;
        assert!(
            matches!(parse_inbound(mark).unwrap(), Inbound::Mark { mark, .. } if mark.name == "m1")
        );

        let stop = r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#;
        assert!(matches!(parse_inbound(stop).unwrap(), Inbound::Stop { .. }));
    }

    #[test]
    fn classifies_bad_frames() {
        // Proves bad frames map to the design's error kinds.
        assert_eq!(
            parse_inbound("{nope").unwrap_err().kind(),
            SocketErrorKind::MalformedJson
        );
        assert_eq!(
            parse_inbound(r#"{"x":1}"#).unwrap_err().kind(),
            SocketErrorKind::MalformedJson
        );
        assert_eq!(
            parse_inbound(r#"{"event":"party"}"#).unwrap_err().kind(),
            SocketErrorKind::UnknownEvent
        );
        assert_eq!(
            parse_inbound(r#"{"event":"media","streamSid":"MZ1"}"#)
                .unwrap_err()
                .kind(),
            SocketErrorKind::Protocol
        );
    }

    #[test]
    fn outbound_frames_have_exactly_twilios_fields() {
        // Proves outbound JSON matches protocols.md 1.3 byte for byte.
        let m = Outbound::Media {
            stream_sid: "MZ1".into(),
            media: MediaOut {
                payload: "AA==".into(),
            },
        };
        assert_eq!(
            m.to_json(),
            r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AA=="}}"#
        );
        let k = Outbound::Mark {
            stream_sid: "MZ1".into(),
            mark: MarkBody { name: "n".into() },
        };
        assert_eq!(
            k.to_json(),
            r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"n"}}"#
        );
        let c = Outbound::Clear {
            stream_sid: "MZ1".into(),
        };
        assert_eq!(c.to_json(), r#"{"event":"clear","streamSid":"MZ1"}"#);
    }
}
