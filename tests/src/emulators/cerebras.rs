//! A protocol-faithful emulator of the Cerebras inference API (OpenAI-compatible).
//!
//! A real HTTP server on 127.0.0.1:0:
//! - `POST /v1/chat/completions` checks `Authorization: Bearer <key>`, that the model
//!   exists, that `messages` is a non-empty list of role/content pairs and that
//!   `stream` is `true` (the voice pod only streams), then answers server-sent events:
//!   a first chunk with the assistant role, optional `delta.reasoning` chunks, the reply
//!   token by token as `chat.completion.chunk`s, then any function calls the reply
//!   makes as OpenAI-style `delta.tool_calls` (each call's index, id and name first,
//!   its arguments in fragments), a last chunk with `finish_reason` (`tool_calls`
//!   when it called any), `usage` and Cerebras' `time_info`, then `data: [DONE]`.
//!   Requests may offer `tools` (each `{type: function, function: {name, ...}}`) and
//!   carry `tool` messages (with `tool_call_id`) and assistant messages with
//!   `tool_calls`, as the API accepts them;
//! - `GET /v1/models` lists the configured models.
//!
//! Replies come from a function of the request (scripted lines, an echo, anything).
//! First-token latency and the delay between tokens are configurable; one-shot faults
//! (429 with `retry-after`, 5xx, an error inside the 200 stream, a stall, a dropped
//! connection) are queued and consumed one per request. Every request is recorded.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// What the reply function sees of a request.
#[derive(Clone, Debug)]
pub struct ChatCall {
    /// Requested model.
    pub model: String,
    /// `(role, content)` pairs, in order (`content` is empty when null).
    pub messages: Vec<(String, String)>,
    /// 0-based index of this completion request on the emulator.
    pub index: usize,
    /// Names of the functions the request offers.
    pub tools: Vec<String>,
}

impl ChatCall {
    /// The last user message, if any.
    pub fn last_user(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|(r, _)| r == "user")
            .map(|(_, c)| c.as_str())
    }
}

/// A reply to stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reply {
    /// Reasoning text streamed first as `delta.reasoning` (reasoning models).
    pub reasoning: Option<String>,
    /// The reply text, streamed token by token as `delta.content`.
    pub content: String,
    /// Functions the reply calls after its text: `(name, arguments JSON text)`.
    pub tool_calls: Vec<(String, String)>,
}

impl Reply {
    /// A plain reply.
    pub fn text(content: impl Into<String>) -> Self {
        Self {
            reasoning: None,
            content: content.into(),
            tool_calls: Vec::new(),
        }
    }
}

/// Computes a reply from a request.
pub type ReplyFn = Arc<dyn Fn(&ChatCall) -> Reply + Send + Sync>;

/// Replies with `lines[i]` to the i-th request (the last line once they run out).
pub fn scripted(lines: Vec<String>) -> ReplyFn {
    Arc::new(move |call: &ChatCall| {
        let line = lines
            .get(call.index)
            .or_else(|| lines.last())
            .cloned()
            .unwrap_or_default();
        Reply::text(line)
    })
}

/// Replies "You said: <last user message>." (handy to check what the model was given).
pub fn echo() -> ReplyFn {
    Arc::new(|call: &ChatCall| {
        Reply::text(format!(
            "You said: {}.",
            call.last_user().unwrap_or("nothing").trim_end_matches('.')
        ))
    })
}

/// Emulator settings.
#[derive(Clone)]
pub struct CerebrasEmulatorConfig {
    /// The address it listens on (a free port): loopback, or the test node's
    /// host address when pods on the real node call it.
    pub bind: std::net::IpAddr,
    /// The key clients must send as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// Models `/v1/models` lists and completions accept.
    pub models: Vec<String>,
    /// The reply function.
    pub reply: ReplyFn,
    /// Delay from the request to the first token.
    pub first_token_latency: Duration,
    /// Delay between tokens.
    pub inter_token_delay: Duration,
}

impl Default for CerebrasEmulatorConfig {
    fn default() -> Self {
        Self {
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            api_key: "test-cerebras-key".into(),
            models: vec![
                "gpt-oss-120b".into(),
                "llama-4-scout-17b-16e-instruct".into(),
            ],
            reply: echo(),
            first_token_latency: Duration::ZERO,
            inter_token_delay: Duration::ZERO,
        }
    }
}

impl std::fmt::Debug for CerebrasEmulatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CerebrasEmulatorConfig")
            .field("models", &self.models)
            .field("first_token_latency", &self.first_token_latency)
            .field("inter_token_delay", &self.inter_token_delay)
            .finish_non_exhaustive()
    }
}

/// One-shot faults, consumed one per completion request in order.
#[derive(Clone, Debug, PartialEq)]
pub enum CerebrasFault {
    /// HTTP 429 with an optional `retry-after` (seconds, fractional).
    RateLimited {
        /// `retry-after`.
        retry_after: Option<Duration>,
    },
    /// An HTTP error status (500, 503, ...).
    Status(u16),
    /// A 200 stream that sends an `error` object after this many tokens and ends.
    ErrorInStream {
        /// Tokens before the error.
        after_tokens: usize,
    },
    /// A 200 stream that sends `event: error` after this many tokens and ends.
    ErrorEvent {
        /// Tokens before the error.
        after_tokens: usize,
    },
    /// The stream pauses this long after this many tokens, then goes on.
    Stall {
        /// Tokens before the pause.
        after_tokens: usize,
        /// Pause.
        pause: Duration,
    },
    /// The connection drops after this many tokens (no `[DONE]`).
    Drop {
        /// Tokens before the drop.
        after_tokens: usize,
    },
}

/// One recorded request.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// `chat` or `models`.
    pub endpoint: &'static str,
    /// When it arrived.
    pub at: Instant,
    /// The bearer key matched.
    pub authorized: bool,
    /// The JSON body (chat only).
    pub body: serde_json::Value,
    /// Status answered.
    pub status: u16,
}

struct Shared {
    cfg: CerebrasEmulatorConfig,
    faults: Mutex<VecDeque<CerebrasFault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    completions: AtomicUsize,
    latency: Mutex<(Duration, Duration)>,
}

impl Shared {
    fn record(&self, r: RecordedRequest) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }
}

/// A running Cerebras emulator. Stops when dropped.
pub struct CerebrasEmulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl CerebrasEmulator {
    /// Starts the server on `cfg.bind` (127.0.0.1 by default), a free port.
    pub async fn start(cfg: CerebrasEmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind((cfg.bind, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            latency: Mutex::new((cfg.first_token_latency, cfg.inter_token_delay)),
            cfg,
            faults: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            completions: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            cancel,
        })
    }

    /// The base URL to give the client (`CEREBRAS_URL`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The key the emulator accepts.
    pub fn api_key(&self) -> &str {
        &self.shared.cfg.api_key
    }

    /// Queues a one-shot fault for a coming completion request.
    pub fn push_fault(&self, fault: CerebrasFault) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(fault);
    }

    /// Changes latencies while running.
    pub fn set_latency(&self, first_token: Duration, inter_token: Duration) {
        *self
            .shared
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = (first_token, inter_token);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Completion requests so far (answered or not).
    pub fn chat_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.endpoint == "chat")
            .collect()
    }

    /// Stops the server.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for CerebrasEmulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: &str,
    code: &str,
) -> Response {
    let body = json!({"message": message, "type": kind, "param": param, "code": code});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", shared.cfg.api_key))
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let ok = authorized(&shared, &headers);
    shared.record(RecordedRequest {
        endpoint: "models",
        at: Instant::now(),
        authorized: ok,
        body: serde_json::Value::Null,
        status: if ok { 200 } else { 401 },
    });
    if !ok {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "Wrong API Key",
            "invalid_request_error",
            "api_key",
            "wrong_api_key",
        );
    }
    let data: Vec<_> = shared
        .cfg
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "Cerebras"}))
        .collect();
    (
        [("content-type", "application/json")],
        json!({"object": "list", "data": data}).to_string(),
    )
        .into_response()
}

/// Splits a reply into tokens the way a tokenizer roughly would: words with their
/// leading space, punctuation apart.
fn tokenize(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for ch in text.chars() {
        let boundary = ch.is_whitespace() || matches!(ch, ',' | '.' | '!' | '?' | ';' | ':');
        if boundary && !cur.is_empty() && !cur.chars().all(char::is_whitespace) {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
        if matches!(ch, ',' | '.' | '!' | '?' | ';' | ':') {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let arrived = Instant::now();
    let ok = authorized(&shared, &headers);
    let parsed: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let record = |status: u16| {
        shared.record(RecordedRequest {
            endpoint: "chat",
            at: arrived,
            authorized: ok,
            body: parsed.clone(),
            status,
        })
    };
    if !ok {
        record(401);
        return error_response(
            StatusCode::UNAUTHORIZED,
            "Wrong API Key",
            "invalid_request_error",
            "api_key",
            "wrong_api_key",
        );
    }
    if parsed.is_null() {
        record(400);
        return error_response(
            StatusCode::BAD_REQUEST,
            "Request body is not valid JSON",
            "invalid_request_error",
            "",
            "invalid_json",
        );
    }
    let model = parsed
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_owned();
    if !shared.cfg.models.contains(&model) {
        record(404);
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("Model {model} does not exist or you do not have access to it."),
            "not_found_error",
            "model",
            "model_not_found",
        );
    }
    let messages: Option<Vec<(String, String)>> =
        parsed.get("messages").and_then(|m| m.as_array()).map(|a| {
            a.iter()
                .filter_map(|m| {
                    let role = m.get("role")?.as_str()?.to_owned();
                    let content = match m.get("content") {
                        Some(serde_json::Value::String(c)) => c.clone(),
                        // An assistant turn that only called functions.
                        None | Some(serde_json::Value::Null) if m.get("tool_calls").is_some() => {
                            String::new()
                        }
                        _ => return None,
                    };
                    let well_formed = match role.as_str() {
                        "system" | "user" => true,
                        "assistant" => m.get("tool_calls").is_none_or(valid_tool_calls),
                        "tool" => m.get("tool_call_id").and_then(|i| i.as_str()).is_some(),
                        _ => false,
                    };
                    well_formed.then_some((role, content))
                })
                .collect()
        });
    let Some(messages) = messages.filter(|ms| {
        !ms.is_empty()
            && Some(ms.len())
                == parsed
                    .get("messages")
                    .and_then(|m| m.as_array())
                    .map(Vec::len)
    }) else {
        record(422);
        return error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "messages must be a non-empty list of {role, content} with roles system, user, assistant (optionally with tool_calls) or tool (with tool_call_id)",
            "invalid_request_error",
            "messages",
            "wrong_api_format",
        );
    };
    let tools: Option<Vec<String>> = match parsed.get("tools") {
        None => Some(Vec::new()),
        Some(t) => t.as_array().and_then(|a| {
            a.iter()
                .map(|t| {
                    (t.get("type")?.as_str()? == "function")
                        .then(|| t.get("function")?.get("name")?.as_str().map(str::to_owned))
                        .flatten()
                })
                .collect()
        }),
    };
    let Some(tools) = tools else {
        record(422);
        return error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "tools must be a list of {type: function, function: {name, description, parameters}}",
            "invalid_request_error",
            "tools",
            "wrong_api_format",
        );
    };
    if parsed.get("stream").and_then(|s| s.as_bool()) != Some(true) {
        record(400);
        return error_response(
            StatusCode::BAD_REQUEST,
            "this emulator only answers streaming requests (stream: true)",
            "invalid_request_error",
            "stream",
            "unsupported",
        );
    }
    let fault = shared
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front();
    match &fault {
        Some(CerebrasFault::RateLimited { retry_after }) => {
            record(429);
            let mut resp = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "Requests per minute limit exceeded - too many requests sent.",
                "too_many_requests_error",
                "quota",
                "request_quota_exceeded",
            );
            if let Some(ra) = retry_after
                && let Ok(v) = HeaderValue::from_str(&format!("{:.3}", ra.as_secs_f64()))
            {
                resp.headers_mut().insert("retry-after", v);
            }
            resp.headers_mut().insert(
                "x-ratelimit-remaining-requests-day",
                HeaderValue::from_static("0"),
            );
            return resp;
        }
        Some(CerebrasFault::Status(code)) => {
            record(*code);
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error_response(
                status,
                "Internal server error",
                "server_error",
                "",
                "internal_server_error",
            );
        }
        _ => {}
    }
    record(200);
    let index = shared.completions.fetch_add(1, Ordering::SeqCst);
    let call = ChatCall {
        model: model.clone(),
        messages,
        index,
        tools,
    };
    let reply = (shared.cfg.reply)(&call);
    let (first, inter) = *shared.latency.lock().unwrap_or_else(|e| e.into_inner());
    let prompt_tokens: usize = call
        .messages
        .iter()
        .map(|(_, c)| c.split_whitespace().count() + 4)
        .sum();
    let (tx, rx) = mpsc::channel::<Result<String, std::io::Error>>(64);
    tokio::spawn(produce(
        tx,
        model,
        reply,
        fault,
        first,
        inter,
        prompt_tokens,
        arrived,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|item| (item.map(axum::body::Bytes::from), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    tx: mpsc::Sender<Result<String, std::io::Error>>,
    model: String,
    reply: Reply,
    fault: Option<CerebrasFault>,
    first: Duration,
    inter: Duration,
    prompt_tokens: usize,
    arrived: Instant,
) {
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = 1_767_225_600u64;
    let chunk = |delta: serde_json::Value, finish: Option<&str>| {
        let v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_emulated",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        format!("data: {v}\n\n")
    };
    // The role chunk goes out with the headers; it carries no token.
    if tx
        .send(Ok(chunk(json!({"role": "assistant", "content": ""}), None)))
        .await
        .is_err()
    {
        return;
    }
    sleep(first).await;
    let first_token_at = Instant::now();
    let mut tokens: Vec<(bool, String)> = Vec::new();
    if let Some(r) = &reply.reasoning {
        tokens.extend(tokenize(r).into_iter().map(|t| (true, t)));
    }
    tokens.extend(tokenize(&reply.content).into_iter().map(|t| (false, t)));
    let total = tokens.len();
    for (i, (reasoning, tok)) in tokens.into_iter().enumerate() {
        if i > 0 && !inter.is_zero() {
            sleep(inter).await;
        }
        match &fault {
            Some(CerebrasFault::ErrorInStream { after_tokens }) if *after_tokens == i => {
                let e = json!({"error": {"message": "Internal server error while streaming", "type": "server_error", "code": "internal_server_error"}, "status_code": 500});
                let _ = tx.send(Ok(format!("data: {e}\n\n"))).await;
                return;
            }
            Some(CerebrasFault::ErrorEvent { after_tokens }) if *after_tokens == i => {
                let e = json!({"message": "stream failed", "type": "server_error"});
                let _ = tx.send(Ok(format!("event: error\ndata: {e}\n\n"))).await;
                return;
            }
            Some(CerebrasFault::Stall {
                after_tokens,
                pause,
            }) if *after_tokens == i => {
                sleep(*pause).await;
            }
            Some(CerebrasFault::Drop { after_tokens }) if *after_tokens == i => {
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "emulated drop",
                    )))
                    .await;
                return;
            }
            _ => {}
        }
        let delta = if reasoning {
            json!({"reasoning": tok})
        } else {
            json!({"content": tok})
        };
        if tx.send(Ok(chunk(delta, None))).await.is_err() {
            return;
        }
    }
    if let Some(
        CerebrasFault::ErrorInStream { .. }
        | CerebrasFault::ErrorEvent { .. }
        | CerebrasFault::Drop { .. },
    ) = &fault
    {
        // A fault placed after the last token still fires, before the end.
        let _ = tx
            .send(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "emulated drop",
            )))
            .await;
        return;
    }
    // Function calls after the text, as OpenAI-compatible APIs stream them.
    for (i, (name, arguments)) in reply.tool_calls.iter().enumerate() {
        let call_id = format!("call_{:012x}", rand::random::<u64>() >> 16);
        let start = json!({"tool_calls": [{"index": i, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]});
        if tx.send(Ok(chunk(start, None))).await.is_err() {
            return;
        }
        let chars: Vec<char> = arguments.chars().collect();
        for piece in chars.chunks(10) {
            let piece: String = piece.iter().collect();
            let delta = json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]});
            if tx.send(Ok(chunk(delta, None))).await.is_err() {
                return;
            }
        }
    }
    let finish_reason = if reply.tool_calls.is_empty() {
        "stop"
    } else {
        "tool_calls"
    };
    let completion_time = first_token_at.elapsed().as_secs_f64();
    let prompt_time = (first_token_at - arrived).as_secs_f64();
    let last = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_emulated",
        "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total, "total_tokens": prompt_tokens + total},
        "time_info": {"queue_time": 0.0001, "prompt_time": prompt_time, "completion_time": completion_time, "total_time": prompt_time + completion_time, "created": created},
    });
    let _ = tx
        .send(Ok(format!("data: {last}\n\ndata: [DONE]\n\n")))
        .await;
}

/// Whether `calls` is a list of `{id, type: function, function: {name, arguments}}`.
fn valid_tool_calls(calls: &serde_json::Value) -> bool {
    calls.as_array().is_some_and(|a| {
        a.iter().all(|c| {
            c.get("id").and_then(|i| i.as_str()).is_some()
                && c.get("type").and_then(|t| t.as_str()) == Some("function")
                && c.get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(|n| n.as_str())
                    .is_some()
                && c.get("function")
                    .and_then(|f| f.get("arguments"))
                    .and_then(|a| a.as_str())
                    .is_some()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_keeps_text_and_splits_punctuation() {
        // Proves the token split loses nothing and separates punctuation like a tokenizer.
        let text = "Hello there, how are you? Fine.";
        let toks = tokenize(text);
        assert_eq!(toks.concat(), text);
        assert_eq!(toks[0], "Hello");
        assert_eq!(toks[1], " there");
        assert_eq!(toks[2], ",");
    }
}
