//! Cerebras chat completions (OpenAI-compatible), streamed as server-sent events.
//!
//! One `reqwest` client per process keeps a warm connection pool, so a turn does not pay
//! for TCP and TLS. A completion is retried once when it fails before any token (429 with
//! `retry-after`, 5xx, a connection error, an `error` inside the 200 stream), all within
//! the first-token deadline: after that the caller hears the persona's fallback instead
//! of silence. Reasoning deltas are kept apart from content so they never reach TTS.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::sse::{SseEvent, SseParser};
use super::tool_calls::ToolCallAssembly;
use super::{ChatDelta, ChatModel, ChatRequest, ChatStream, LlmError, Usage};
use crate::metrics::{Metrics, Peer};
use crate::secret::Secret;

/// Cerebras client settings.
#[derive(Clone, Debug)]
pub struct CerebrasConfig {
    /// Base URL, e.g. `https://api.cerebras.ai` (the client appends `/v1/...`).
    pub base_url: String,
    /// `CEREBRAS_API_KEY`, sent as `Authorization: Bearer <key>`.
    pub api_key: Secret,
    /// The first token (content or reasoning) must arrive this soon after the request,
    /// retries included.
    pub first_token_timeout: Duration,
    /// Longest gap between two chunks once streaming.
    pub stall_timeout: Duration,
    /// TCP/TLS connect deadline.
    pub connect_timeout: Duration,
    /// Longest `retry-after` honoured before the single retry.
    pub max_retry_after: Duration,
    /// Deadline for `GET /v1/models`.
    pub models_timeout: Duration,
}

impl CerebrasConfig {
    /// Settings with production defaults.
    pub fn new(base_url: impl Into<String>, api_key: Secret) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            first_token_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(2),
            models_timeout: Duration::from_secs(5),
        }
    }
}

/// The Cerebras chat client (cheap to clone; one per process for one warm pool).
#[derive(Clone)]
pub struct Cerebras {
    http: reqwest::Client,
    cfg: Arc<CerebrasConfig>,
    base: String,
    metrics: Arc<Metrics>,
}

/// Largest error body read from a non-200 answer.
const MAX_ERROR_BODY: usize = 4096;

impl std::fmt::Debug for Cerebras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cerebras")
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Cerebras {
    /// Builds the client and its connection pool.
    pub fn new(cfg: CerebrasConfig, metrics: Arc<Metrics>) -> Result<Self, LlmError> {
        let parsed = url::Url::parse(&cfg.base_url)
            .map_err(|e| LlmError::Config(format!("bad base URL `{}`: {e}", cfg.base_url)))?;
        if !matches!(parsed.scheme(), "http" | "https")
            || parsed.query().is_some()
            || !parsed.username().is_empty()
        {
            return Err(LlmError::Config(
                "the base URL must be http(s) without credentials or a query".into(),
            ));
        }
        let mut headers = HeaderMap::new();
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", cfg.api_key.expose()))
            .map_err(|_| LlmError::Config("the API key is not a valid header value".into()))?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| LlmError::Config(e.to_string()))?;
        Ok(Self {
            http,
            base: cfg.base_url.trim_end_matches('/').to_owned(),
            cfg: Arc::new(cfg),
            metrics,
        })
    }

    fn count(&self, e: &LlmError) {
        if !matches!(e, LlmError::Cancelled) {
            self.metrics.socket_error(Peer::Cerebras, e.metric_kind());
        }
    }

    /// Opens a pooled connection ahead of the first turn (like the SDK's TCP warming).
    pub async fn warm(&self) {
        let url = format!("{}/v1/models", self.base);
        let _ = timeout(self.cfg.models_timeout, self.http.get(url).send()).await;
    }

    /// Lists the provider's model ids (`GET /v1/models`).
    pub async fn models(&self) -> Result<Vec<String>, LlmError> {
        let url = format!("{}/v1/models", self.base);
        let resp = match timeout(self.cfg.models_timeout, self.http.get(url).send()).await {
            Err(_) => return Err(LlmError::Connect("GET /v1/models timed out".into())),
            Ok(Err(e)) => return Err(LlmError::Connect(e.without_url().to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            return Err(status_error(
                status,
                resp.headers().clone(),
                read_error_body(resp).await,
            ));
        }
        #[derive(Deserialize)]
        struct Models {
            data: Vec<ModelEntry>,
        }
        #[derive(Deserialize)]
        struct ModelEntry {
            id: String,
        }
        let body = timeout(self.cfg.models_timeout, resp.bytes())
            .await
            .map_err(|_| LlmError::Connect("GET /v1/models body timed out".into()))?
            .map_err(|e| LlmError::Connect(e.without_url().to_string()))?;
        let models: Models =
            serde_json::from_slice(&body).map_err(|e| LlmError::Malformed(e.to_string()))?;
        Ok(models.data.into_iter().map(|m| m.id).collect())
    }

    fn body(req: &ChatRequest) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": req.model,
            "messages": req.messages,
            "stream": true,
            "temperature": req.temperature,
            "max_completion_tokens": req.max_tokens,
        });
        if let Some(effort) = req.reasoning_effort {
            body["reasoning_effort"] = serde_json::to_value(effort).unwrap_or_default();
        }
        if !req.tools.is_empty() {
            let tools: Vec<serde_json::Value> = req
                .tools
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "type": "function",
                        "function": {
                            "name": t.name,
                            "description": t.description,
                            "parameters": t.parameters,
                        },
                    })
                })
                .collect();
            body["tools"] = serde_json::Value::Array(tools);
            body["parallel_tool_calls"] = serde_json::Value::Bool(true);
        }
        body
    }

    /// One attempt: request, status, then read until the first token.
    async fn attempt(
        &self,
        body: &serde_json::Value,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Primed, Attempt> {
        let url = format!("{}/v1/chat/completions", self.base);
        let send = self
            .http
            .post(url)
            .header(ACCEPT, "text/event-stream")
            .json(body)
            .send();
        let resp = tokio::select! {
            _ = cancel.cancelled() => return Err(Attempt::Fatal(LlmError::Cancelled)),
            r = timeout_at(deadline, send) => match r {
                Err(_) => return Err(Attempt::Fatal(LlmError::FirstTokenTimeout(self.cfg.first_token_timeout))),
                Ok(Err(e)) => return Err(Attempt::Retry(LlmError::Connect(e.without_url().to_string()), None)),
                Ok(Ok(r)) => r,
            },
        };
        let status = resp.status();
        if status != StatusCode::OK {
            let headers = resp.headers().clone();
            let retry_after = parse_retry_after(&headers);
            let err = status_error(status, headers, read_error_body(resp).await);
            return if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                Err(Attempt::Retry(err, retry_after))
            } else {
                Err(Attempt::Fatal(err))
            };
        }
        let mut state = StreamState {
            body: resp.bytes_stream().boxed(),
            parser: SseParser::new(),
            pending: VecDeque::new(),
            finish_reason: None,
            tool_calls: ToolCallAssembly::default(),
            finished: false,
            stall: self.cfg.stall_timeout,
            cancel: cancel.clone(),
            client: self.clone(),
        };
        // Read until the first token so that a failure before it can still be retried.
        loop {
            if state.pending.iter().any(|d| {
                matches!(
                    d,
                    Ok(ChatDelta::Content(_) | ChatDelta::Reasoning(_) | ChatDelta::Done { .. })
                ) || d.is_err()
            }) {
                if let Some(Err(_)) = state.pending.front()
                    && let Some(Err(e)) = state.pending.pop_front()
                {
                    return Err(match e {
                        LlmError::InStream(_) | LlmError::Truncated | LlmError::Connect(_) => {
                            Attempt::Retry(e, None)
                        }
                        other => Attempt::Fatal(other),
                    });
                }
                return Ok(Primed(state));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(Attempt::Fatal(LlmError::Cancelled)),
                r = timeout_at(deadline, state.body.next()) => match r {
                    Err(_) => return Err(Attempt::Fatal(LlmError::FirstTokenTimeout(self.cfg.first_token_timeout))),
                    Ok(None) => return Err(Attempt::Retry(LlmError::Truncated, None)),
                    Ok(Some(Err(e))) => return Err(Attempt::Retry(LlmError::Connect(e.without_url().to_string()), None)),
                    Ok(Some(Ok(chunk))) => state.feed(&chunk),
                },
            }
        }
    }
}

/// Outcome of a failed attempt.
enum Attempt {
    /// Retry once (after `retry-after` when given).
    Retry(LlmError, Option<Duration>),
    /// Give up.
    Fatal(LlmError),
}

/// A 200 stream whose first token is already read.
struct Primed(StreamState);

struct StreamState {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    parser: SseParser,
    pending: VecDeque<Result<ChatDelta, LlmError>>,
    finish_reason: Option<String>,
    /// Function calls under way, delivered whole before `Done`.
    tool_calls: ToolCallAssembly,
    /// `Done` or an error was queued; nothing more is read.
    finished: bool,
    stall: Duration,
    cancel: CancellationToken,
    client: Cerebras,
}

impl StreamState {
    fn feed(&mut self, chunk: &[u8]) {
        if self.finished {
            return;
        }
        let mut events = Vec::new();
        if let Err(e) = self.parser.push(chunk, &mut events) {
            self.fail(LlmError::Malformed(e.to_string()));
            return;
        }
        for ev in events {
            if self.finished {
                return;
            }
            self.interpret(ev);
        }
    }

    fn fail(&mut self, e: LlmError) {
        self.finished = true;
        self.pending.push_back(Err(e));
    }

    fn interpret(&mut self, ev: SseEvent) {
        if ev.event.as_deref() == Some("error") {
            let msg = error_message_from(&ev.data).unwrap_or_else(|| ev.data.clone());
            self.fail(LlmError::InStream(super::socket::truncate(&msg, 300)));
            return;
        }
        let data = ev.data.trim();
        if data == "[DONE]" {
            if !self.tool_calls.is_empty() {
                match std::mem::take(&mut self.tool_calls).finish() {
                    Ok(calls) => self.pending.push_back(Ok(ChatDelta::ToolCalls(calls))),
                    Err(e) => {
                        self.fail(LlmError::Malformed(e));
                        return;
                    }
                }
            }
            self.finished = true;
            self.pending.push_back(Ok(ChatDelta::Done {
                finish_reason: self.finish_reason.take(),
            }));
            return;
        }
        if data.is_empty() {
            return;
        }
        let chunk: Chunk = match serde_json::from_str(data) {
            Ok(c) => c,
            Err(e) => {
                self.fail(LlmError::Malformed(e.to_string()));
                return;
            }
        };
        if let Some(err) = chunk.error {
            self.fail(LlmError::InStream(super::socket::truncate(
                &err.message(),
                300,
            )));
            return;
        }
        for choice in chunk.choices {
            if let Some(delta) = choice.delta {
                if let Some(r) = delta.reasoning.filter(|r| !r.is_empty()) {
                    self.pending.push_back(Ok(ChatDelta::Reasoning(r)));
                }
                if let Some(c) = delta.content.filter(|c| !c.is_empty()) {
                    self.pending.push_back(Ok(ChatDelta::Content(c)));
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    let function = call.function.unwrap_or_default();
                    if let Err(e) = self.tool_calls.push(
                        call.index,
                        call.id.as_deref(),
                        function.name.as_deref(),
                        function.arguments.as_deref(),
                    ) {
                        self.fail(LlmError::Malformed(e));
                        return;
                    }
                }
            }
            if let Some(f) = choice.finish_reason {
                self.finish_reason = Some(f);
            }
        }
        if let Some(u) = chunk.usage {
            let server_ttft = chunk
                .time_info
                .and_then(|t| Some(t.queue_time? + t.prompt_time?));
            self.pending.push_back(Ok(ChatDelta::Usage(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                server_ttft,
            })));
        }
    }

    async fn next_item(&mut self) -> Option<Result<ChatDelta, LlmError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                if let Err(e) = &item {
                    self.client.count(e);
                }
                return Some(item);
            }
            if self.finished {
                return None;
            }
            let next = tokio::select! {
                _ = self.cancel.cancelled() => {
                    self.finished = true;
                    return Some(Err(LlmError::Cancelled));
                }
                r = timeout(self.stall, self.body.next()) => r,
            };
            match next {
                Err(_) => self.fail(LlmError::Stalled(self.stall)),
                Ok(None) => self.fail(LlmError::Truncated),
                Ok(Some(Err(e))) => {
                    warn!(error = %e.without_url(), "cerebras stream broke");
                    self.fail(LlmError::Truncated)
                }
                Ok(Some(Ok(chunk))) => self.feed(&chunk),
            }
        }
    }
}

impl ChatModel for Cerebras {
    fn stream(
        &self,
        req: ChatRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, Result<ChatStream, LlmError>> {
        Box::pin(async move {
            let deadline = Instant::now() + self.cfg.first_token_timeout;
            let body = Self::body(&req);
            let mut retried = false;
            loop {
                match self.attempt(&body, deadline, &cancel).await {
                    Ok(Primed(state)) => {
                        let s = futures::stream::unfold(state, |mut st| async move {
                            st.next_item().await.map(|item| (item, st))
                        });
                        return Ok(s.boxed());
                    }
                    Err(Attempt::Fatal(e)) => {
                        self.count(&e);
                        return Err(e);
                    }
                    Err(Attempt::Retry(e, retry_after)) => {
                        self.count(&e);
                        if retried {
                            return Err(e);
                        }
                        retried = true;
                        let wait = retry_after
                            .unwrap_or(Duration::from_millis(100))
                            .min(self.cfg.max_retry_after);
                        if Instant::now() + wait >= deadline {
                            // The retry could not produce a token in time anyway.
                            return Err(e);
                        }
                        debug!(error = %e, wait_ms = wait.as_millis() as u64, "retrying the completion once");
                        tokio::select! {
                            _ = cancel.cancelled() => return Err(LlmError::Cancelled),
                            _ = sleep(wait) => {}
                        }
                    }
                }
            }
        })
    }

    fn check_model<'a>(&'a self, model: &'a str) -> BoxFuture<'a, Result<(), LlmError>> {
        Box::pin(async move {
            let available = self.models().await?;
            if available.iter().any(|m| m == model) {
                Ok(())
            } else {
                Err(LlmError::UnknownModel {
                    model: model.to_owned(),
                    available,
                })
            }
        })
    }
}

/// `retry-after` in seconds (fractions allowed); HTTP dates are ignored.
fn parse_retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = v.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

fn status_error(status: StatusCode, headers: HeaderMap, body: String) -> LlmError {
    let message = error_message_from(&body).unwrap_or(body);
    match status.as_u16() {
        401 | 403 => LlmError::Unauthorized(status.as_u16()),
        429 => LlmError::RateLimited {
            retry_after: parse_retry_after(&headers),
        },
        s => LlmError::Status {
            status: s,
            message: super::socket::truncate(&message, 300),
        },
    }
}

async fn read_error_body(resp: reqwest::Response) -> String {
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = body.next().await {
            out.extend_from_slice(&chunk);
            if out.len() >= MAX_ERROR_BODY {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_secs(1), read).await;
    out.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&out).into_owned()
}

/// The human message of an OpenAI-style error body (`{"error":{"message"}}` or `{"message"}`).
fn error_message_from(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let err = v.get("error").unwrap_or(&v);
    match err {
        serde_json::Value::String(s) => Some(s.clone()),
        _ => err
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned),
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<UsageMsg>,
    #[serde(default)]
    time_info: Option<TimeInfo>,
    #[serde(default)]
    error: Option<ErrorField>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorField {
    Text(String),
    Object(serde_json::Value),
}

impl ErrorField {
    fn message(&self) -> String {
        match self {
            ErrorField::Text(s) => s.clone(),
            ErrorField::Object(v) => v
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string()),
        }
    }
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One `delta.tool_calls[]` entry: a call's start or a fragment of its arguments.
#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Default, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct UsageMsg {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

#[derive(Deserialize)]
struct TimeInfo {
    #[serde(default)]
    queue_time: Option<f64>,
    #[serde(default)]
    prompt_time: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> StreamState {
        let client = Cerebras::new(
            CerebrasConfig::new("http://127.0.0.1:9", Secret::new("k")),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        StreamState {
            body: futures::stream::empty().boxed(),
            parser: SseParser::new(),
            pending: VecDeque::new(),
            finish_reason: None,
            tool_calls: ToolCallAssembly::default(),
            finished: false,
            stall: Duration::from_secs(1),
            cancel: CancellationToken::new(),
            client,
        }
    }

    #[test]
    fn reasoning_is_kept_apart_and_done_carries_finish_reason() {
        // Proves reasoning deltas never come out as content and [DONE] ends with the finish reason.
        let mut s = state();
        s.feed(b"data: {\"choices\":[{\"delta\":{\"reasoning\":\"think\"}}]}\n\n");
        s.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2},\"time_info\":{\"queue_time\":0.01,\"prompt_time\":0.02}}\n\ndata: [DONE]\n\n");
        let items: Vec<_> = s.pending.drain(..).map(Result::unwrap).collect();
        assert_eq!(items[0], ChatDelta::Reasoning("think".into()));
        assert_eq!(items[1], ChatDelta::Content("Hi".into()));
        assert!(
            matches!(items[2], ChatDelta::Usage(Usage { prompt_tokens: 5, completion_tokens: 2, server_ttft: Some(t) }) if (t - 0.03).abs() < 1e-9)
        );
        assert_eq!(
            items[3],
            ChatDelta::Done {
                finish_reason: Some("stop".into())
            }
        );
    }

    #[test]
    fn error_object_inside_a_200_stream_is_an_error() {
        // Proves an `error` object and an `event: error` inside the stream both become errors.
        let mut s = state();
        s.feed(b"data: {\"error\":{\"message\":\"overloaded\",\"status_code\":503}}\n\n");
        assert!(
            matches!(s.pending.pop_front(), Some(Err(LlmError::InStream(m))) if m == "overloaded")
        );
        let mut s = state();
        s.feed(b"event: error\ndata: {\"message\":\"boom\"}\n\n");
        assert!(matches!(s.pending.pop_front(), Some(Err(LlmError::InStream(m))) if m == "boom"));
    }

    #[test]
    fn retry_after_accepts_fractional_seconds() {
        // Proves retry-after parsing handles the fractional seconds Cerebras sends.
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("0.25"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(parse_retry_after(&h), None);
    }
}
