//! The Cerebras chat client against the Cerebras emulator over real HTTP.

use std::sync::Arc;
use std::time::Duration;

use callmeback_tests::emulators::cerebras::{
    CerebrasEmulator, CerebrasEmulatorConfig, CerebrasFault, ChatCall, Reply, scripted,
};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use voice_pod::metrics::Metrics;
use voice_pod::providers::cerebras::{Cerebras, CerebrasConfig};
use voice_pod::providers::{
    ChatDelta, ChatMessage, ChatModel, ChatRequest, LlmError, Role, ToolCall, ToolDef,
};
use voice_pod::secret::Secret;

const MODEL: &str = "gpt-oss-120b";

async fn emulator(reply: &str) -> CerebrasEmulator {
    CerebrasEmulator::start(CerebrasEmulatorConfig {
        reply: scripted(vec![reply.to_string()]),
        ..CerebrasEmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

fn client(
    emu: &CerebrasEmulator,
    metrics: Arc<Metrics>,
    tweak: impl FnOnce(&mut CerebrasConfig),
) -> Cerebras {
    let mut cfg = CerebrasConfig::new(emu.base_url(), Secret::new(emu.api_key()));
    tweak(&mut cfg);
    Cerebras::new(cfg, metrics).expect("valid config")
}

fn request() -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages: vec![
            ChatMessage::new(Role::System, "You are a friendly receptionist."),
            ChatMessage::new(Role::User, "Can I book a table for two?"),
        ],
        temperature: 0.6,
        max_tokens: 120,
        reasoning_effort: None,
        tools: Vec::new(),
    }
}

/// Drains a stream: (content, reasoning, items, final error).
async fn drain(
    mut s: voice_pod::providers::ChatStream,
) -> (String, String, Vec<ChatDelta>, Option<LlmError>) {
    let (mut content, mut reasoning, mut items) = (String::new(), String::new(), Vec::new());
    while let Some(item) = s.next().await {
        match item {
            Ok(ChatDelta::Content(c)) => content.push_str(&c),
            Ok(ChatDelta::Reasoning(r)) => reasoning.push_str(&r),
            Ok(d) => items.push(d),
            Err(e) => return (content, reasoning, items, Some(e)),
        }
    }
    (content, reasoning, items, None)
}

#[tokio::test]
async fn reply_streams_token_by_token_then_usage_and_done() {
    // Proves a normal completion streams the whole reply, then usage with server timing, then Done{stop}, with the right request.
    let emu = emulator("Of course! For what time would you like it?").await;
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let stream = llm
        .stream(request(), CancellationToken::new())
        .await
        .expect("stream starts");
    let (content, reasoning, items, err) = drain(stream).await;

    assert!(err.is_none(), "{err:?}");
    assert_eq!(content, "Of course! For what time would you like it?");
    assert!(reasoning.is_empty());
    assert!(
        matches!(items[0], ChatDelta::Usage(u) if u.completion_tokens > 5 && u.prompt_tokens > 0 && u.server_ttft.is_some())
    );
    assert_eq!(
        items[1],
        ChatDelta::Done {
            finish_reason: Some("stop".into())
        }
    );
    let req = &emu.chat_requests()[0];
    assert!(req.authorized);
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["model"], MODEL);
    assert_eq!(req.body["max_completion_tokens"], 120);
    assert_eq!(req.body["messages"][1]["role"], "user");
    assert!(
        req.body.get("tools").is_none(),
        "no tools offered, none sent"
    );
}

#[tokio::test]
async fn reasoning_tokens_never_arrive_as_content() {
    // Proves a reasoning model's delta.reasoning is delivered apart, so it can never reach TTS.
    let emu = CerebrasEmulator::start(CerebrasEmulatorConfig {
        reply: Arc::new(|_| Reply {
            reasoning: Some("The user wants a table. I should ask for the time.".into()),
            content: "Sure, what time?".into(),
            tool_calls: Vec::new(),
        }),
        ..CerebrasEmulatorConfig::default()
    })
    .await
    .unwrap();
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let mut req = request();
    req.reasoning_effort = Some(callmeback_api::ReasoningEffort::Low);
    let (content, reasoning, _, err) =
        drain(llm.stream(req, CancellationToken::new()).await.unwrap()).await;

    assert!(err.is_none());
    assert_eq!(content, "Sure, what time?");
    assert_eq!(
        reasoning,
        "The user wants a table. I should ask for the time."
    );
    assert_eq!(emu.chat_requests()[0].body["reasoning_effort"], "low");
}

#[tokio::test]
async fn first_token_deadline_fails_fast_instead_of_waiting() {
    // Proves a provider slower than the first-token deadline yields FirstTokenTimeout, not silence.
    let emu = emulator("Too late.").await;
    emu.set_latency(Duration::from_secs(3), Duration::ZERO);
    let metrics = Arc::new(Metrics::new());
    let llm = client(&emu, metrics.clone(), |c| {
        c.first_token_timeout = Duration::from_millis(300)
    });
    let started = Instant::now();
    let err = match llm.stream(request(), CancellationToken::new()).await {
        Err(e) => e,
        Ok(s) => drain(s).await.3.expect("an error"),
    };
    assert!(matches!(err, LlmError::FirstTokenTimeout(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "gave up at the deadline, not after the slow token"
    );
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["cerebras", "timeout"])
            .get(),
        1
    );
}

#[tokio::test]
async fn rate_limit_is_retried_once_after_retry_after() {
    // Proves a 429 is retried once, no sooner than its retry-after, and the reply still arrives.
    let emu = emulator("Yes, we have a table.").await;
    emu.push_fault(CerebrasFault::RateLimited {
        retry_after: Some(Duration::from_millis(400)),
    });
    let metrics = Arc::new(Metrics::new());
    let llm = client(&emu, metrics.clone(), |_| {});
    let (content, _, _, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .expect("retried"),
    )
    .await;

    assert!(err.is_none());
    assert_eq!(content, "Yes, we have a table.");
    let reqs = emu.chat_requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(400),
        "honoured retry-after"
    );
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["cerebras", "protocol"])
            .get(),
        1
    );
}

#[tokio::test]
async fn second_rate_limit_is_reported_with_its_retry_after() {
    // Proves the client retries only once: two 429s surface as RateLimited carrying retry-after.
    let emu = emulator("unused").await;
    for _ in 0..2 {
        emu.push_fault(CerebrasFault::RateLimited {
            retry_after: Some(Duration::from_millis(100)),
        });
    }
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let err = llm
        .stream(request(), CancellationToken::new())
        .await
        .err()
        .expect("an error");
    assert!(
        matches!(err, LlmError::RateLimited { retry_after: Some(d) } if d == Duration::from_millis(100)),
        "{err:?}"
    );
    assert_eq!(emu.chat_requests().len(), 2);
}

#[tokio::test]
async fn retry_after_longer_than_the_deadline_is_not_waited_for() {
    // Proves a retry that could not produce a token in time is skipped: fail now, speak the fallback.
    let emu = emulator("unused").await;
    emu.push_fault(CerebrasFault::RateLimited {
        retry_after: Some(Duration::from_secs(30)),
    });
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let started = Instant::now();
    let err = llm
        .stream(request(), CancellationToken::new())
        .await
        .err()
        .expect("an error");
    assert!(matches!(err, LlmError::RateLimited { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(emu.chat_requests().len(), 1);
}

#[tokio::test]
async fn server_error_is_retried_once() {
    // Proves a 5xx before any token is retried once and the reply arrives.
    let emu = emulator("Table booked.").await;
    emu.push_fault(CerebrasFault::Status(503));
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let (content, _, _, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .unwrap(),
    )
    .await;
    assert!(err.is_none());
    assert_eq!(content, "Table booked.");
    assert_eq!(
        emu.chat_requests()
            .iter()
            .map(|r| r.status)
            .collect::<Vec<_>>(),
        vec![503, 200]
    );
}

#[tokio::test]
async fn error_inside_a_200_stream_before_any_token_is_retried() {
    // Proves an error object inside a 200 stream, before the first token, counts as a failure and is retried.
    let emu = emulator("Second time lucky.").await;
    emu.push_fault(CerebrasFault::ErrorInStream { after_tokens: 0 });
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let (content, _, _, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .unwrap(),
    )
    .await;
    assert!(err.is_none());
    assert_eq!(content, "Second time lucky.");
    assert_eq!(emu.chat_requests().len(), 2);
}

#[tokio::test]
async fn error_inside_a_200_stream_after_tokens_ends_the_stream_with_an_error() {
    // Proves an in-stream error after tokens is never mistaken for the end of the reply.
    let emu = emulator("One two three four.").await;
    emu.push_fault(CerebrasFault::ErrorInStream { after_tokens: 2 });
    let metrics = Arc::new(Metrics::new());
    let llm = client(&emu, metrics.clone(), |_| {});
    let (content, _, items, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(content, "One two");
    assert!(
        matches!(err, Some(LlmError::InStream(ref m)) if m.contains("Internal server error")),
        "{err:?}"
    );
    assert!(items.is_empty(), "no Done after an error");
    assert_eq!(
        emu.chat_requests().len(),
        1,
        "no retry once tokens were given out"
    );
}

#[tokio::test]
async fn sse_error_event_is_an_error() {
    // Proves an `event: error` SSE event ends the stream with an error.
    let emu = emulator("One two three.").await;
    emu.push_fault(CerebrasFault::ErrorEvent { after_tokens: 1 });
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let (content, _, _, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(content, "One");
    assert!(
        matches!(err, Some(LlmError::InStream(ref m)) if m == "stream failed"),
        "{err:?}"
    );
}

#[tokio::test]
async fn stalled_stream_is_reported_as_stalled() {
    // Proves a stream that stops mid-reply ends with Stalled after the stall timeout instead of hanging.
    let emu = emulator("One two three four.").await;
    emu.push_fault(CerebrasFault::Stall {
        after_tokens: 2,
        pause: Duration::from_secs(5),
    });
    let llm = client(&emu, Arc::new(Metrics::new()), |c| {
        c.stall_timeout = Duration::from_millis(300)
    });
    let (content, _, _, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(content, "One two");
    assert!(matches!(err, Some(LlmError::Stalled(_))), "{err:?}");
}

#[tokio::test]
async fn dropped_connection_mid_stream_is_truncated() {
    // Proves a connection lost before [DONE] yields Truncated, never a silent normal end.
    let emu = emulator("One two three four.").await;
    // Spaced tokens, so the first ones reach the client before the connection goes.
    emu.set_latency(Duration::ZERO, Duration::from_millis(50));
    emu.push_fault(CerebrasFault::Drop { after_tokens: 2 });
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let (content, _, _, err) = drain(
        llm.stream(request(), CancellationToken::new())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(content, "One two");
    assert!(matches!(err, Some(LlmError::Truncated)), "{err:?}");
}

#[tokio::test]
async fn cancelling_ends_the_stream() {
    // Proves barge-in cancellation stops a slow stream at once: well before the
    // next token, 2 s away (the 1 s bound leaves a loaded CI half of that).
    let emu = emulator("One two three four five six seven eight.").await;
    emu.set_latency(Duration::ZERO, Duration::from_secs(2));
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let cancel = CancellationToken::new();
    let mut s = llm.stream(request(), cancel.clone()).await.unwrap();
    let first = s.next().await;
    assert!(matches!(first, Some(Ok(ChatDelta::Content(_)))));
    cancel.cancel();
    let started = Instant::now();
    let next = s.next().await;
    assert!(matches!(next, Some(Err(LlmError::Cancelled))), "{next:?}");
    assert!(s.next().await.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn model_check_names_the_missing_model_and_the_available_ones() {
    // Proves the start-up model check passes for a listed model and fails with a clear message otherwise.
    let emu = emulator("unused").await;
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    llm.check_model(MODEL).await.expect("model exists");
    let err = llm.check_model("llama3.1-8b").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LlmError::UnknownModel { .. }));
    assert!(msg.contains("llama3.1-8b") && msg.contains(MODEL), "{msg}");
}

#[tokio::test]
async fn unknown_model_in_a_request_is_a_clear_404() {
    // Proves the emulator checks the model like Cerebras and the client surfaces the provider's message.
    let emu = emulator("unused").await;
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let mut req = request();
    req.model = "qwen-3-32b".into();
    let err = llm
        .stream(req, CancellationToken::new())
        .await
        .err()
        .expect("an error");
    assert!(
        matches!(err, LlmError::Status { status: 404, ref message } if message.contains("qwen-3-32b")),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrong_key_is_unauthorized_and_not_retried() {
    // Proves a rejected key fails at once (no retry) and is counted as a connect error.
    let emu = emulator("unused").await;
    let metrics = Arc::new(Metrics::new());
    let llm = Cerebras::new(
        CerebrasConfig::new(emu.base_url(), Secret::new("nope")),
        metrics.clone(),
    )
    .unwrap();
    let err = llm
        .stream(request(), CancellationToken::new())
        .await
        .err()
        .expect("an error");
    assert!(matches!(err, LlmError::Unauthorized(401)), "{err:?}");
    assert_eq!(emu.chat_requests().len(), 1);
    assert_eq!(
        metrics
            .socket_errors
            .with_label_values(&["cerebras", "connect"])
            .get(),
        1
    );
}

#[tokio::test]
async fn a_function_call_streamed_in_fragments_arrives_whole_and_its_result_goes_back() {
    // Proves OpenAI-compatible function calling over a real socket: the request offers
    // `tools`; the model's words stream as content, its call (index, id and name first,
    // the arguments in 10-character fragments) arrives as one ToolCall just before
    // Done{tool_calls}; the next request carries the assistant's call and the tool's
    // result in the API's shape, and the model answers it.
    let arguments = r#"{"in_minutes":10,"note":"caller is on a date — «rescue me» 🙂"}"#;
    let emu = CerebrasEmulator::start(CerebrasEmulatorConfig {
        reply: Arc::new(move |call: &ChatCall| {
            if call.messages.last().is_some_and(|(role, _)| role == "tool") {
                Reply::text("Done, talk in ten minutes!")
            } else if call.tools.iter().any(|t| t == "schedule_callback") {
                Reply {
                    reasoning: None,
                    content: "Sure, I will call you back.".into(),
                    tool_calls: vec![("schedule_callback".into(), arguments.into())],
                }
            } else {
                Reply::text("No tools were offered.")
            }
        }),
        ..CerebrasEmulatorConfig::default()
    })
    .await
    .unwrap();
    let llm = client(&emu, Arc::new(Metrics::new()), |_| {});
    let mut req = request();
    req.tools = vec![ToolDef {
        name: "schedule_callback".into(),
        description: "Call the caller back later.".into(),
        parameters: serde_json::json!({
            "type": "object",
            "properties": {"in_minutes": {"type": "integer"}, "note": {"type": "string"}},
            "required": ["in_minutes"],
        }),
    }];
    let stream = llm
        .stream(req.clone(), CancellationToken::new())
        .await
        .expect("stream starts");
    let (content, _, items, err) = drain(stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(content, "Sure, I will call you back.");
    let n = items.len();
    assert!(n >= 2, "{items:?}");
    let ChatDelta::ToolCalls(calls) = &items[n - 2] else {
        panic!("no tool calls just before Done: {items:?}")
    };
    assert_eq!(
        items[n - 1],
        ChatDelta::Done {
            finish_reason: Some("tool_calls".into())
        }
    );
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "schedule_callback");
    assert_eq!(calls[0].arguments, arguments, "every fragment, in order");
    assert!(calls[0].id.starts_with("call_"), "{}", calls[0].id);
    let first = &emu.chat_requests()[0].body;
    assert_eq!(first["tools"][0]["type"], "function");
    assert_eq!(first["tools"][0]["function"]["name"], "schedule_callback");
    assert_eq!(
        first["tools"][0]["function"]["parameters"]["required"][0],
        "in_minutes"
    );

    // The next step: the persona's call and its result go back to the model.
    let call: ToolCall = calls[0].clone();
    req.messages
        .push(ChatMessage::assistant_calls(content, vec![call.clone()]));
    req.messages.push(ChatMessage::tool_result(
        call.id.clone(),
        r#"{"scheduled_for":"18:15"}"#,
    ));
    let stream = llm
        .stream(req, CancellationToken::new())
        .await
        .expect("the API accepts the call and its result");
    let (answer, _, _, err) = drain(stream).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(answer, "Done, talk in ten minutes!");
    let second = &emu.chat_requests()[1].body;
    let messages = second["messages"].as_array().unwrap();
    let [.., assistant, tool] = messages.as_slice() else {
        panic!("{messages:?}")
    };
    assert_eq!(assistant["role"], "assistant");
    assert_eq!(assistant["tool_calls"][0]["id"], call.id.as_str());
    assert_eq!(assistant["tool_calls"][0]["type"], "function");
    assert_eq!(
        assistant["tool_calls"][0]["function"]["arguments"],
        arguments
    );
    assert_eq!(tool["role"], "tool");
    assert_eq!(tool["tool_call_id"], call.id.as_str());
}
