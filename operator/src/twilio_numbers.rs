//! Twilio IncomingPhoneNumbers wiring: point a number's voice webhook and status
//! callback at a deployment, and put the previous values back later.
//!
//! `GET  {base}/2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers.json?PhoneNumber=...`
//! finds the number's `PN...` sid and current settings;
//! `POST {base}/2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers/{PNsid}.json`
//! (form: `VoiceUrl`, `VoiceMethod`, `StatusCallback`, `StatusCallbackMethod`) sets them.
//! Credentials travel as HTTP Basic auth, never in URLs or logs.
//!
//! Who decides where these requests go: only the operator (its `--twilio-api-url`
//! flag, the chart's `operator.twilioApiUrl`), never a tenant's Secret. The operator
//! sends a tenant's credentials from inside the cluster and copies error answers into
//! status and Events, so a tenant-chosen base would be a request forwarder into the
//! cluster network with a read-back channel. Bases are checked ([`validate_api_base`]),
//! SIDs are checked before they enter a path, redirects are not followed, and what an
//! error answer may contribute is Twilio's numeric code and a bounded, cleaned message.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The public Twilio REST base.
pub const DEFAULT_TWILIO_API_URL: &str = "https://api.twilio.com";
/// Bound on one Twilio request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting to Twilio.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes read from a successful answer (one number's record is ~3 kB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most bytes read from an error answer (Twilio's are ~200 bytes).
pub const MAX_ERROR_BODY_BYTES: usize = 8 * 1024;
/// Most characters of Twilio's error message kept for status and Events.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 200;

/// Twilio failures.
#[derive(Debug, thiserror::Error)]
pub enum TwilioError {
    /// Network, TLS or timeout (the URL is stripped from the error).
    #[error("request to Twilio failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// Twilio answered with an error status.
    #[error("Twilio answered {status}{}: {message}", .code.map(|c| format!(" (code {c})")).unwrap_or_default())]
    Status {
        /// HTTP status.
        status: u16,
        /// Twilio's numeric error code, when the answer carried one.
        code: Option<u64>,
        /// Twilio's message: bounded, control characters removed, nothing else of
        /// the body (it reaches status and Events).
        message: String,
    },
    /// The answer was not what the API documents (too large, not JSON, a bad sid).
    #[error("unexpected answer from Twilio: {0}")]
    Unexpected(&'static str),
    /// The configured REST base is not a plain http(s) origin.
    #[error("Twilio API base {base:?} is not usable: {why}")]
    BadBase {
        /// The rejected value.
        base: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A credential has the wrong shape (it would end up in a URL path).
    #[error("the Secret's {0} is malformed")]
    MalformedCredential(&'static str),
    /// The account has no such number.
    #[error("the Twilio account has no number {0}")]
    NumberNotFound(String),
    /// Credentials are missing from the Secret.
    #[error("the Secret lacks {0}")]
    MissingCredential(&'static str),
}

/// A number's webhook settings: what we set, and what we restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NumberWiring {
    /// `VoiceUrl`.
    #[serde(default)]
    pub voice_url: String,
    /// `VoiceMethod`.
    #[serde(default)]
    pub voice_method: String,
    /// `StatusCallback`.
    #[serde(default)]
    pub status_callback: String,
    /// `StatusCallbackMethod`.
    #[serde(default)]
    pub status_callback_method: String,
}

/// A number as the REST API reports it.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IncomingNumber {
    /// `PN...`.
    pub sid: String,
    /// E.164.
    pub phone_number: String,
    /// Current voice webhook.
    #[serde(default)]
    pub voice_url: Option<String>,
    /// Its method.
    #[serde(default)]
    pub voice_method: Option<String>,
    /// Current status callback.
    #[serde(default)]
    pub status_callback: Option<String>,
    /// Its method.
    #[serde(default)]
    pub status_callback_method: Option<String>,
}

impl IncomingNumber {
    /// The number's current wiring.
    pub fn wiring(&self) -> NumberWiring {
        NumberWiring {
            voice_url: self.voice_url.clone().unwrap_or_default(),
            voice_method: self.voice_method.clone().unwrap_or_default(),
            status_callback: self.status_callback.clone().unwrap_or_default(),
            status_callback_method: self.status_callback_method.clone().unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct NumberList {
    #[serde(default)]
    incoming_phone_numbers: Vec<IncomingNumber>,
}

/// The two fields of Twilio's error body that may travel on; anything else it holds
/// (or a proxy's HTML page) is dropped.
#[derive(Deserialize)]
struct TwilioErrorBody {
    #[serde(default)]
    code: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

/// `prefix` followed by 32 hex digits: the shape of every Twilio sid.
pub fn is_sid(s: &str, prefix: &str) -> bool {
    s.len() == 34 && s.starts_with(prefix) && s.bytes().skip(2).all(|b| b.is_ascii_hexdigit())
}

/// Checks an operator-configured REST base: `http(s)://host[:port]` with an optional
/// path, no credentials, query or fragment (a `?` or `#` would swallow the path the
/// client appends). Returns it without a trailing `/`.
pub fn validate_api_base(base: &str) -> Result<String, TwilioError> {
    let bad = |why| TwilioError::BadBase {
        base: base.chars().take(200).collect(),
        why,
    };
    if base.contains(['?', '#']) {
        return Err(bad("it holds a query or fragment"));
    }
    if base.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("it holds whitespace or control characters"));
    }
    let url = reqwest::Url::parse(base).map_err(|_| bad("it is not an absolute URL"))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(bad("the scheme is not https or http"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("it holds credentials"));
    }
    Ok(base.trim_end_matches('/').to_string())
}

/// Reads at most `limit` bytes of `resp`'s body; `None` when it is longer.
async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, TwilioError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| TwilioError::Transport(e.without_url()))?
    {
        if body.len().saturating_add(chunk.len()) > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Twilio's message made safe for status and Events: control characters become
/// spaces, runs of spaces collapse, at most [`MAX_ERROR_MESSAGE_CHARS`] characters.
pub fn clean_message(message: &str) -> String {
    let mut out = String::new();
    let mut kept = 0usize;
    for c in message.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if kept == MAX_ERROR_MESSAGE_CHARS {
            out.push_str("...");
            break;
        }
        out.push(c);
        kept += 1;
    }
    out.trim_end().to_string()
}

/// Twilio's code and message from an error body, nothing else.
pub fn error_from_body(status: u16, body: Option<&[u8]>) -> TwilioError {
    let parsed = body.and_then(|b| serde_json::from_slice::<TwilioErrorBody>(b).ok());
    let (code, message) = match parsed {
        Some(b) => (b.code, b.message.as_deref().map(clean_message)),
        None => (None, None),
    };
    TwilioError::Status {
        status,
        code,
        message: message
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "no Twilio error message".into()),
    }
}

/// Previous wiring per number, remembered in an annotation on the VoiceDeployment
/// so a restarted operator can still restore it.
pub type PreviousWiring = BTreeMap<String, NumberWiring>;

/// A Twilio account's IncomingPhoneNumbers API.
#[derive(Clone)]
pub struct TwilioNumbers {
    http: reqwest::Client,
    base: String,
    account_sid: String,
    auth_token: String,
}

impl std::fmt::Debug for TwilioNumbers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioNumbers")
            .field("base", &self.base)
            .field("account_sid", &self.account_sid)
            .finish_non_exhaustive()
    }
}

impl TwilioNumbers {
    /// A client for `base` (no trailing `/2010-04-01`; checked by
    /// [`validate_api_base`]) and an account sid (`AC` + 32 hex digits).
    pub fn new(
        http: reqwest::Client,
        base: &str,
        account_sid: String,
        auth_token: String,
    ) -> Result<Self, TwilioError> {
        let base = validate_api_base(base)?;
        if !is_sid(&account_sid, "AC") {
            return Err(TwilioError::MalformedCredential("TWILIO_ACCOUNT_SID"));
        }
        Ok(Self {
            http,
            base,
            account_sid,
            auth_token,
        })
    }

    /// The shared HTTP client with the module's timeouts. Redirects are not
    /// followed: the REST API does not redirect, and a redirect must not carry
    /// requests (or their answers) anywhere else.
    pub fn http_client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default()
    }

    fn numbers_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/IncomingPhoneNumbers",
            self.base, self.account_sid
        )
    }

    /// A success answer's JSON (bounded), or Twilio's error.
    async fn answer<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
    ) -> Result<T, TwilioError> {
        let status = resp.status();
        if !status.is_success() {
            let body = read_bounded(resp, MAX_ERROR_BODY_BYTES).await?;
            return Err(error_from_body(status.as_u16(), body.as_deref()));
        }
        let body = read_bounded(resp, MAX_BODY_BYTES)
            .await?
            .ok_or(TwilioError::Unexpected("the answer is too large"))?;
        serde_json::from_slice(&body)
            .map_err(|_| TwilioError::Unexpected("the answer is not the documented JSON"))
    }

    /// Looks `number` up.
    pub async fn find(&self, number: &str) -> Result<IncomingNumber, TwilioError> {
        let resp = self
            .http
            .get(format!("{}.json", self.numbers_url()))
            .query(&[("PhoneNumber", number)])
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .send()
            .await
            .map_err(|e| TwilioError::Transport(e.without_url()))?;
        let list: NumberList = Self::answer(resp).await?;
        list.incoming_phone_numbers
            .into_iter()
            .find(|n| n.phone_number == number)
            .ok_or_else(|| TwilioError::NumberNotFound(number.to_string()))
    }

    /// Sets the number `sid`'s wiring.
    pub async fn update(
        &self,
        sid: &str,
        wiring: &NumberWiring,
    ) -> Result<IncomingNumber, TwilioError> {
        if !is_sid(sid, "PN") {
            return Err(TwilioError::Unexpected(
                "a number sid is not PN + 32 hex digits",
            ));
        }
        let form = [
            ("VoiceUrl", wiring.voice_url.as_str()),
            ("VoiceMethod", wiring.voice_method.as_str()),
            ("StatusCallback", wiring.status_callback.as_str()),
            (
                "StatusCallbackMethod",
                wiring.status_callback_method.as_str(),
            ),
        ];
        let resp = self
            .http
            .post(format!("{}/{sid}.json", self.numbers_url()))
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&form)
            .send()
            .await
            .map_err(|e| TwilioError::Transport(e.without_url()))?;
        Self::answer(resp).await
    }

    /// Points `number` at `wanted`. Returns the wiring it had before when it changed
    /// something (for the caller to remember), `None` when it was already wired.
    pub async fn wire(
        &self,
        number: &str,
        wanted: &NumberWiring,
    ) -> Result<Option<NumberWiring>, TwilioError> {
        let current = self.find(number).await?;
        let before = current.wiring();
        if &before == wanted {
            return Ok(None);
        }
        self.update(&current.sid, wanted).await?;
        Ok(Some(before))
    }

    /// Puts `previous` back on `number`, unless someone else rewired it meanwhile
    /// (then their settings win). A number no longer in the account is done.
    pub async fn restore(
        &self,
        number: &str,
        ours: &NumberWiring,
        previous: &NumberWiring,
    ) -> Result<(), TwilioError> {
        let current = match self.find(number).await {
            Ok(c) => c,
            Err(TwilioError::NumberNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if current.wiring().voice_url != ours.voice_url {
            return Ok(());
        }
        self.update(&current.sid, previous).await.map(|_| ())
    }
}

/// The wiring a deployment wants for its numbers.
pub fn wanted_wiring(webhook_url: String, status_callback_url: String) -> NumberWiring {
    NumberWiring {
        voice_url: webhook_url,
        voice_method: "POST".into(),
        status_callback: status_callback_url,
        status_callback_method: "POST".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    #[test]
    fn bases_with_a_query_fragment_credentials_or_odd_scheme_are_refused() {
        // Proves only plain http(s) origins pass: a `?` or `#` would swallow the appended path.
        for bad in [
            "https://api.twilio.com?",
            "https://api.twilio.com/#",
            "https://evil.example/x?y=",
            "https://user:pw@api.twilio.com",
            "file:///etc/passwd",
            "gopher://10.0.0.1:6379",
            "api.twilio.com",
            "https://api.twilio.com /",
            "",
        ] {
            assert!(validate_api_base(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            validate_api_base("https://api.twilio.com/").unwrap(),
            "https://api.twilio.com"
        );
        assert_eq!(
            validate_api_base("http://127.0.0.1:8080").unwrap(),
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn a_malformed_account_sid_never_reaches_a_path() {
        // Proves an account sid that could rewrite the request path is refused before any request.
        let http = TwilioNumbers::http_client();
        for sid in [
            "AC../../x",
            "ACxyz",
            "",
            "AC0123456789abcdef0123456789abcdef?a=b",
        ] {
            let r = TwilioNumbers::new(
                http.clone(),
                "https://api.twilio.com",
                sid.into(),
                "t".into(),
            );
            assert!(
                matches!(r, Err(TwilioError::MalformedCredential(_))),
                "{sid:?}"
            );
        }
        assert!(TwilioNumbers::new(http, "https://api.twilio.com", SID.into(), "t".into()).is_ok());
    }

    #[test]
    fn error_bodies_keep_only_a_bounded_clean_code_and_message() {
        // Proves what reaches status and Events from an error answer: Twilio's code and a short one-line message.
        let body = serde_json::json!({
            "code": 20404,
            "message": format!("Not found\r\n{}", "x".repeat(5000)),
            "more_info": "https://internal.example/secret-page",
            "internal": "10.0.0.7 db password hunter2",
        });
        let e = error_from_body(404, Some(body.to_string().as_bytes())).to_string();
        assert!(
            e.starts_with("Twilio answered 404 (code 20404): Not found xxx"),
            "{e}"
        );
        assert!(!e.contains('\n') && !e.contains('\r'), "{e}");
        assert!(!e.contains("internal") && !e.contains("hunter2"), "{e}");
        assert!(e.len() < MAX_ERROR_MESSAGE_CHARS + 60, "{} bytes", e.len());
        // A proxy's HTML page is not Twilio's error: none of it is kept.
        let e = error_from_body(502, Some(b"<html>upstream 10.1.2.3 failed</html>")).to_string();
        assert_eq!(e, "Twilio answered 502: no Twilio error message");
        let e = error_from_body(500, None).to_string();
        assert_eq!(e, "Twilio answered 500: no Twilio error message");
    }

    /// Answers every connection with `status` and `body`, once.
    async fn one_shot_server(status: u16, body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            if let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_oversized_error_answer_is_not_read_into_memory_or_status() {
        // Proves a 4 MB error body is cut at MAX_ERROR_BODY_BYTES and contributes nothing but the status.
        let mut body = br#"{"code": 1, "message": ""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 4 << 20));
        body.extend(br#""}"#);
        let base = one_shot_server(400, body).await;
        let twilio =
            TwilioNumbers::new(TwilioNumbers::http_client(), &base, SID.into(), "t".into())
                .unwrap();
        let e = twilio.find("+14155550100").await.unwrap_err().to_string();
        assert_eq!(e, "Twilio answered 400: no Twilio error message");
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        // Proves a 302 is an error, never a second request with the credentials somewhere else.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen, mut seen_rx) = tokio::sync::mpsc::channel::<()>(4);
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = seen.send(()).await;
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 302 Found\r\nlocation: http://{addr}/elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = socket.write_all(head.as_bytes()).await;
            }
        });
        let twilio = TwilioNumbers::new(
            TwilioNumbers::http_client(),
            &format!("http://{addr}"),
            SID.into(),
            "t".into(),
        )
        .unwrap();
        let e = twilio.find("+14155550100").await.unwrap_err();
        assert!(matches!(e, TwilioError::Status { status: 302, .. }), "{e}");
        assert!(seen_rx.try_recv().is_ok());
        assert!(seen_rx.try_recv().is_err(), "a second request was made");
    }
}
