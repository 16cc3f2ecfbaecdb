//! The pod's public base URL: where Twilio sends webhooks and opens media streams.

/// The public base URL Twilio reaches, validated: `https://host[:port][/prefix]`
/// (plain `http` is accepted for local tests), without a trailing slash, query or
/// fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl {
    base: String,
}

impl PublicUrl {
    /// Validates and normalizes (trailing slashes dropped) a base URL.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let parsed = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        match parsed.scheme() {
            "https" | "http" => {}
            other => {
                return Err(format!(
                    "scheme must be https (or http for local tests), not {other}"
                ));
            }
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("has no host".into());
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err("must not carry a query string or fragment".into());
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("must not carry credentials".into());
        }
        if parsed.host_str().is_some_and(|h| h.contains('_')) {
            // Twilio refuses callback hosts with underscores.
            return Err("host must not contain underscores (Twilio rejects them)".into());
        }
        Ok(Self {
            base: raw.trim_end_matches('/').to_string(),
        })
    }

    /// The base as configured, without a trailing slash.
    pub fn as_str(&self) -> &str {
        &self.base
    }

    /// `base + path_and_query`: the URL Twilio requested, as it signed it.
    pub fn join(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base, path_and_query)
    }

    /// The Media Streams URL: `wss://host/prefix/twilio/stream` (`ws://` for an
    /// `http` base). No query string: Twilio drops it (error 31920).
    pub fn stream_url(&self) -> String {
        let rest = self
            .base
            .strip_prefix("https://")
            .map(|r| format!("wss://{r}"))
            .or_else(|| {
                self.base
                    .strip_prefix("http://")
                    .map(|r| format!("ws://{r}"))
            })
            .unwrap_or_else(|| self.base.clone());
        format!("{rest}/twilio/stream")
    }
}
