//! A simulated Twilio, for driving a voice pod over real sockets.
//!
//! - [`TwilioSim`]: Twilio's HTTP side. Signs webhooks exactly as Twilio does
//!   (`X-Twilio-Signature` over the public URL and sorted form fields), posts the
//!   answer webhook and status callbacks, and parses the TwiML it gets back with a
//!   real XML parser ([`parse_twiml`]).
//! - [`SimStream`]: Twilio's Media Streams client over a real WebSocket. Sends
//!   `connected`, `start` (with the TwiML's `<Parameter>`s as `customParameters`),
//!   `media` frames (paced at 20 ms or as fast as asked), `dtmf`, `stop`, and
//!   arbitrary bad frames. Receives `media`, `mark` and `clear`, checking each has
//!   exactly Twilio's fields (anything else is a [`SimStream::violations`] entry, as
//!   Twilio would raise warning 31951). It models playback: a mark is echoed when the
//!   audio queued before it has "played" (8000 bytes per second), and `clear` echoes
//!   every pending mark at once.
//! - [`TestPod`]: a voice pod in this process on 127.0.0.1:0 with a test account,
//!   a persona directory and optional call handler, with [`TestPod::metric`] to read
//!   counters from its real `/metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures::{SinkExt, StreamExt};
use quick_xml::events::Event;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use voice_pod::config::{Config, ServeArgs};
use voice_pod::drain::DrainOutcome;
use voice_pod::metrics::Metrics;
use voice_pod::pod::{Pod, ServeError};
use voice_pod::session::CallHandler;
use voice_pod::store::PgStore;
use voice_pod::twilio::Limits;
use voice_pod::twilio::signature::{Algorithm, compute_signature};

/// Account SID of the test account.
pub const TEST_ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";
/// Auth token of the test account (signs webhooks, authenticates REST).
pub const TEST_AUTH_TOKEN: &str = "test-auth-token-0123456789abcdef";
/// Bearer token of the test pod's `/v1` API.
pub const TEST_API_TOKEN: &str = "test-api-token-0123456789abcdef";
/// Default caller ID of the test pod.
pub const TEST_FROM_NUMBER: &str = "+15005550006";

/// `X-Twilio-Signature` for a POST of `params` to `url`.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    compute_signature(auth_token.as_bytes(), url, params, Algorithm::HmacSha1)
}

fn owned(params: &[(&str, &str)]) -> Vec<(String, String)> {
    params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A `CA...` sid for a simulated call.
pub fn new_call_sid() -> String {
    format!("CA{}", uuid::Uuid::new_v4().simple())
}

/// `<Connect><Stream>` as parsed from TwiML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamTwiml {
    /// The `url` attribute.
    pub url: String,
    /// The `<Parameter>`s, in document order.
    pub params: Vec<(String, String)>,
}

impl StreamTwiml {
    /// The parameters as `start.customParameters` carries them.
    pub fn custom_parameters(&self) -> BTreeMap<String, String> {
        self.params.iter().cloned().collect()
    }
    /// One parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A TwiML verb we understand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `<Connect><Stream>`.
    ConnectStream(StreamTwiml),
    /// `<Reject/>`.
    Reject,
    /// `<Say>text</Say>`.
    Say(String),
    /// `<Hangup/>`.
    Hangup,
    /// Anything else (element name).
    Other(String),
}

/// Parses TwiML with a real XML parser (fails on anything Twilio's parser would
/// reject as error 12100: malformed XML, or a root other than `<Response>`).
pub fn parse_twiml(xml: &str) -> anyhow::Result<Vec<Verb>> {
    if xml.starts_with(char::is_whitespace) {
        bail!("whitespace before the XML declaration (Twilio error 12100)");
    }
    let mut reader = quick_xml::Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<String> = Vec::new();
    let mut verbs = Vec::new();
    let mut current_stream: Option<StreamTwiml> = None;
    let mut say_text: Option<String> = None;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| anyhow!("TwiML is not well-formed XML: {e}"))?;
        let (e, empty) = match ev {
            Event::Start(e) => (e, false),
            Event::Empty(e) => (e, true),
            Event::End(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                stack.pop();
                match name.as_str() {
                    "Stream" => {
                        if let Some(s) = current_stream.take() {
                            verbs.push(Verb::ConnectStream(s));
                        }
                    }
                    "Say" => verbs.push(Verb::Say(say_text.take().unwrap_or_default())),
                    _ => {}
                }
                continue;
            }
            Event::Text(t) => {
                if let Some(s) = say_text.as_mut() {
                    s.push_str(&t.decode()?);
                }
                continue;
            }
            Event::GeneralRef(r) => {
                if let Some(s) = say_text.as_mut() {
                    let name = r.decode()?;
                    let entity = format!("&{name};");
                    s.push_str(&quick_xml::escape::unescape(&entity)?);
                }
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let mut attrs = BTreeMap::new();
        for a in e.attributes() {
            let a = a?;
            attrs.insert(
                String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                a.unescape_value()?.into_owned(),
            );
        }
        if stack.is_empty() && name != "Response" {
            bail!("root element is <{name}>, not <Response> (Twilio error 12102)");
        }
        match name.as_str() {
            "Response" | "Connect" => {}
            "Stream" => {
                let s = StreamTwiml {
                    url: attrs.get("url").cloned().unwrap_or_default(),
                    params: Vec::new(),
                };
                if empty {
                    verbs.push(Verb::ConnectStream(s));
                } else {
                    current_stream = Some(s);
                }
            }
            "Parameter" => {
                let s = current_stream
                    .as_mut()
                    .ok_or_else(|| anyhow!("<Parameter> outside <Stream>"))?;
                s.params.push((
                    attrs.get("name").cloned().unwrap_or_default(),
                    attrs.get("value").cloned().unwrap_or_default(),
                ));
            }
            "Reject" => verbs.push(Verb::Reject),
            "Hangup" => verbs.push(Verb::Hangup),
            "Say" => {
                if empty {
                    verbs.push(Verb::Say(String::new()));
                } else {
                    say_text = Some(String::new());
                }
            }
            other => verbs.push(Verb::Other(other.to_string())),
        }
        if !empty {
            stack.push(name);
        }
    }
    if !stack.is_empty() {
        bail!("unclosed elements: {stack:?}");
    }
    Ok(verbs)
}

/// Twilio's HTTP side: signed webhooks to one pod.
#[derive(Clone)]
pub struct TwilioSim {
    /// Where the pod listens (`http://127.0.0.1:port`).
    pub app_url: String,
    /// The pod's `CALLMEBACK_PUBLIC_URL` (what Twilio signs).
    pub public_url: String,
    /// The account's auth token.
    pub auth_token: String,
    /// The account SID.
    pub account_sid: String,
    http: reqwest::Client,
}

/// A webhook answer.
#[derive(Debug)]
pub struct WebhookAnswer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
}

impl WebhookAnswer {
    /// The TwiML verbs (fails when the body is not valid TwiML).
    pub fn verbs(&self) -> anyhow::Result<Vec<Verb>> {
        parse_twiml(&self.body)
    }
    /// The `<Connect><Stream>`, if the answer is one.
    pub fn stream(&self) -> anyhow::Result<StreamTwiml> {
        self.verbs()?
            .into_iter()
            .find_map(|v| match v {
                Verb::ConnectStream(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("no <Connect><Stream> in {}", self.body))
    }
}

impl TwilioSim {
    /// A simulator for a pod reachable at `app_url` whose public URL is `public_url`.
    pub fn new(app_url: &str, public_url: &str, account_sid: &str, auth_token: &str) -> Self {
        Self {
            app_url: app_url.trim_end_matches('/').into(),
            public_url: public_url.trim_end_matches('/').into(),
            auth_token: auth_token.into(),
            account_sid: account_sid.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("reqwest client"),
        }
    }

    /// The signature Twilio would send for `path_and_query` and `params`.
    pub fn signature(&self, path_and_query: &str, params: &[(String, String)]) -> String {
        sign(
            &self.auth_token,
            &format!("{}{}", self.public_url, path_and_query),
            params,
        )
    }

    /// POSTs a form with the given signature header (`None`: unsigned).
    pub async fn post_form(
        &self,
        path_and_query: &str,
        params: &[(String, String)],
        signature: Option<&str>,
    ) -> anyhow::Result<WebhookAnswer> {
        let mut req = self
            .http
            .post(format!("{}{}", self.app_url, path_and_query))
            .form(params);
        if let Some(sig) = signature {
            req = req.header("X-Twilio-Signature", sig);
        }
        let resp = req.send().await.context("webhook POST")?;
        Ok(WebhookAnswer {
            status: resp.status().as_u16(),
            body: resp.text().await?,
        })
    }

    /// POSTs a correctly signed webhook.
    pub async fn post_signed(
        &self,
        path_and_query: &str,
        params: &[(String, String)],
    ) -> anyhow::Result<WebhookAnswer> {
        let sig = self.signature(path_and_query, params);
        self.post_form(path_and_query, params, Some(&sig)).await
    }

    /// The form Twilio posts to the voice URL for an inbound call from a number it
    /// verified (STIR/SHAKEN full attestation, `StirVerstat=TN-Validation-Passed-A`).
    pub fn inbound_call_params(
        &self,
        call_sid: &str,
        from: &str,
        to: &str,
    ) -> Vec<(String, String)> {
        owned(&[
            ("AccountSid", &self.account_sid),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", call_sid),
            ("CallStatus", "ringing"),
            ("Called", to),
            ("Caller", from),
            ("Direction", "inbound"),
            ("From", from),
            ("FromCountry", "US"),
            ("StirVerstat", "TN-Validation-Passed-A"),
            ("To", to),
            ("ToCountry", "US"),
        ])
    }

    /// An inbound call rings: the signed answer webhook.
    pub async fn inbound_call(
        &self,
        call_sid: &str,
        from: &str,
        to: &str,
    ) -> anyhow::Result<WebhookAnswer> {
        let params = self.inbound_call_params(call_sid, from, to);
        self.post_signed("/twilio/voice", &params).await
    }

    /// An outbound call is answered and Twilio fetches TwiML from `answer_url` (the
    /// `Url` of a created call).
    pub async fn answer_outbound(
        &self,
        answer_url: &str,
        call_sid: &str,
        from: &str,
        to: &str,
    ) -> anyhow::Result<WebhookAnswer> {
        let path = answer_url
            .strip_prefix(&self.public_url)
            .ok_or_else(|| anyhow!("answer URL {answer_url} is not under {}", self.public_url))?;
        let params = owned(&[
            ("AccountSid", &self.account_sid),
            ("CallSid", call_sid),
            ("CallStatus", "in-progress"),
            ("Direction", "outbound-api"),
            ("From", from),
            ("To", to),
        ]);
        self.post_signed(path, &params).await
    }

    /// A status callback to `callback_url` (absolute, under the public URL).
    pub async fn status_callback(
        &self,
        callback_url: &str,
        call_sid: &str,
        status: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<WebhookAnswer> {
        let path = callback_url
            .strip_prefix(&self.public_url)
            .ok_or_else(|| anyhow!("callback {callback_url} is not under {}", self.public_url))?;
        let mut params = owned(&[
            ("AccountSid", &self.account_sid),
            ("CallSid", call_sid),
            ("CallStatus", status),
            ("CallbackSource", "call-progress-events"),
        ]);
        params.extend(owned(extra));
        self.post_signed(path, &params).await
    }

    /// Maps the TwiML's `wss://public/...` stream URL onto the pod's local address.
    pub fn local_stream_url(&self, twiml_url: &str) -> String {
        let public_ws = self
            .public_url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        let local_ws = self.app_url.replacen("http://", "ws://", 1);
        twiml_url.replacen(&public_ws, &local_ws, 1)
    }

    /// Opens the media stream the TwiML asks for, with a signed upgrade like Twilio's.
    pub async fn open_stream(&self, twiml: &StreamTwiml) -> anyhow::Result<SimStream> {
        let sig = sign(&self.auth_token, &twiml.url, &[]);
        SimStream::connect(&self.local_stream_url(&twiml.url), Some(&sig)).await
    }

    /// Inbound call end to end: webhook, stream, `connected` + `start`.
    pub async fn start_inbound_call(
        &self,
        from: &str,
        to: &str,
    ) -> anyhow::Result<(SimStream, StreamTwiml)> {
        let call_sid = new_call_sid();
        let answer = self.inbound_call(&call_sid, from, to).await?;
        if answer.status != 200 {
            bail!("webhook answered {}: {}", answer.status, answer.body);
        }
        let twiml = answer.stream()?;
        let mut stream = self.open_stream(&twiml).await?;
        stream.send_connected().await?;
        stream
            .send_start(&call_sid, &self.account_sid, &twiml.custom_parameters())
            .await?;
        Ok((stream, twiml))
    }
}

/// How fast [`SimStream::send_audio`] sends frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// One 20 ms frame every 20 ms, like a phone.
    RealTime,
    /// As fast as the socket takes them.
    Burst,
}

/// What the pod sent on the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// Decoded mu-law audio.
    Media(Vec<u8>),
    /// A mark (as sent; the simulator echoes it when played).
    Mark(String),
    /// Clear.
    Clear,
    /// The pod closed the socket (code and reason of its close frame, if any).
    Closed {
        /// Close code.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
}

#[derive(Default)]
struct Observed {
    violations: Vec<String>,
    audio_bytes: u64,
    echoed_marks: Vec<String>,
}

/// A simulated Twilio media stream over a real WebSocket.
pub struct SimStream {
    out: mpsc::Sender<Message>,
    events: mpsc::UnboundedReceiver<SimEvent>,
    observed: Arc<Mutex<Observed>>,
    seq: Arc<AtomicU64>,
    chunk: u64,
    /// `MZ...` of this stream.
    pub stream_sid: String,
    call_sid: String,
    account_sid: String,
}

fn seq_next(seq: &AtomicU64) -> String {
    (seq.fetch_add(1, Ordering::Relaxed) + 1).to_string()
}

/// Checks an outbound frame has exactly Twilio's fields; returns the parsed event.
fn check_outbound(text: &str, stream_sid: &str) -> Result<SimEvent, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not an object")?;
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let event = obj.get("event").and_then(Value::as_str).ok_or("no event")?;
    if obj.get("streamSid").and_then(Value::as_str) != Some(stream_sid) {
        return Err(format!(
            "{event} with streamSid {:?}, not the active stream",
            obj.get("streamSid")
        ));
    }
    let exact = |want: &[&str]| -> Result<(), String> {
        let mut k = keys.clone();
        k.sort_unstable();
        let mut w = want.to_vec();
        w.sort_unstable();
        if k == w {
            Ok(())
        } else {
            Err(format!(
                "{event} has fields {k:?}, Twilio accepts exactly {w:?}"
            ))
        }
    };
    match event {
        "media" => {
            exact(&["event", "streamSid", "media"])?;
            let media = obj["media"].as_object().ok_or("media is not an object")?;
            if media.keys().ne(["payload"].iter()) {
                return Err(format!(
                    "media has fields {:?}, Twilio accepts exactly [\"payload\"]",
                    media.keys().collect::<Vec<_>>()
                ));
            }
            let payload = media["payload"].as_str().ok_or("payload is not a string")?;
            let audio = STANDARD
                .decode(payload)
                .map_err(|e| format!("payload is not base64: {e}"))?;
            Ok(SimEvent::Media(audio))
        }
        "mark" => {
            exact(&["event", "streamSid", "mark"])?;
            let name = obj["mark"]
                .get("name")
                .and_then(Value::as_str)
                .ok_or("mark without name")?;
            Ok(SimEvent::Mark(name.to_string()))
        }
        "clear" => {
            exact(&["event", "streamSid"])?;
            Ok(SimEvent::Clear)
        }
        other => Err(format!("event {other:?} is not accepted by Twilio (31951)")),
    }
}

impl SimStream {
    /// Connects to `ws_url`, with an `X-Twilio-Signature` on the upgrade if given.
    pub async fn connect(ws_url: &str, signature: Option<&str>) -> anyhow::Result<Self> {
        let mut req = ws_url.into_client_request()?;
        if let Some(sig) = signature {
            req.headers_mut().insert("X-Twilio-Signature", sig.parse()?);
        }
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .context("websocket connect timed out")??;
        let (mut sink, mut source) = ws.split();
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(256);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let observed = Arc::new(Mutex::new(Observed::default()));
        let seq = Arc::new(AtomicU64::new(0));
        let stream_sid = format!("MZ{}", uuid::Uuid::new_v4().simple());

        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let reader_obs = Arc::clone(&observed);
        let reader_seq = Arc::clone(&seq);
        let echo_tx = out_tx.clone();
        let sid = stream_sid.clone();
        tokio::spawn(async move {
            // Playback model: when queued audio finishes, and marks waiting on it.
            let mut play_until = Instant::now();
            let mut pending: VecDeque<(Instant, String)> = VecDeque::new();
            let echo = |name: String, obs: &Mutex<Observed>| {
                let msg = json!({
                    "event": "mark",
                    "sequenceNumber": seq_next(&reader_seq),
                    "streamSid": sid,
                    "mark": { "name": name },
                });
                obs.lock().unwrap().echoed_marks.push(name);
                let _ = echo_tx.try_send(Message::Text(msg.to_string().into()));
            };
            loop {
                let due = pending.front().map(|(t, _)| *t);
                let msg = tokio::select! {
                    m = source.next() => m,
                    _ = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                        while pending.front().is_some_and(|(t, _)| *t <= Instant::now()) {
                            let (_, name) = pending.pop_front().unwrap();
                            echo(name, &reader_obs);
                        }
                        continue;
                    }
                };
                match msg {
                    Some(Ok(Message::Text(t))) => match check_outbound(t.as_str(), &sid) {
                        Ok(ev) => {
                            match &ev {
                                SimEvent::Media(a) => {
                                    let now = Instant::now();
                                    play_until = play_until.max(now)
                                        + Duration::from_micros(a.len() as u64 * 125);
                                    reader_obs.lock().unwrap().audio_bytes += a.len() as u64;
                                }
                                SimEvent::Mark(name) => pending
                                    .push_back((play_until.max(Instant::now()), name.clone())),
                                SimEvent::Clear => {
                                    play_until = Instant::now();
                                    while let Some((_, name)) = pending.pop_front() {
                                        echo(name, &reader_obs);
                                    }
                                }
                                SimEvent::Closed { .. } => {}
                            }
                            let _ = ev_tx.send(ev);
                        }
                        Err(v) => reader_obs.lock().unwrap().violations.push(v),
                    },
                    Some(Ok(Message::Binary(b))) => reader_obs.lock().unwrap().violations.push(
                        format!("{} byte binary frame (Twilio warning 31950)", b.len()),
                    ),
                    Some(Ok(Message::Close(frame))) => {
                        let _ = ev_tx.send(SimEvent::Closed {
                            code: frame.as_ref().map(|f| u16::from(f.code)),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        });
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        let _ = ev_tx.send(SimEvent::Closed {
                            code: None,
                            reason: String::new(),
                        });
                        break;
                    }
                }
            }
        });

        Ok(Self {
            out: out_tx,
            events: ev_rx,
            observed,
            seq,
            chunk: 0,
            stream_sid,
            call_sid: String::new(),
            account_sid: String::new(),
        })
    }

    /// Sends a raw text frame.
    pub async fn send_text(&self, text: impl Into<String>) -> anyhow::Result<()> {
        self.out
            .send(Message::Text(text.into().into()))
            .await
            .map_err(|_| anyhow!("stream closed"))
    }

    /// Sends a binary frame (Twilio never does).
    pub async fn send_binary(&self, data: Vec<u8>) -> anyhow::Result<()> {
        self.out
            .send(Message::Binary(data.into()))
            .await
            .map_err(|_| anyhow!("stream closed"))
    }

    /// `connected`.
    pub async fn send_connected(&self) -> anyhow::Result<()> {
        self.send_text(
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
        )
        .await
    }

    /// `start` for `call_sid` with `custom_parameters`.
    pub async fn send_start(
        &mut self,
        call_sid: &str,
        account_sid: &str,
        custom_parameters: &BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        self.call_sid = call_sid.into();
        self.account_sid = account_sid.into();
        let msg = json!({
            "event": "start",
            "sequenceNumber": seq_next(&self.seq),
            "streamSid": self.stream_sid,
            "start": {
                "streamSid": self.stream_sid,
                "accountSid": account_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": custom_parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        });
        self.send_text(msg.to_string()).await
    }

    /// One `media` frame with `payload` (mu-law bytes).
    pub async fn send_media(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        self.chunk += 1;
        let msg = json!({
            "event": "media",
            "sequenceNumber": seq_next(&self.seq),
            "streamSid": self.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": self.chunk.to_string(),
                "timestamp": ((self.chunk - 1) * 20).to_string(),
                "payload": STANDARD.encode(payload),
            },
        });
        self.send_text(msg.to_string()).await
    }

    /// `audio` as 160-byte (20 ms) frames at `pace`.
    pub async fn send_audio(&mut self, audio: &[u8], pace: Pace) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for frame in audio.chunks(160) {
            if pace == Pace::RealTime {
                tick.tick().await;
            }
            self.send_media(frame).await?;
        }
        Ok(())
    }

    /// `n` frames of mu-law silence (0xFF) at `pace`.
    pub async fn send_silence(&mut self, frames: usize, pace: Pace) -> anyhow::Result<()> {
        self.send_audio(&vec![0xFF; frames * 160], pace).await
    }

    /// A key press.
    pub async fn send_dtmf(&mut self, digit: &str) -> anyhow::Result<()> {
        let msg = json!({
            "event": "dtmf",
            "streamSid": self.stream_sid,
            "sequenceNumber": seq_next(&self.seq),
            "dtmf": {"track": "inbound_track", "digit": digit},
        });
        self.send_text(msg.to_string()).await
    }

    /// A mark event (normally the simulator echoes marks by itself).
    pub async fn send_mark(&mut self, name: &str) -> anyhow::Result<()> {
        let msg = json!({
            "event": "mark",
            "sequenceNumber": seq_next(&self.seq),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        });
        self.send_text(msg.to_string()).await
    }

    /// `stop`: the caller hung up.
    pub async fn send_stop(&mut self) -> anyhow::Result<()> {
        let msg = json!({
            "event": "stop",
            "sequenceNumber": seq_next(&self.seq),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
        });
        self.send_text(msg.to_string()).await
    }

    /// Closes the socket from Twilio's side.
    pub async fn close(&self) {
        let _ = self.out.send(Message::Close(None)).await;
    }

    /// The next event from the pod, or `None` after `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<SimEvent> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the pod to close the stream; returns its close code and reason.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Option<(Option<u16>, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await? {
                SimEvent::Closed { code, reason } => return Some((code, reason)),
                _ => continue,
            }
        }
    }

    /// Outbound frames that broke Twilio's rules.
    pub fn violations(&self) -> Vec<String> {
        self.observed.lock().unwrap().violations.clone()
    }

    /// Total audio bytes received from the pod.
    pub fn audio_bytes_received(&self) -> u64 {
        self.observed.lock().unwrap().audio_bytes
    }

    /// Marks echoed back so far.
    pub fn echoed_marks(&self) -> Vec<String> {
        self.observed.lock().unwrap().echoed_marks.clone()
    }
}

/// A persona file body (a bare `PersonaSpec`, the operator's format).
pub fn persona_yaml(display_name: &str, greeting: &str) -> String {
    format!(
        "displayName: {display_name:?}\nsystemPrompt: \"You are {display_name}.\"\ngreeting: {greeting:?}\nvoice:\n  voiceId: testvoice1\nmaxCallDurationSeconds: 60\nidleTimeoutSeconds: 10\n"
    )
}

/// How to build a [`TestPod`].
pub struct TestPodOptions {
    /// Persona directory (`None`: a fresh temp dir with persona `ada`).
    pub persona_dir: Option<PathBuf>,
    /// Routes file (`None`: `<persona_dir>/../routes.yaml`, usually absent).
    pub routes_file: Option<PathBuf>,
    /// Bearer token for `/v1` (`None`: API disabled).
    pub api_token: Option<String>,
    /// Twilio REST base (an emulator's `base_url`).
    pub twilio_api_url: Option<String>,
    /// Default caller ID.
    pub from_number: Option<String>,
    /// Call handler (`None`: the default recording handler).
    pub handler: Option<Arc<dyn CallHandler>>,
    /// Limits (shortened for tests by default: 1 s start timeout, 200 ms rescans).
    pub limits: Limits,
    /// PostgreSQL (call records, stream claims, the scheduler); `None`: no persistence.
    pub store: Option<PgStore>,
}

impl Default for TestPodOptions {
    fn default() -> Self {
        Self {
            persona_dir: None,
            routes_file: None,
            api_token: Some(TEST_API_TOKEN.into()),
            twilio_api_url: None,
            from_number: Some(TEST_FROM_NUMBER.into()),
            handler: None,
            limits: Limits {
                stream_start_timeout: Duration::from_secs(1),
                persona_rescan_interval: Duration::from_millis(200),
                handler_finish_grace: Duration::from_secs(2),
                ..Limits::default()
            },
            store: None,
        }
    }
}

/// A voice pod running in this process on 127.0.0.1:0.
pub struct TestPod {
    /// `http://127.0.0.1:port` of the app.
    pub app_url: String,
    /// `http://127.0.0.1:port` of metrics and probes.
    pub metrics_url: String,
    /// The pod's metrics.
    pub metrics: Arc<Metrics>,
    /// Persona directory in use.
    pub persona_dir: PathBuf,
    /// Routes file in use.
    pub routes_file: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<DrainOutcome, ServeError>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestPod {
    /// Starts a pod; its public URL is its own app address (so TwiML stream URLs
    /// are directly connectable).
    pub async fn start(opts: TestPodOptions) -> anyhow::Result<Self> {
        let (persona_dir, tmp) = match opts.persona_dir {
            Some(d) => (d, None),
            None => {
                let tmp = tempfile::tempdir()?;
                let dir = tmp.path().join("personas");
                std::fs::create_dir_all(&dir)?;
                std::fs::write(
                    dir.join("ada.yaml"),
                    persona_yaml("Ada", "Hello, this is Ada!"),
                )?;
                (dir, Some(tmp))
            }
        };
        let routes_file = opts.routes_file.unwrap_or_else(|| {
            persona_dir.parent().map_or_else(
                || PathBuf::from("/nonexistent/routes.yaml"),
                |p| p.join("routes.yaml"),
            )
        });
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let app_url = format!("http://{}", app.local_addr()?);
        let metrics_url = format!("http://{}", metrics_listener.local_addr()?);
        let args = ServeArgs {
            listen: "127.0.0.1:0".into(),
            metrics_listen: "127.0.0.1:0".into(),
            public_url: Some(app_url.clone()),
            persona_dir: persona_dir.clone(),
            routes_file: routes_file.clone(),
            api_token: opts.api_token,
            drain_timeout: None,
            twilio_account_sid: Some(TEST_ACCOUNT_SID.into()),
            twilio_auth_token: Some(TEST_AUTH_TOKEN.into()),
            twilio_api_url: opts
                .twilio_api_url
                .unwrap_or_else(|| "http://127.0.0.1:9".into()),
            twilio_from_number: opts.from_number,
            database_url: None,
            ..Default::default()
        };
        let mut config = Config::from_args(args)?;
        config.limits = opts.limits;
        let metrics = Arc::new(Metrics::new());
        let mut pod = Pod::new(config).with_metrics(Arc::clone(&metrics));
        if let Some(h) = opts.handler {
            pod = pod.with_handler(h);
        }
        if let Some(store) = opts.store {
            pod = pod.with_store(store);
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(voice_pod::pod::serve(
            pod,
            app,
            metrics_listener,
            async move {
                let _ = rx.await;
            },
        ));
        Ok(Self {
            app_url,
            metrics_url,
            metrics,
            persona_dir,
            routes_file,
            shutdown: Some(tx),
            task: Some(task),
            _tmp: tmp,
        })
    }

    /// A Twilio simulator for this pod.
    pub fn sim(&self) -> TwilioSim {
        TwilioSim::new(
            &self.app_url,
            &self.app_url,
            TEST_ACCOUNT_SID,
            TEST_AUTH_TOKEN,
        )
    }

    /// Signals shutdown (like SIGTERM) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn shutdown(mut self) -> anyhow::Result<DrainOutcome> {
        self.begin_shutdown();
        let task = self
            .task
            .take()
            .ok_or_else(|| anyhow!("already shut down"))?;
        Ok(task.await??)
    }

    /// The `/metrics` text.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.metrics_url))
            .await?
            .text()
            .await?)
    }

    /// The sum of a metric's samples whose labels include `labels` (0 when absent),
    /// read from the real `/metrics` endpoint.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(metric_value(&self.scrape().await?, name, labels))
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// Sums the samples of `name` in Prometheus text whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, label_str) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let matches = labels.iter().all(|(k, v)| {
            label_str
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if matches {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Python of the test-only virtualenv holding Twilio's helper library (PyPI
/// `twilio`), created on first use by `scripts/twilio-venv.sh` in a cache directory
/// outside the repository.
pub fn twilio_helper_python() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/twilio-venv.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/twilio-venv.sh");
    assert!(out.status.success(), "scripts/twilio-venv.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// What a [`ProbeHandler`] saw of one call.
#[derive(Clone, Debug)]
pub struct ProbeCall {
    /// The context the pod built from the verified `start`.
    pub ctx: voice_pod::session::CallContext,
    /// Inputs in arrival order.
    pub inputs: Vec<voice_pod::session::CallInput>,
    /// Whether `run` returned.
    pub ended: bool,
}

#[derive(Default)]
struct ProbeState {
    calls: Vec<ProbeCall>,
    prepared: Vec<voice_pod::session::PreparedCall>,
}

/// A call handler for tests: records every call's context and inputs, optionally
/// sends scripted outputs when the call starts, or stalls (never reads its input)
/// to play a slow engine.
pub struct ProbeHandler {
    state: Arc<Mutex<ProbeState>>,
    script: Vec<voice_pod::session::CallOutput>,
    stalled: bool,
}

impl ProbeHandler {
    /// Records and says nothing.
    pub fn new() -> Arc<Self> {
        Self::with_outputs(Vec::new())
    }

    /// Sends `script` as soon as the call starts, then records.
    pub fn with_outputs(script: Vec<voice_pod::session::CallOutput>) -> Arc<Self> {
        Arc::new(Self {
            state: Arc::default(),
            script,
            stalled: false,
        })
    }

    /// Never reads its input; returns only when cancelled.
    pub fn stalled() -> Arc<Self> {
        Arc::new(Self {
            state: Arc::default(),
            script: Vec::new(),
            stalled: true,
        })
    }

    /// Calls so far.
    pub fn calls(&self) -> Vec<ProbeCall> {
        self.state.lock().unwrap().calls.clone()
    }

    /// `prepare` notifications so far.
    pub fn prepared(&self) -> Vec<voice_pod::session::PreparedCall> {
        self.state.lock().unwrap().prepared.clone()
    }
}

impl CallHandler for ProbeHandler {
    fn prepare(&self, call: &voice_pod::session::PreparedCall) {
        self.state.lock().unwrap().prepared.push(call.clone());
    }

    fn run(
        &self,
        ctx: voice_pod::session::CallContext,
        mut input: mpsc::Receiver<voice_pod::session::CallInput>,
        output: mpsc::Sender<voice_pod::session::CallOutput>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> futures::future::BoxFuture<'static, voice_pod::session::CallEnd> {
        use voice_pod::session::{CallEnd, CallInput};
        let state = Arc::clone(&self.state);
        let index = {
            let mut s = state.lock().unwrap();
            s.calls.push(ProbeCall {
                ctx,
                inputs: Vec::new(),
                ended: false,
            });
            s.calls.len() - 1
        };
        let script = self.script.clone();
        let stalled = self.stalled;
        Box::pin(async move {
            for out in script {
                if output.send(out).await.is_err() {
                    break;
                }
            }
            let end = if stalled {
                cancel.cancelled().await;
                CallEnd::Cancelled
            } else {
                loop {
                    let next = tokio::select! {
                        _ = cancel.cancelled() => break CallEnd::Cancelled,
                        n = input.recv() => n,
                    };
                    match next {
                        Some(i) => {
                            let stop = i == CallInput::Stop;
                            state.lock().unwrap().calls[index].inputs.push(i);
                            if stop {
                                break CallEnd::StreamStopped;
                            }
                        }
                        None => break CallEnd::StreamStopped,
                    }
                }
            };
            // Keep the output open until the end so the pod does not see an early return.
            drop(output);
            state.lock().unwrap().calls[index].ended = true;
            end
        })
    }
}
