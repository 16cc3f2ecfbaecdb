//! Twilio IncomingPhoneNumbers wiring: point a number's voice webhook and status
//! callback at a deployment, and put the previous values back later.
//!
//! `GET  {base}/2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers.json?PhoneNumber=...`
//! finds the number's `PN...` sid and current settings;
//! `POST {base}/2010-04-01/Accounts/{AccountSid}/IncomingPhoneNumbers/{PNsid}.json`
//! (form: `VoiceUrl`, `VoiceMethod`, `StatusCallback`, `StatusCallbackMethod`) sets them.
//! Credentials travel as HTTP Basic auth, never in URLs or logs.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The public Twilio REST base.
pub const DEFAULT_TWILIO_API_URL: &str = "https://api.twilio.com";
/// Bound on one Twilio request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting to Twilio.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Twilio failures.
#[derive(Debug, thiserror::Error)]
pub enum TwilioError {
    /// Network, TLS or timeout.
    #[error("request to Twilio failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// Twilio answered with an error status.
    #[error("Twilio answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Twilio's message (never contains our credentials).
        message: String,
    },
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

#[derive(Deserialize)]
struct TwilioErrorBody {
    #[serde(default)]
    message: String,
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
    /// A client for `base` (no trailing `/2010-04-01`).
    pub fn new(http: reqwest::Client, base: &str, account_sid: String, auth_token: String) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            account_sid,
            auth_token,
        }
    }

    /// The shared HTTP client with the module's timeouts.
    pub fn http_client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_default()
    }

    fn numbers_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/IncomingPhoneNumbers",
            self.base, self.account_sid
        )
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, TwilioError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let message = resp
            .json::<TwilioErrorBody>()
            .await
            .map(|b| b.message)
            .unwrap_or_default();
        Err(TwilioError::Status {
            status: status.as_u16(),
            message,
        })
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
            .map_err(TwilioError::Transport)?;
        let list: NumberList = Self::check(resp)
            .await?
            .json()
            .await
            .map_err(TwilioError::Transport)?;
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
            .map_err(TwilioError::Transport)?;
        Self::check(resp)
            .await?
            .json()
            .await
            .map_err(TwilioError::Transport)
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
