//! The Twilio REST calls the pod makes: create a call, end a call, find calls.
//!
//! `POST {api}/2010-04-01/Accounts/{sid}/Calls.json` (form-encoded, HTTP Basic auth
//! with the account SID and auth token), `POST .../Calls/{CallSid}.json` with
//! `Status=completed`, and `GET .../Calls.json?To=..&From=..` (the Calls list, paged
//! by `next_page_uri`). Errors keep Twilio's error JSON (`code`, `message`,
//! `more_info`, `status`) so the API can pass the code through.

use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// Twilio's error body.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct TwilioApiError {
    /// Twilio error code, e.g. 21211 (invalid `To`).
    #[serde(default)]
    pub code: Option<u32>,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// Link to the error's documentation.
    #[serde(default)]
    pub more_info: Option<String>,
    /// HTTP status Twilio answered with.
    #[serde(default)]
    pub status: u16,
}

/// A failed REST request.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Twilio answered with an error.
    /// Displayed with phone numbers in Twilio's message masked: this text reaches logs.
    #[error("twilio error {code:?} (HTTP {status}): {message}", code = .0.code, status = .0.status, message = crate::phone::mask_numbers_in(&.0.message))]
    Api(TwilioApiError),
    /// No answer within the timeout.
    #[error("twilio did not answer in time")]
    Timeout,
    /// Connection or protocol failure.
    #[error("twilio request failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// A 2xx answer we could not read.
    #[error("unreadable twilio response: {0}")]
    Decode(String),
}

impl RestError {
    /// Low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RestError::Api(_) => "twilio_error",
            RestError::Timeout => "timeout",
            RestError::Transport(_) => "transport",
            RestError::Decode(_) => "decode",
        }
    }
}

/// The part of Twilio's call resource we use.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct CallResource {
    /// `CA...`.
    pub sid: String,
    /// `queued`, `ringing`, ...
    #[serde(default)]
    pub status: String,
}

/// One call of Twilio's Calls list (the fields the scheduler matches on).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ListedCall {
    /// `CA...`.
    pub sid: String,
    /// `queued`, `ringing`, ...
    #[serde(default)]
    pub status: String,
    /// When Twilio created it (RFC 2822, e.g. `Tue, 31 Aug 2010 20:36:28 +0000`).
    #[serde(default)]
    pub date_created: Option<String>,
}

impl ListedCall {
    /// `date_created`, parsed; `None` when absent or unreadable.
    pub fn created(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.date_created
            .as_deref()
            .and_then(|d| chrono::DateTime::parse_from_rfc2822(d).ok())
            .map(|d| d.with_timezone(&chrono::Utc))
    }
}

#[derive(Deserialize)]
struct CallPage {
    #[serde(default)]
    calls: Vec<ListedCall>,
    #[serde(default)]
    next_page_uri: Option<String>,
}

/// Pages read per list request at most (a bound on a peer-controlled loop).
const MAX_LIST_PAGES: usize = 10;

/// Instructions for a new call: inline TwiML or an answer URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instructions {
    /// `Twiml=...` (at most 4000 characters).
    Twiml(String),
    /// `Url=...` with `Method=POST`.
    Url(String),
}

/// A call to create.
#[derive(Clone, Debug)]
pub struct CreateCall {
    /// Callee (E.164).
    pub to: String,
    /// Caller ID (E.164).
    pub from: String,
    /// What Twilio does on answer.
    pub instructions: Instructions,
    /// Status callback URL.
    pub status_callback: String,
    /// Ring time.
    pub timeout: Duration,
}

/// A Twilio REST client for one account.
#[derive(Clone)]
pub struct TwilioClient {
    http: reqwest::Client,
    base: String,
    account_sid: String,
    auth_token: Secret,
    timeout: Duration,
}

impl std::fmt::Debug for TwilioClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioClient")
            .field("base", &self.base)
            .field("account_sid", &self.account_sid)
            .finish_non_exhaustive()
    }
}

impl TwilioClient {
    /// A client for `base` (e.g. `https://api.twilio.com`), with a per-request timeout.
    pub fn new(
        base: &str,
        account_sid: &str,
        auth_token: Secret,
        timeout: Duration,
    ) -> Result<Self, RestError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("callmeback-voice-pod/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(RestError::Transport)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            account_sid: account_sid.to_string(),
            auth_token,
            timeout,
        })
    }

    fn calls_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Calls.json",
            self.base, self.account_sid
        )
    }

    /// Creates a call with status callbacks for every progress event.
    pub async fn create_call(&self, call: &CreateCall) -> Result<CallResource, RestError> {
        let mut form: Vec<(&str, String)> = vec![
            ("To", call.to.clone()),
            ("From", call.from.clone()),
            ("StatusCallback", call.status_callback.clone()),
            ("StatusCallbackMethod", "POST".into()),
            ("Timeout", call.timeout.as_secs().clamp(5, 600).to_string()),
        ];
        for event in ["initiated", "ringing", "answered", "completed"] {
            form.push(("StatusCallbackEvent", event.into()));
        }
        match &call.instructions {
            Instructions::Twiml(t) => form.push(("Twiml", t.clone())),
            Instructions::Url(u) => {
                form.push(("Url", u.clone()));
                form.push(("Method", "POST".into()));
            }
        }
        self.post(&self.calls_url(), &form).await
    }

    /// Ends a call in progress (`Status=completed`). A call that already ended
    /// (Twilio 20404) counts as success.
    pub async fn hangup(&self, call_sid: &str) -> Result<(), RestError> {
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Calls/{}.json",
            self.base, self.account_sid, call_sid
        );
        match self
            .post(&url, &[("Status", "completed".to_string())])
            .await
        {
            Ok(_) => Ok(()),
            Err(RestError::Api(e)) if e.code == Some(20404) || e.status == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Calls to `to` from `from` matching `filter` (extra list filters such as
    /// `("StartTime>", "2026-12-02")` or `("Status", "queued")`), newest first, following
    /// `next_page_uri` for at most [`MAX_LIST_PAGES`] pages.
    pub async fn list_calls(
        &self,
        to: &str,
        from: &str,
        filter: &[(&str, &str)],
    ) -> Result<Vec<ListedCall>, RestError> {
        let mut url = url::Url::parse(&self.calls_url())
            .map_err(|e| RestError::Decode(format!("calls url: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("To", to).append_pair("From", from);
            for (k, v) in filter {
                q.append_pair(k, v);
            }
            q.append_pair("PageSize", "50");
        }
        let mut found = Vec::new();
        let mut next = Some(url);
        for _ in 0..MAX_LIST_PAGES {
            let Some(page_url) = next.take() else { break };
            let page: CallPage = self.get(page_url.as_str()).await?;
            found.extend(page.calls);
            // `next_page_uri` is relative to the API host; never follow it elsewhere.
            next = match page.next_page_uri.filter(|u| u.starts_with('/')) {
                Some(rel) => Some(
                    url::Url::parse(&format!("{}{rel}", self.base))
                        .map_err(|e| RestError::Decode(format!("next_page_uri: {e}")))?,
                ),
                None => None,
            };
        }
        Ok(found)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, RestError> {
        let req = self
            .http
            .get(url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()));
        self.send(req).await
    }

    async fn post(&self, url: &str, form: &[(&str, String)]) -> Result<CallResource, RestError> {
        let req = self
            .http
            .post(url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .form(form);
        self.send(req).await
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, RestError> {
        let resp = tokio::time::timeout(self.timeout, req.send())
            .await
            .map_err(|_| RestError::Timeout)?
            .map_err(|e| {
                if e.is_timeout() {
                    RestError::Timeout
                } else {
                    RestError::Transport(e)
                }
            })?;
        let status = resp.status();
        let body = tokio::time::timeout(self.timeout, resp.bytes())
            .await
            .map_err(|_| RestError::Timeout)?
            .map_err(RestError::Transport)?;
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| RestError::Decode(e.to_string()))
        } else {
            let mut err: TwilioApiError = serde_json::from_slice(&body).unwrap_or(TwilioApiError {
                code: None,
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                more_info: None,
                status: status.as_u16(),
            });
            if err.status == 0 {
                err.status = status.as_u16();
            }
            Err(RestError::Api(err))
        }
    }
}
