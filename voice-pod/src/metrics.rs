//! Prometheus metrics of the voice pod.
//!
//! Names and labels are the dashboard's and the alerts' contract (see the design
//! document): change them only together with `charts/callmeback/dashboards/`.
//! Labels are low-cardinality by construction: never a call SID, a phone number or
//! a secret.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Buckets for turn latency: fine-grained where voice latency is felt (100 ms - 1.5 s).
/// 50 ms steps up to 600 ms and 100 ms steps to 1 s: real turns cluster at 0.5-0.9 s,
/// and a wide bucket there makes `histogram_quantile` report p95 near its upper bound
/// (a 0.75-1.0 bucket drew a 780 ms p95 as ~990 ms on the dashboard).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
    0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0,
];

/// Buckets for the placement delay of scheduled callbacks (the target is < 2 s).
const PLACEMENT_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Peers for `voice_socket_errors_total` and `voice_provider_reconnects_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The Twilio Media Stream and webhooks.
    Twilio,
    /// Deepgram live STT.
    Deepgram,
    /// ElevenLabs TTS.
    Elevenlabs,
    /// Cerebras LLM.
    Cerebras,
    /// PostgreSQL.
    Database,
}

impl Peer {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Peer::Twilio => "twilio",
            Peer::Deepgram => "deepgram",
            Peer::Elevenlabs => "elevenlabs",
            Peer::Cerebras => "cerebras",
            Peer::Database => "database",
        }
    }
}

/// Kinds for `voice_socket_errors_total{kind}` (the design's fixed list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketErrorKind {
    /// A frame that is not valid JSON.
    MalformedJson,
    /// Valid JSON with an event we do not know.
    UnknownEvent,
    /// A payload that does not decode (bad base64, wrong audio format).
    BadPayload,
    /// A frame above the size limit.
    Oversized,
    /// A message in the wrong place (media before `start`, a second `start`).
    OutOfOrder,
    /// A missing, forged or stale signature.
    BadSignature,
    /// Could not connect.
    Connect,
    /// A deadline passed.
    Timeout,
    /// The peer closed unexpectedly.
    Closed,
    /// The peer broke its protocol.
    Protocol,
}

impl SocketErrorKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SocketErrorKind::MalformedJson => "malformed_json",
            SocketErrorKind::UnknownEvent => "unknown_event",
            SocketErrorKind::BadPayload => "bad_payload",
            SocketErrorKind::Oversized => "oversized",
            SocketErrorKind::OutOfOrder => "out_of_order",
            SocketErrorKind::BadSignature => "bad_signature",
            SocketErrorKind::Connect => "connect",
            SocketErrorKind::Timeout => "timeout",
            SocketErrorKind::Closed => "closed",
            SocketErrorKind::Protocol => "protocol",
        }
    }
}

/// Reasons for `voice_refusals_total{reason}`: requests and connections the pod
/// turned away to protect itself or its callers (see the README's Security section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A time or duration in a request outside its allowed range.
    TimeOutOfRange,
    /// A connection beyond `CALLMEBACK_MAX_CONNECTIONS`.
    ConnectionLimit,
    /// A client that did not send its request headers in time.
    HeaderTimeout,
    /// A client that did not send its request body in time.
    BodyTimeout,
    /// A new call beyond `CALLMEBACK_MAX_CALLS`.
    CallLimit,
    /// A stream context used a second time.
    ContextReused,
    /// A `start.callSid` that is not `CA` + 32 hex digits.
    BadCallSid,
    /// A caller whose number Twilio did not vouch for: the call runs without memory.
    UnverifiedCaller,
    /// A destination `POST /v1/calls` may not dial
    /// ([`crate::dial_guard::DialRefusal::metric_label`], prefixed `dial_`).
    Dial(&'static str),
    /// A call over a dial rate limit
    /// ([`crate::dial_rate::RateRefusal::metric_label`], prefixed `rate_limited_`).
    RateLimited(&'static str),
    /// A user token asking for more than its grant (another user, another number,
    /// another caller ID, another user's call).
    TokenScope,
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TimeOutOfRange => "time_out_of_range",
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::CallLimit => "call_limit",
            Refusal::ContextReused => "context_reused",
            Refusal::BadCallSid => "bad_call_sid",
            Refusal::UnverifiedCaller => "unverified_caller",
            Refusal::Dial(reason) | Refusal::RateLimited(reason) => reason,
            Refusal::TokenScope => "token_scope",
        }
    }
}

/// Stages of `voice_turn_latency_seconds{stage}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Caller's end of speech -> first bot audio frame written to Twilio.
    Total,
    /// End of speech -> end-of-turn decision.
    Stt,
    /// LLM request -> first token.
    Llm,
    /// First text sent to TTS -> first audio.
    Tts,
}

impl Stage {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Total => "total",
            Stage::Stt => "stt",
            Stage::Llm => "llm",
            Stage::Tts => "tts",
        }
    }
}

/// Every metric the pod exports, registered in one [`Registry`].
///
/// One instance per process (tests build their own), shared through `Arc`.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `voice_turn_latency_seconds{persona,stage}`.
    pub turn_latency: HistogramVec,
    /// `voice_socket_errors_total{peer,kind}`.
    pub socket_errors: IntCounterVec,
    /// `voice_active_calls`: streams with a valid `start` that have not ended.
    pub active_calls: IntGauge,
    /// `voice_calls_total{persona,outcome}`.
    pub calls: IntCounterVec,
    /// `voice_provider_reconnects_total{peer}`.
    pub provider_reconnects: IntCounterVec,
    /// `voice_barge_ins_total{persona}`.
    pub barge_ins: IntCounterVec,
    /// `voice_frames_total{direction}` (`inbound`, `outbound`).
    pub frames: IntCounterVec,
    /// `voice_late_frames_total`: reply audio that reached Twilio later than real time needs.
    pub late_frames: IntCounter,
    /// `voice_webhook_requests_total{endpoint,result}`.
    pub webhook_requests: IntCounterVec,
    /// `voice_persona_reload_errors_total`: persona or routes files rejected on (re)load.
    pub persona_reload_errors: IntCounter,
    /// `voice_personas_loaded`.
    pub personas_loaded: IntGauge,
    /// `voice_outbound_calls_total{result}`: `POST /v1/calls` outcomes.
    pub outbound_calls: IntCounterVec,
    /// `voice_call_duration_seconds{persona}`.
    pub call_duration: HistogramVec,
    /// `voice_draining` (1 while draining).
    pub draining: IntGauge,
    /// `voice_inbound_frames_dropped_total`: caller audio frames dropped because the
    /// call handler fell behind (the Twilio reader never blocks on it).
    pub inbound_frames_dropped: IntCounter,
    /// `voice_scheduled_backlog`: scheduled callbacks not yet placed, cluster-wide
    /// (every pod reports the same count from the database; aggregate with `max`).
    pub scheduled_backlog: IntGauge,
    /// `voice_scheduled_overdue`: of those, the ones already due (should stay ~0).
    pub scheduled_overdue: IntGauge,
    /// `voice_scheduled_placement_delay_seconds`: due time -> Twilio accepted the call.
    pub placement_delay: Histogram,
    /// `voice_scheduled_placements_total`: scheduled callbacks this pod placed.
    pub scheduled_placed: IntCounter,
    /// `voice_scheduled_adopted_total`: callbacks whose earlier claim's call was found
    /// in Twilio's Calls list and recorded instead of dialling again.
    pub scheduled_adopted: IntCounter,
    /// `voice_scheduled_placement_failures_total{reason}`: see
    /// [`crate::scheduler::FailureReason`].
    pub placement_failures: IntCounterVec,
    /// `voice_refusals_total{reason}`: see [`Refusal`].
    pub refusals: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = Self {
            turn_latency: HistogramVec::new(
                HistogramOpts::new(
                    "voice_turn_latency_seconds",
                    "Turn latency by stage: total (caller end of speech to first reply audio), stt, llm, tts",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["persona", "stage"],
            )
            .expect("static metric definition"),
            socket_errors: IntCounterVec::new(
                Opts::new("voice_socket_errors_total", "Socket and protocol errors by peer and kind"),
                &["peer", "kind"],
            )
            .expect("static metric definition"),
            active_calls: IntGauge::new("voice_active_calls", "Calls in progress on this pod")
                .expect("static metric definition"),
            calls: IntCounterVec::new(
                Opts::new("voice_calls_total", "Finished calls by persona and outcome"),
                &["persona", "outcome"],
            )
            .expect("static metric definition"),
            provider_reconnects: IntCounterVec::new(
                Opts::new("voice_provider_reconnects_total", "Provider socket reconnects by peer"),
                &["peer"],
            )
            .expect("static metric definition"),
            barge_ins: IntCounterVec::new(
                Opts::new("voice_barge_ins_total", "Caller interruptions of the persona"),
                &["persona"],
            )
            .expect("static metric definition"),
            frames: IntCounterVec::new(
                Opts::new("voice_frames_total", "20 ms audio frames by direction"),
                &["direction"],
            )
            .expect("static metric definition"),
            late_frames: IntCounter::new(
                "voice_late_frames_total",
                "Reply frames sent later than real-time playback needed them",
            )
            .expect("static metric definition"),
            webhook_requests: IntCounterVec::new(
                Opts::new("voice_webhook_requests_total", "Twilio webhook requests by endpoint and result"),
                &["endpoint", "result"],
            )
            .expect("static metric definition"),
            persona_reload_errors: IntCounter::new(
                "voice_persona_reload_errors_total",
                "Persona or routes files rejected on load; the last good version stays",
            )
            .expect("static metric definition"),
            personas_loaded: IntGauge::new("voice_personas_loaded", "Personas currently loaded")
                .expect("static metric definition"),
            outbound_calls: IntCounterVec::new(
                Opts::new("voice_outbound_calls_total", "Call-me-back requests by result"),
                &["result"],
            )
            .expect("static metric definition"),
            call_duration: HistogramVec::new(
                HistogramOpts::new("voice_call_duration_seconds", "Call duration on the stream")
                    .buckets(vec![5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0]),
                &["persona"],
            )
            .expect("static metric definition"),
            draining: IntGauge::new("voice_draining", "1 while the pod drains after SIGTERM")
                .expect("static metric definition"),
            inbound_frames_dropped: IntCounter::new(
                "voice_inbound_frames_dropped_total",
                "Caller audio frames dropped because the call handler fell behind",
            )
            .expect("static metric definition"),
            scheduled_backlog: IntGauge::new(
                "voice_scheduled_backlog",
                "Scheduled callbacks not yet placed (cluster-wide, from the database)",
            )
            .expect("static metric definition"),
            scheduled_overdue: IntGauge::new(
                "voice_scheduled_overdue",
                "Scheduled callbacks past their due time and not yet claimed (cluster-wide)",
            )
            .expect("static metric definition"),
            placement_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "voice_scheduled_placement_delay_seconds",
                    "Scheduled callbacks: due time to Twilio accepting the call",
                )
                .buckets(PLACEMENT_BUCKETS.to_vec()),
            )
            .expect("static metric definition"),
            scheduled_placed: IntCounter::new(
                "voice_scheduled_placements_total",
                "Scheduled callbacks placed by this pod",
            )
            .expect("static metric definition"),
            scheduled_adopted: IntCounter::new(
                "voice_scheduled_adopted_total",
                "Scheduled callbacks found in Twilio's Calls list and adopted instead of dialled again",
            )
            .expect("static metric definition"),
            placement_failures: IntCounterVec::new(
                Opts::new(
                    "voice_scheduled_placement_failures_total",
                    "Scheduled callbacks not placed (or not yet), by reason",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            refusals: IntCounterVec::new(
                Opts::new(
                    "voice_refusals_total",
                    "Requests and connections refused to protect the pod or its callers, by reason",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.turn_latency.clone()),
            Box::new(m.socket_errors.clone()),
            Box::new(m.active_calls.clone()),
            Box::new(m.calls.clone()),
            Box::new(m.provider_reconnects.clone()),
            Box::new(m.barge_ins.clone()),
            Box::new(m.frames.clone()),
            Box::new(m.late_frames.clone()),
            Box::new(m.webhook_requests.clone()),
            Box::new(m.persona_reload_errors.clone()),
            Box::new(m.personas_loaded.clone()),
            Box::new(m.outbound_calls.clone()),
            Box::new(m.call_duration.clone()),
            Box::new(m.draining.clone()),
            Box::new(m.inbound_frames_dropped.clone()),
            Box::new(m.scheduled_backlog.clone()),
            Box::new(m.scheduled_overdue.clone()),
            Box::new(m.placement_delay.clone()),
            Box::new(m.scheduled_placed.clone()),
            Box::new(m.scheduled_adopted.clone()),
            Box::new(m.placement_failures.clone()),
            Box::new(m.refusals.clone()),
        ];
        for c in collectors {
            m.registry
                .register(c)
                .expect("metric names are unique within this registry");
        }
        m
    }

    /// Counts one socket error.
    pub fn socket_error(&self, peer: Peer, kind: SocketErrorKind) {
        self.socket_errors
            .with_label_values(&[peer.as_str(), kind.as_str()])
            .inc();
    }

    /// Counts one refusal.
    pub fn refused(&self, reason: Refusal) {
        self.refusals.with_label_values(&[reason.as_str()]).inc();
    }

    /// Records one stage of one turn.
    pub fn observe_turn(&self, persona: &str, stage: Stage, seconds: f64) {
        self.turn_latency
            .with_label_values(&[persona, stage.as_str()])
            .observe(seconds);
    }

    /// Extra metrics (for example the store's) join the same registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A histogram timer helper for code that wants a plain `Histogram`.
pub fn histogram(vec: &HistogramVec, labels: &[&str]) -> Histogram {
    vec.with_label_values(labels)
}
