//! Opening a provider's WebSocket: what Deepgram and ElevenLabs share.
//!
//! Both authenticate with a header (never a query parameter, so the key stays out of
//! URLs and logs), bound message sizes, time out the handshake, and tell an
//! authentication failure (no point retrying) from a rejection or a network error.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{self, protocol::WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use url::Url;

/// A provider socket.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest body of a refused upgrade kept for the error message.
const MAX_REJECTION_BODY: usize = 300;

/// Why a socket could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The URL or the key cannot form a request.
    Config(String),
    /// The handshake did not finish within the connect timeout.
    Timeout,
    /// The provider refused the key (HTTP 401/403).
    Unauthorized(u16),
    /// The provider refused the upgrade for another reason.
    Rejected { status: u16, body: String },
    /// Network or protocol failure.
    Connect(String),
}

/// Opens `url` with the secret `auth` header (marked sensitive so no debug output
/// prints it).
pub(crate) async fn open(
    url: &Url,
    auth: (HeaderName, &str),
    connect_timeout: Duration,
    max_message_bytes: usize,
) -> Result<Ws, OpenError> {
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| OpenError::Config(e.to_string()))?;
    let mut value = HeaderValue::from_str(auth.1)
        .map_err(|_| OpenError::Config("the API key is not a valid header value".into()))?;
    value.set_sensitive(true);
    req.headers_mut().insert(auth.0, value);
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes));
    match timeout(
        connect_timeout,
        tokio_tungstenite::connect_async_with_config(req, Some(ws_cfg), true),
    )
    .await
    {
        Err(_) => Err(OpenError::Timeout),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(resp))) => {
            let status = resp.status().as_u16();
            if status == 401 || status == 403 {
                Err(OpenError::Unauthorized(status))
            } else {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| truncate(&String::from_utf8_lossy(b), MAX_REJECTION_BODY))
                    .unwrap_or_default();
                Err(OpenError::Rejected { status, body })
            }
        }
        Ok(Err(e)) => Err(OpenError::Connect(e.to_string())),
    }
}

/// Parses a base URL and maps `http(s)` to `ws(s)`.
pub(crate) fn ws_base(base: &str) -> Result<Url, String> {
    let mut url = Url::parse(base).map_err(|e| format!("bad base URL `{base}`: {e}"))?;
    let scheme = match url.scheme() {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        other => return Err(format!("unsupported URL scheme `{other}` in `{base}`")),
    };
    url.set_scheme(scheme)
        .map_err(|_| format!("cannot use scheme {scheme} for `{base}`"))?;
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        // Credentials or parameters in the base URL would leak into logs.
        return Err("the base URL must not carry credentials or a query".into());
    }
    Ok(url)
}

/// `s` cut to at most `max` bytes on a character boundary, with an ellipsis.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
