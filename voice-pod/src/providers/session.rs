//! The one reconnecting-socket loop of the streaming provider sessions (Deepgram,
//! ElevenLabs): wait out a jittered backoff, open a fresh socket, restore the
//! session on it (replay audio, resend unspoken text), give up after the policy's
//! attempts. While the socket is down the call's input keeps being taken (audio into
//! the replay buffer, commands applied to local state), so nothing the call sends is
//! lost or blocks.
//!
//! It is the only reconnect layer: a session that gives up reports
//! `Error(ReconnectsExhausted)` once and the engine ends the call; it does not dial
//! again. Each failed attempt counts once in `voice_socket_errors_total{peer,kind}`,
//! each restored socket once in `voice_provider_reconnects_total{peer}`.

use std::fmt::Display;

use tokio::time::sleep;

use super::backoff::Backoff;
use super::socket::Ws;
use super::{SttError, TtsError};
use crate::metrics::{Metrics, Peer, SocketErrorKind};

/// A provider error, as the reconnect loop sees it.
pub(crate) trait SessionError: Display + Sized {
    /// Its `voice_socket_errors_total{kind}`.
    fn metric_kind(&self) -> SocketErrorKind;
    /// Whether another attempt cannot help (the key was refused).
    fn is_fatal(&self) -> bool;
    /// The error a session gives up with.
    fn exhausted(attempts: u32, last: String) -> Self;
}

/// How a session's time on one socket ended.
pub(crate) enum Phase<E> {
    /// Closed as asked (the call closed or cancelled the session).
    Finished,
    /// The socket broke: reconnect.
    Dropped(E),
    /// Nothing another socket could fix (a refused key, a fatal provider error).
    Fatal(E),
}

/// A provider session whose socket can be re-opened.
pub(crate) trait Redial {
    /// What the call sends while the socket is down.
    type Input: Send;
    /// The provider's error.
    type Error: SessionError + Send;

    /// Whose socket (metric label).
    fn peer(&self) -> Peer;
    /// The reconnect policy.
    fn backoff(&self) -> Backoff;
    /// Where the counts go.
    fn metrics(&self) -> &Metrics;
    /// The session's cancellation.
    fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFutureOwned;
    /// The call's next input; `None` when the call side closed. Cancel-safe: it is
    /// raced against the backoff and the handshake.
    fn next_input(&mut self) -> impl Future<Output = Option<Self::Input>> + Send;
    /// Takes one input while down; `Ok(false)`: the session is over (closed by the
    /// call while disconnected).
    fn while_down(
        &mut self,
        input: Self::Input,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Opens a fresh socket (owned: it runs while inputs are still taken).
    fn open(&self) -> impl Future<Output = Result<Ws, Self::Error>> + Send + 'static;
    /// Restores the session on the fresh socket and tells the call it is back;
    /// `Ok(false)` when the call side is gone.
    fn restore(&mut self, ws: &mut Ws) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Runs the session on a socket until it ends or breaks.
    fn connected(&mut self, ws: Ws) -> impl Future<Output = Phase<Self::Error>> + Send;
    /// Tells the call the session gave up (its last event).
    fn gave_up(&mut self, error: Self::Error) -> impl Future<Output = ()> + Send;
}

/// A session's whole life: on `first` (or, when the first connect failed, on the
/// socket the reconnect loop opens), through every drop and reconnect, until it
/// finishes or gives up.
pub(crate) async fn run<S: Redial + Send>(mut s: S, first: Option<Ws>) {
    let peer = s.peer();
    let mut ws = match first {
        Some(ws) => ws,
        None => match reconnect(&mut s).await {
            Some(ws) => ws,
            None => return,
        },
    };
    loop {
        match s.connected(ws).await {
            Phase::Finished => return,
            Phase::Fatal(e) => {
                s.metrics().socket_error(peer, e.metric_kind());
                s.gave_up(e).await;
                return;
            }
            Phase::Dropped(e) => {
                s.metrics().socket_error(peer, e.metric_kind());
                tracing::warn!(error = %e, peer = peer.as_str(), "provider socket dropped; reconnecting");
                match reconnect(&mut s).await {
                    Some(new_ws) => ws = new_ws,
                    None => return,
                }
            }
        }
    }
}

/// [`redial`], telling the call when it gives up.
async fn reconnect<S: Redial + Send>(s: &mut S) -> Option<Ws> {
    match redial(s).await {
        Ok(ws) => ws,
        Err(e) => {
            s.gave_up(e).await;
            None
        }
    }
}

/// Reconnects `s` with backoff. `Ok(Some(ws))`: restored on `ws`; `Ok(None)`: the
/// session ended meanwhile (cancelled, or closed by the call); `Err`: gave up
/// (fatal error, or every attempt failed).
pub(crate) async fn redial<S: Redial + Send>(s: &mut S) -> Result<Option<Ws>, S::Error> {
    let backoff = s.backoff();
    let peer = s.peer();
    let mut last = String::from("socket dropped");
    for attempt in 0..backoff.attempts {
        let delay = sleep(backoff.delay(attempt));
        tokio::pin!(delay);
        let cancelled = s.cancelled();
        tokio::pin!(cancelled);
        // Wait out the delay, taking the call's input.
        loop {
            tokio::select! {
                _ = &mut cancelled => return Ok(None),
                _ = &mut delay => break,
                input = s.next_input() => match input {
                    Some(i) => if !s.while_down(i).await? { return Ok(None) },
                    None => return Ok(None),
                },
            }
        }
        let open = s.open();
        tokio::pin!(open);
        let opened = loop {
            tokio::select! {
                _ = &mut cancelled => return Ok(None),
                r = &mut open => break r,
                input = s.next_input() => match input {
                    Some(i) => if !s.while_down(i).await? { return Ok(None) },
                    None => return Ok(None),
                },
            }
        };
        let failure = match opened {
            Ok(mut ws) => match s.restore(&mut ws).await {
                Ok(true) => {
                    s.metrics()
                        .provider_reconnects
                        .with_label_values(&[peer.as_str()])
                        .inc();
                    tracing::debug!(attempt, peer = peer.as_str(), "socket restored");
                    return Ok(Some(ws));
                }
                Ok(false) => return Ok(None),
                Err(e) => e,
            },
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => e,
        };
        s.metrics().socket_error(peer, failure.metric_kind());
        last = failure.to_string();
    }
    Err(S::Error::exhausted(backoff.attempts, last))
}

impl SessionError for SttError {
    fn metric_kind(&self) -> SocketErrorKind {
        SttError::metric_kind(self)
    }

    fn is_fatal(&self) -> bool {
        matches!(self, SttError::Unauthorized(_) | SttError::Config(_))
    }

    fn exhausted(attempts: u32, last: String) -> Self {
        SttError::ReconnectsExhausted { attempts, last }
    }
}

impl SessionError for TtsError {
    fn metric_kind(&self) -> SocketErrorKind {
        TtsError::metric_kind(self)
    }

    fn is_fatal(&self) -> bool {
        matches!(self, TtsError::Unauthorized(_) | TtsError::Config(_))
    }

    fn exhausted(attempts: u32, last: String) -> Self {
        TtsError::ReconnectsExhausted { attempts, last }
    }
}
