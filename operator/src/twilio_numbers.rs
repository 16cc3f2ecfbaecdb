//! Twilio IncomingPhoneNumbers wiring: point a number's voice webhook and status
//! callback at a deployment, and put the previous values back later.
//!
//! `GET  {base}/2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers.json?PhoneNumber=...`
//! finds the number's `PN...` sid and current settings;
//! `POST {base}/2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers/{PNsid}.json`
//! (form: `VoiceUrl`, `VoiceMethod`, `StatusCallback`, `StatusCallbackMethod`,
//! `FriendlyName`) sets them. Credentials travel as HTTP Basic auth, never in URLs or
//! logs.
//!
//! Ownership: a number a VoiceDeployment wired carries `FriendlyName`
//! `callmeback:<VoiceDeployment uid>` ([`owner_mark`]). Webhook URLs cannot say who
//! wired a number (two deployments may share a host in a blue/green move); the mark
//! can, so a deployment restores or yields only numbers that are provably its own.
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
    /// `FriendlyName`: the owner mark when we set it, the user's label when we
    /// restore it. Empty means "leave it as it is" (Twilio refuses an empty label).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub friendly_name: String,
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
    /// The label; ours is an [`owner_mark`].
    #[serde(default)]
    pub friendly_name: Option<String>,
}

impl IncomingNumber {
    /// The number's current wiring.
    pub fn wiring(&self) -> NumberWiring {
        NumberWiring {
            voice_url: self.voice_url.clone().unwrap_or_default(),
            voice_method: self.voice_method.clone().unwrap_or_default(),
            status_callback: self.status_callback.clone().unwrap_or_default(),
            status_callback_method: self.status_callback_method.clone().unwrap_or_default(),
            friendly_name: self.friendly_name.clone().unwrap_or_default(),
        }
    }

    /// The uid of the VoiceDeployment that wired this number, when one did.
    pub fn owner(&self) -> Option<&str> {
        self.friendly_name.as_deref().and_then(mark_owner)
    }
}

/// Prefix of the `FriendlyName` that marks a number as wired by a VoiceDeployment.
pub const OWNER_MARK_PREFIX: &str = "callmeback:";

/// The `FriendlyName` that says "wired by the VoiceDeployment with this uid" (47
/// characters, inside Twilio's 64).
pub fn owner_mark(uid: &str) -> String {
    format!("{OWNER_MARK_PREFIX}{uid}")
}

/// The uid in an [`owner_mark`], if `friendly_name` is one.
pub fn mark_owner(friendly_name: &str) -> Option<&str> {
    friendly_name
        .strip_prefix(OWNER_MARK_PREFIX)
        .filter(|uid| !uid.is_empty())
}

impl TwilioError {
    /// Whether waiting may fix it: the network, throttling (429) or Twilio's own
    /// trouble (5xx). Those back off per account; the rest need a person.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
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

/// First wait after a transient failure of an account.
pub const ACCOUNT_BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest wait between attempts on a failing account.
pub const ACCOUNT_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Backoff per Twilio account after transient failures (429, 5xx, network).
///
/// Throttling is per account, so every deployment of that account waits together
/// instead of each hammering it on its own schedule. Only failing accounts have an
/// entry; success removes it, and entries idle for longer than
/// [`ACCOUNT_BACKOFF_MAX`] twice over are pruned on the next failure.
#[derive(Default)]
pub struct AccountBackoff {
    failing: std::sync::Mutex<std::collections::HashMap<String, Failing>>,
}

#[derive(Clone, Copy)]
struct Failing {
    since: std::time::Instant,
    failures: u32,
    until: std::time::Instant,
}

impl AccountBackoff {
    /// How long `account` must still wait, if it is backing off.
    pub fn wait(&self, account: &str) -> Option<Duration> {
        let now = std::time::Instant::now();
        let map = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        map.get(account)
            .map(|f| f.until.saturating_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// How long `account` has been failing without a success in between.
    pub fn failing_for(&self, account: &str) -> Option<Duration> {
        let map = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        map.get(account).map(|f| f.since.elapsed())
    }

    /// Records a transient failure; returns the wait before the next attempt.
    pub fn failed(&self, account: &str) -> Duration {
        let now = std::time::Instant::now();
        let mut map = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, f| now.saturating_duration_since(f.until) < ACCOUNT_BACKOFF_MAX * 2);
        let entry = map.entry(account.to_string()).or_insert(Failing {
            since: now,
            failures: 0,
            until: now,
        });
        entry.failures = entry.failures.saturating_add(1);
        let shift = entry.failures.saturating_sub(1).min(16);
        let delay = ACCOUNT_BACKOFF_BASE
            .saturating_mul(1u32 << shift)
            .min(ACCOUNT_BACKOFF_MAX);
        entry.until = now + delay;
        delay
    }

    /// Records a success: the account is healthy again.
    pub fn succeeded(&self, account: &str) {
        let mut map = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(account);
    }
}

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
        let mut form = vec![
            ("VoiceUrl", wiring.voice_url.as_str()),
            ("VoiceMethod", wiring.voice_method.as_str()),
            ("StatusCallback", wiring.status_callback.as_str()),
            (
                "StatusCallbackMethod",
                wiring.status_callback_method.as_str(),
            ),
        ];
        if !wiring.friendly_name.is_empty() {
            form.push(("FriendlyName", wiring.friendly_name.as_str()));
        }
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

    /// Puts `previous` back on `number` if it is still `ours`; a number someone else
    /// took (another deployment, a person) keeps their settings. A number no longer
    /// in the account is done. Returns whether it wrote.
    pub async fn restore(
        &self,
        number: &str,
        ours: &NumberWiring,
        previous: &NumberWiring,
    ) -> Result<bool, TwilioError> {
        let current = match self.find(number).await {
            Ok(c) => c,
            Err(TwilioError::NumberNotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !is_ours(&current, ours) {
            return Ok(false);
        }
        self.update(&current.sid, previous).await.map(|_| true)
    }
}

/// Whether `current` is wired by the deployment that wants `ours`: its owner mark,
/// or (numbers wired before marks existed) no mark at all and our webhook.
pub fn is_ours(current: &IncomingNumber, ours: &NumberWiring) -> bool {
    match current.owner() {
        Some(_) => current.friendly_name.as_deref() == Some(ours.friendly_name.as_str()),
        None => current.voice_url.as_deref() == Some(ours.voice_url.as_str()),
    }
}

/// The wiring a deployment wants for its numbers; `owner_uid` is the deployment's uid.
pub fn wanted_wiring(
    webhook_url: String,
    status_callback_url: String,
    owner_uid: &str,
) -> NumberWiring {
    NumberWiring {
        voice_url: webhook_url,
        voice_method: "POST".into(),
        status_callback: status_callback_url,
        status_callback_method: "POST".into(),
        friendly_name: owner_mark(owner_uid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    #[test]
    fn account_backoff_doubles_per_failure_caps_and_clears_on_success() {
        let b = AccountBackoff::default();
        assert_eq!(b.wait("AC1"), None);
        assert_eq!(b.failed("AC1"), ACCOUNT_BACKOFF_BASE);
        assert_eq!(b.failed("AC1"), ACCOUNT_BACKOFF_BASE * 2);
        assert_eq!(b.failed("AC1"), ACCOUNT_BACKOFF_BASE * 4);
        assert!(b.wait("AC1").is_some_and(|d| d <= ACCOUNT_BACKOFF_BASE * 4));
        assert_eq!(b.wait("AC2"), None, "another account does not wait");
        for _ in 0..40 {
            b.failed("AC1");
        }
        assert_eq!(b.failed("AC1"), ACCOUNT_BACKOFF_MAX);
        assert!(b.failing_for("AC1").is_some());
        b.succeeded("AC1");
        assert_eq!(b.wait("AC1"), None);
        assert_eq!(b.failing_for("AC1"), None);
    }

    #[test]
    fn ownership_is_the_mark_and_unmarked_numbers_fall_back_to_the_webhook() {
        let ours = wanted_wiring("https://b.example/twilio/voice".into(), "s".into(), "uid-b");
        let number = |friendly: &str, url: &str| IncomingNumber {
            sid: "PN00000000000000000000000000000000".into(),
            phone_number: "+14155550100".into(),
            voice_url: Some(url.into()),
            voice_method: None,
            status_callback: None,
            status_callback_method: None,
            friendly_name: Some(friendly.into()),
        };
        assert!(is_ours(&number("callmeback:uid-b", "https://x"), &ours));
        // Same webhook (blue/green on one host), another deployment's mark: not ours.
        assert!(!is_ours(
            &number("callmeback:uid-a", "https://b.example/twilio/voice"),
            &ours
        ));
        assert!(is_ours(
            &number("(415) 555-0100", "https://b.example/twilio/voice"),
            &ours
        ));
        assert!(!is_ours(
            &number("(415) 555-0100", "https://elsewhere"),
            &ours
        ));
        assert_eq!(mark_owner("callmeback:"), None);
        assert_eq!(mark_owner(&owner_mark("u1")), Some("u1"));
    }

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
