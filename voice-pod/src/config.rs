//! Typed configuration of `voice-pod serve`.
//!
//! Every setting is a flag and an environment variable (the names are the design's
//! contract, see `Pod configuration` in the design document). Clap only collects
//! strings; [`Config::from_args`] validates them and names the offending setting in
//! its error, so a bad value fails the start with exit status 64 (`EX_USAGE`) and a
//! message an operator can act on.
//!
//! This is the top of the pod's settings: it reads the environment and builds each
//! part's own settings type (the scheduler's, the dial limits, the server limits);
//! no other module imports from here. Limits that are not worth a flag live in
//! [`Limits`] with documented defaults; tests shorten them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use callmeback_api::is_e164;

use crate::duration::parse_duration;
use crate::secret::Secret;
use crate::twilio::{Limits, PublicUrl};

/// Exit status for bad configuration (`EX_USAGE` from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// The flags of `voice-pod serve`; each also reads its environment variable.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// App socket (Twilio webhooks, the media stream, the call-me-back API).
    #[arg(long, env = "CALLMEBACK_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Metrics and probes socket.
    #[arg(
        long,
        env = "CALLMEBACK_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: String,
    /// The https base URL Twilio reaches; signatures and the stream URL derive from it.
    #[arg(long, env = "CALLMEBACK_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Directory of persona files (`<name>.yaml`, `.yml` or `.json`).
    #[arg(
        long,
        env = "CALLMEBACK_PERSONA_DIR",
        default_value = "/etc/callmeback/personas"
    )]
    pub persona_dir: PathBuf,
    /// Inbound number -> persona routes.
    #[arg(
        long,
        env = "CALLMEBACK_ROUTES_FILE",
        default_value = "/etc/callmeback/routes.yaml"
    )]
    pub routes_file: PathBuf,
    /// Bearer token for `/v1/*`; the API is disabled when unset.
    #[arg(long, env = "CALLMEBACK_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// How long SIGTERM waits for active calls (`90s`, `5m`, or bare seconds).
    /// Default: the longest persona `maxCallDurationSeconds`.
    #[arg(long, env = "CALLMEBACK_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Twilio account SID (`AC...`).
    #[arg(long, env = "TWILIO_ACCOUNT_SID")]
    pub twilio_account_sid: Option<String>,
    /// Twilio auth token: REST credentials and the key of Twilio's webhook signatures.
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    pub twilio_auth_token: Option<String>,
    /// Twilio REST base URL (the client appends `/2010-04-01/Accounts/{sid}/...`).
    #[arg(long, env = "TWILIO_API_URL", default_value = "https://api.twilio.com")]
    pub twilio_api_url: String,
    /// Caller ID for outbound calls (E.164).
    #[arg(long, env = "TWILIO_FROM_NUMBER")]
    pub twilio_from_number: Option<String>,
    /// PostgreSQL URL; persistence is off when unset.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How often the scheduler looks for due callbacks (default 200ms).
    #[arg(long, env = "CALLMEBACK_SCHEDULER_POLL")]
    pub scheduler_poll: Option<String>,
    /// How long a pod's claim on a due callback holds before another pod may take
    /// it over (default 30s).
    #[arg(long, env = "CALLMEBACK_SCHEDULER_LEASE")]
    pub scheduler_lease: Option<String>,
    /// Callbacks due longer ago than this are not placed (default 15m; a request's
    /// `maxLateness` overrides it).
    #[arg(long, env = "CALLMEBACK_MAX_LATENESS")]
    pub max_lateness: Option<String>,
    /// Open connections on the app port at most (default 1024); more are closed at once.
    #[arg(long, env = "CALLMEBACK_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    /// Time a client has to send its request headers, also the keep-alive idle time
    /// (default 10s).
    #[arg(long, env = "CALLMEBACK_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Time a client has to send its request body (default 10s).
    #[arg(long, env = "CALLMEBACK_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// Concurrent calls this pod takes at most (default 100); beyond it inbound calls
    /// are rejected (busy), `POST /v1/calls` answers 503 and extra streams are closed.
    #[arg(long, env = "CALLMEBACK_MAX_CALLS")]
    pub max_calls: Option<String>,
    /// Countries `POST /v1/calls` may dial: ISO 3166 codes, comma-separated, or `*`
    /// (default: the caller ID's country).
    #[arg(long, env = "CALLMEBACK_DIAL_COUNTRIES", default_value = "")]
    pub dial_countries: String,
    /// E.164 prefixes dialled besides those countries, comma-separated (e.g. `+882`).
    #[arg(long, env = "CALLMEBACK_DIAL_PREFIXES", default_value = "")]
    pub dial_prefixes: String,
    /// Region national numbers in requests are read in (default: the caller ID's).
    #[arg(long, env = "CALLMEBACK_DIAL_DEFAULT_REGION", default_value = "")]
    pub dial_default_region: String,
    /// Calls to one number at most, `N/duration` or `off` (default 5/1h); shared by
    /// the pods through PostgreSQL when configured.
    #[arg(long, env = "CALLMEBACK_DIAL_LIMIT_PER_NUMBER", default_value = "5/1h")]
    pub dial_limit_per_number: String,
    /// Calls for one user at most (a request's `user`, or a user token's), `N/duration`
    /// or `off` (default 20/1h).
    #[arg(long, env = "CALLMEBACK_DIAL_LIMIT_PER_USER", default_value = "20/1h")]
    pub dial_limit_per_user: String,
}

/// Twilio credentials and REST settings.
#[derive(Clone, Debug)]
pub struct TwilioConfig {
    /// `AC` + 32 hex digits.
    pub account_sid: Option<String>,
    /// REST password and webhook signing key.
    pub auth_token: Option<Secret>,
    /// REST base URL without a trailing slash.
    pub api_url: String,
    /// Default caller ID for outbound calls.
    pub from_number: Option<String>,
}

/// The validated configuration of one pod.
#[derive(Clone, Debug)]
pub struct Config {
    /// App socket.
    pub listen: SocketAddr,
    /// Metrics and probes socket.
    pub metrics_listen: SocketAddr,
    /// Public base URL; Twilio endpoints answer 503 without it.
    pub public_url: Option<PublicUrl>,
    /// Persona directory.
    pub persona_dir: PathBuf,
    /// Routes file.
    pub routes_file: PathBuf,
    /// Bearer token of `/v1/*`; `None` disables the API.
    pub api_token: Option<Secret>,
    /// Drain deadline; `None` = the longest persona max call duration.
    pub drain_timeout: Option<Duration>,
    /// Twilio settings.
    pub twilio: TwilioConfig,
    /// PostgreSQL URL; `None` = persistence off.
    pub database_url: Option<Secret>,
    /// Limits and timings.
    pub limits: Limits,
    /// Scheduled callbacks.
    pub scheduler: crate::scheduler::SchedulerConfig,
    /// Connection limits and timeouts of the app server.
    pub server: crate::http::server::ServerLimits,
    /// Concurrent calls at most.
    pub max_calls: usize,
    /// Which destinations `POST /v1/calls` may dial.
    pub dial: crate::dial_guard::DialSettings,
    /// How often `POST /v1/calls` may ring one number or call for one user.
    pub dial_limits: crate::dial_rate::DialLimits,
}

/// Default of `CALLMEBACK_MAX_CALLS`.
pub const DEFAULT_MAX_CALLS: usize = 100;

/// A setting that failed validation. The message names the variable and the flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid {env} (--{flag}): {reason}")]
pub struct ConfigError {
    /// Environment variable name.
    pub env: &'static str,
    /// Flag name without dashes.
    pub flag: &'static str,
    /// What is wrong (never the value of a secret).
    pub reason: String,
}

impl ConfigError {
    fn new(env: &'static str, flag: &'static str, reason: impl Into<String>) -> Self {
        Self {
            env,
            flag,
            reason: reason.into(),
        }
    }
}

impl Config {
    /// Validates the raw flags.
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let listen = parse_addr(&args.listen)
            .map_err(|r| ConfigError::new("CALLMEBACK_LISTEN", "listen", r))?;
        let metrics_listen = parse_addr(&args.metrics_listen)
            .map_err(|r| ConfigError::new("CALLMEBACK_METRICS_LISTEN", "metrics-listen", r))?;
        let public_url = non_empty(args.public_url)
            .map(|u| PublicUrl::parse(&u))
            .transpose()
            .map_err(|r| ConfigError::new("CALLMEBACK_PUBLIC_URL", "public-url", r))?;
        let api_token = match args.api_token {
            None => None,
            Some(t) if t.is_empty() => {
                return Err(ConfigError::new(
                    "CALLMEBACK_API_TOKEN",
                    "api-token",
                    "is set but empty; unset it to disable the API",
                ));
            }
            Some(t) if t.len() < 16 => {
                return Err(ConfigError::new(
                    "CALLMEBACK_API_TOKEN",
                    "api-token",
                    "is shorter than 16 characters; use a long random token",
                ));
            }
            Some(t) => Some(Secret::new(t)),
        };
        let drain_timeout = non_empty(args.drain_timeout)
            .map(|d| parse_duration(&d))
            .transpose()
            .map_err(|r| ConfigError::new("CALLMEBACK_DRAIN_TIMEOUT", "drain-timeout", r))?;
        let account_sid = non_empty(args.twilio_account_sid);
        if let Some(sid) = &account_sid
            && !is_account_sid(sid)
        {
            return Err(ConfigError::new(
                "TWILIO_ACCOUNT_SID",
                "twilio-account-sid",
                "must be AC followed by 32 hex digits",
            ));
        }
        let auth_token = non_empty(args.twilio_auth_token).map(Secret::new);
        let api_url = args.twilio_api_url.trim_end_matches('/').to_string();
        match url::Url::parse(&api_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
            _ => {
                return Err(ConfigError::new(
                    "TWILIO_API_URL",
                    "twilio-api-url",
                    format!("{api_url:?} is not an http(s) URL"),
                ));
            }
        }
        let from_number = non_empty(args.twilio_from_number);
        if let Some(n) = &from_number
            && !is_e164(n)
        {
            return Err(ConfigError::new(
                "TWILIO_FROM_NUMBER",
                "twilio-from-number",
                "must be an E.164 number such as +14155550100",
            ));
        }
        let mut scheduler = crate::scheduler::SchedulerConfig::default();
        if let Some(p) = non_empty(args.scheduler_poll) {
            scheduler.poll_interval = parse_duration(&p)
                .and_then(|d| positive(d, "the poll interval"))
                .map_err(|r| ConfigError::new("CALLMEBACK_SCHEDULER_POLL", "scheduler-poll", r))?;
        }
        if let Some(l) = non_empty(args.scheduler_lease) {
            scheduler.lease = parse_duration(&l)
                .and_then(|d| {
                    if d < crate::scheduler::MIN_LEASE {
                        Err(format!(
                            "must be at least {:?} (a placement must fit well inside it)",
                            crate::scheduler::MIN_LEASE
                        ))
                    } else {
                        Ok(d)
                    }
                })
                .map_err(|r| {
                    ConfigError::new("CALLMEBACK_SCHEDULER_LEASE", "scheduler-lease", r)
                })?;
        }
        if let Some(m) = non_empty(args.max_lateness) {
            scheduler.max_lateness = parse_duration(&m)
                .and_then(|d| positive(d, "the lateness limit"))
                .map_err(|r| ConfigError::new("CALLMEBACK_MAX_LATENESS", "max-lateness", r))?;
        }
        let mut server = crate::http::server::ServerLimits::default();
        if let Some(n) = non_empty(args.max_connections) {
            server.max_connections = parse_count(&n, 1_000_000).map_err(|r| {
                ConfigError::new("CALLMEBACK_MAX_CONNECTIONS", "max-connections", r)
            })?;
        }
        if let Some(t) = non_empty(args.header_timeout) {
            server.header_timeout = parse_duration(&t)
                .and_then(|d| bounded(d, Duration::from_millis(100), Duration::from_secs(3600)))
                .map_err(|r| ConfigError::new("CALLMEBACK_HEADER_TIMEOUT", "header-timeout", r))?;
        }
        if let Some(t) = non_empty(args.body_timeout) {
            server.body_timeout = parse_duration(&t)
                .and_then(|d| bounded(d, Duration::from_millis(100), Duration::from_secs(3600)))
                .map_err(|r| ConfigError::new("CALLMEBACK_BODY_TIMEOUT", "body-timeout", r))?;
        }
        let max_calls = match non_empty(args.max_calls) {
            Some(n) => parse_count(&n, 100_000)
                .map_err(|r| ConfigError::new("CALLMEBACK_MAX_CALLS", "max-calls", r))?,
            None => DEFAULT_MAX_CALLS,
        };
        // Each setting alone first, so the error names the one that is wrong.
        use crate::dial_guard::DialSettings;
        for (env, flag, result) in [
            (
                "CALLMEBACK_DIAL_COUNTRIES",
                "dial-countries",
                DialSettings::new(&args.dial_countries, "", ""),
            ),
            (
                "CALLMEBACK_DIAL_PREFIXES",
                "dial-prefixes",
                DialSettings::new("*", &args.dial_prefixes, ""),
            ),
            (
                "CALLMEBACK_DIAL_DEFAULT_REGION",
                "dial-default-region",
                DialSettings::new("*", "", &args.dial_default_region),
            ),
        ] {
            result.map_err(|e| ConfigError::new(env, flag, e.to_string()))?;
        }
        let dial = DialSettings::new(
            &args.dial_countries,
            &args.dial_prefixes,
            &args.dial_default_region,
        )
        .map_err(|e| {
            ConfigError::new("CALLMEBACK_DIAL_COUNTRIES", "dial-countries", e.to_string())
        })?;
        // Empty (as a default-constructed `ServeArgs` has it) means the default.
        let limit = |raw: &str, default, env, flag| match raw.trim() {
            "" => Ok(Some(default)),
            raw => {
                crate::dial_rate::RateLimit::parse(raw).map_err(|r| ConfigError::new(env, flag, r))
            }
        };
        let dial_limits = crate::dial_rate::DialLimits {
            per_number: limit(
                &args.dial_limit_per_number,
                crate::dial_rate::DEFAULT_PER_NUMBER,
                "CALLMEBACK_DIAL_LIMIT_PER_NUMBER",
                "dial-limit-per-number",
            )?,
            per_user: limit(
                &args.dial_limit_per_user,
                crate::dial_rate::DEFAULT_PER_USER,
                "CALLMEBACK_DIAL_LIMIT_PER_USER",
                "dial-limit-per-user",
            )?,
        };
        Ok(Self {
            listen,
            metrics_listen,
            public_url,
            persona_dir: args.persona_dir,
            routes_file: args.routes_file,
            api_token,
            drain_timeout,
            twilio: TwilioConfig {
                account_sid,
                auth_token,
                api_url,
                from_number,
            },
            database_url: non_empty(args.database_url).map(Secret::new),
            limits: Limits::default(),
            scheduler,
            server,
            max_calls,
            dial,
            dial_limits,
        })
    }

    /// Settings missing for real Twilio calls, for a warning at start.
    pub fn missing_for_twilio(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.public_url.is_none() {
            missing.push("CALLMEBACK_PUBLIC_URL");
        }
        if self.twilio.auth_token.is_none() {
            missing.push("TWILIO_AUTH_TOKEN");
        }
        missing
    }
}

fn positive(d: Duration, what: &str) -> Result<Duration, String> {
    if d.is_zero() {
        Err(format!("{what} must be longer than zero"))
    } else {
        Ok(d)
    }
}

/// A whole number from 1 to `max`.
fn parse_count(raw: &str, max: usize) -> Result<usize, String> {
    match raw.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("{raw:?} is not a whole number from 1 to {max}")),
    }
}

/// `d` within `min..=max`.
fn bounded(d: Duration, min: Duration, max: Duration) -> Result<Duration, String> {
    if d < min || d > max {
        Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ))
    } else {
        Ok(d)
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn parse_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|_| format!("{raw:?} is not a socket address such as 0.0.0.0:8080"))
}

fn is_account_sid(s: &str) -> bool {
    s.len() == 34 && s.starts_with("AC") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// This pod's name (`POD_NAME`, else `HOSTNAME`, which Kubernetes sets to the pod
/// name): on call records and in the scheduler's claims, so both name the same pod.
pub fn pod_name() -> Option<String> {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_owned())
        .find(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            listen: "127.0.0.1:8080".into(),
            metrics_listen: "127.0.0.1:9090".into(),
            twilio_api_url: "https://api.twilio.com".into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_settings_name_the_variable() {
        // Proves a bad value is reported with its environment variable and flag.
        let mut a = args();
        a.drain_timeout = Some("forever".into());
        let err = Config::from_args(a).unwrap_err().to_string();
        assert!(
            err.contains("CALLMEBACK_DRAIN_TIMEOUT") && err.contains("--drain-timeout"),
            "{err}"
        );

        let mut a = args();
        a.public_url = Some("ftp://x".into());
        assert!(
            Config::from_args(a)
                .unwrap_err()
                .to_string()
                .contains("CALLMEBACK_PUBLIC_URL")
        );

        let mut a = args();
        a.twilio_account_sid = Some("ACnothex".into());
        assert!(
            Config::from_args(a)
                .unwrap_err()
                .to_string()
                .contains("TWILIO_ACCOUNT_SID")
        );

        let mut a = args();
        a.listen = "8080".into();
        assert!(
            Config::from_args(a)
                .unwrap_err()
                .to_string()
                .contains("CALLMEBACK_LISTEN")
        );
    }

    #[test]
    fn secrets_never_print() {
        // Proves Debug output of the config does not contain the token.
        let mut a = args();
        a.api_token = Some("super-secret-token-123".into());
        a.twilio_auth_token = Some("twilio-secret".into());
        let cfg = Config::from_args(a).unwrap();
        let dbg = format!("{cfg:?}");
        assert!(
            !dbg.contains("super-secret") && !dbg.contains("twilio-secret"),
            "{dbg}"
        );
    }

    #[test]
    fn stream_url_has_no_query_and_uses_wss() {
        // Proves the stream URL derives from the public base with wss and no query.
        let u = PublicUrl::parse("https://pod.example.com/voice/").unwrap();
        assert_eq!(u.stream_url(), "wss://pod.example.com/voice/twilio/stream");
        assert_eq!(
            u.join("/twilio/voice?x=1"),
            "https://pod.example.com/voice/twilio/voice?x=1"
        );
        assert!(PublicUrl::parse("https://a.example.com/?q=1").is_err());
        assert!(PublicUrl::parse("https://bad_host.example.com").is_err());
    }

    #[test]
    fn e164_validation() {
        // Proves E.164 checks: plus sign, 7-15 digits, no leading zero.
        assert!(is_e164("+14155550100"));
        assert!(!is_e164("14155550100"));
        assert!(!is_e164("+0123456789"));
        assert!(!is_e164("+1415555010a"));
        assert!(!is_e164("+1234567890123456"));
    }
}
