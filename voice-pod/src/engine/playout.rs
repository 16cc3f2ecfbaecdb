//! Reply audio to Twilio, paced to real time, and a record of what the caller heard.
//!
//! TTS delivers a sentence of audio in a burst, much faster than it plays. Sending
//! it all at once would make a barge-in `clear` discard seconds of queued audio at
//! Twilio and leave us guessing what was heard. So the playout keeps a *play clock*
//! (when everything sent so far will have finished playing) and only sends while
//! the lead over real time is below [`PlayoutConfig::lead`]. Every chunk ends with
//! a `mark`; Twilio echoes it when that audio has played, so on a barge-in the
//! history keeps the chunks whose marks came back, plus the proportion of the chunk
//! that was playing, by elapsed time.
//!
//! A reply generated preemptively (before the caller's turn was confirmed) opens
//! *held* chunks: their audio is buffered but not sent until [`Playout::release_held`],
//! or dropped with [`Playout::discard`].
//!
//! Sans-IO: the session feeds audio and marks, asks [`Playout::poll`] for frames to
//! send, and sleeps until [`Playout::next_wake`].

use std::collections::VecDeque;

use tokio::time::{Duration, Instant};

/// Bytes in one 20 ms frame of 8 kHz mu-law.
pub const FRAME_BYTES: usize = 160;
/// Duration of one frame.
pub const FRAME: Duration = Duration::from_millis(20);
/// Mu-law silence, used to pad a chunk's last partial frame.
pub const MULAW_SILENCE: u8 = 0xFF;
/// A sent chunk whose mark has not come back this long after it should have finished
/// playing counts as played (a lost echo must not stall the dialogue).
pub const MARK_GRACE: Duration = Duration::from_millis(1500);

/// Pacing knobs.
#[derive(Clone, Debug)]
pub struct PlayoutConfig {
    /// Audio kept queued at Twilio ahead of real time.
    pub lead: Duration,
    /// Refill once the lead falls to this (batches sends into fewer messages).
    pub low_water: Duration,
    /// Upper bound on buffered, unsent reply audio (a runaway TTS must not grow memory).
    pub max_buffered: Duration,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            lead: Duration::from_millis(260),
            low_water: Duration::from_millis(160),
            max_buffered: Duration::from_secs(120),
        }
    }
}

/// What the playout asks the session to send to Twilio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlayoutOut {
    /// Mu-law audio, a whole number of frames.
    Audio(Vec<u8>),
    /// A mark after a chunk's last frame.
    Mark(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Audio still arriving or unsent.
    Open,
    /// All audio arrived (`end_chunk`) but not all sent.
    Ended,
    /// Everything sent, mark sent, waiting for Twilio's echo.
    Sent,
    /// Twilio echoed the mark: the caller heard it all.
    Played,
}

#[derive(Debug)]
struct Chunk {
    id: u64,
    mark: String,
    text: String,
    state: ChunkState,
    /// Unsent audio.
    pending: VecDeque<u8>,
    frames_sent: u32,
    /// When this chunk's first frame starts playing at the caller (estimated).
    play_start: Option<Instant>,
    /// Preemptive: buffered, not sent until released.
    held: bool,
}

/// What the caller heard of an interrupted reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heard {
    /// The heard text: whole chunks plus the heard part of the one playing.
    pub text: String,
    /// Whether anything was cut off.
    pub truncated: bool,
}

/// Pacing and hearing record for one call's replies.
#[derive(Debug)]
pub struct Playout {
    cfg: PlayoutConfig,
    chunks: VecDeque<Chunk>,
    next_id: u64,
    mark_prefix: String,
    /// When all audio sent so far will have finished playing.
    play_clock: Option<Instant>,
    /// Whether the current reply has started playing (underruns only count after).
    reply_playing: bool,
    late_frames: u64,
    underruns: u64,
    buffered: usize,
    dropped_bytes: u64,
}

impl Playout {
    /// An idle playout; marks are named `<mark_prefix><n>`.
    pub fn new(cfg: PlayoutConfig, mark_prefix: impl Into<String>) -> Self {
        Self {
            cfg,
            chunks: VecDeque::new(),
            next_id: 0,
            mark_prefix: mark_prefix.into(),
            play_clock: None,
            reply_playing: false,
            late_frames: 0,
            underruns: 0,
            buffered: 0,
            dropped_bytes: 0,
        }
    }

    /// Opens a chunk whose audio will follow; chunks play in the order opened.
    pub fn begin_chunk(&mut self, text: impl Into<String>) -> u64 {
        self.open(text.into(), false)
    }

    /// Opens a held chunk (a preemptive reply): buffered until [`Playout::release_held`].
    pub fn begin_held_chunk(&mut self, text: impl Into<String>) -> u64 {
        self.open(text.into(), true)
    }

    /// Lets held chunks play (the caller's turn was confirmed).
    pub fn release_held(&mut self) {
        for c in self.chunks.iter_mut() {
            c.held = false;
        }
    }

    /// Drops chunks (a discarded preemptive reply, a cancelled context).
    pub fn discard(&mut self, ids: &[u64]) {
        let mut freed = 0;
        self.chunks.retain(|c| {
            let keep = !ids.contains(&c.id);
            if !keep {
                freed += c.pending.len();
            }
            keep
        });
        self.buffered = self.buffered.saturating_sub(freed);
    }

    fn open(&mut self, text: String, held: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.chunks.push_back(Chunk {
            id,
            mark: format!("{}{}", self.mark_prefix, id),
            text,
            state: ChunkState::Open,
            pending: VecDeque::new(),
            frames_sent: 0,
            play_start: None,
            held,
        });
        id
    }

    /// Audio for chunk `id` (any length; framing happens here).
    pub fn push_audio(&mut self, id: u64, audio: &[u8]) {
        let max = duration_bytes(self.cfg.max_buffered);
        let Some(c) = self.chunks.iter_mut().find(|c| c.id == id) else {
            return;
        };
        if c.state != ChunkState::Open {
            return;
        }
        let room = max.saturating_sub(self.buffered);
        let take = audio.len().min(room);
        c.pending.extend(&audio[..take]);
        self.buffered += take;
        self.dropped_bytes += (audio.len() - take) as u64;
    }

    /// All audio of chunk `id` has arrived; its last partial frame is padded.
    pub fn end_chunk(&mut self, id: u64) {
        if let Some(c) = self.chunks.iter_mut().find(|c| c.id == id)
            && c.state == ChunkState::Open
        {
            let rem = c.pending.len() % FRAME_BYTES;
            if rem != 0 {
                let pad = FRAME_BYTES - rem;
                c.pending.extend(std::iter::repeat_n(MULAW_SILENCE, pad));
                self.buffered += pad;
            }
            c.state = ChunkState::Ended;
        }
    }

    /// Twilio echoed a mark. Returns whether it belonged to a live chunk.
    pub fn on_mark(&mut self, name: &str) -> bool {
        let mut found = false;
        for c in self.chunks.iter_mut() {
            if c.mark == name && c.state == ChunkState::Sent {
                c.state = ChunkState::Played;
                found = true;
            }
        }
        // Marks arrive in order: everything before a played chunk has played too.
        if found {
            let mut seen = false;
            for c in self.chunks.iter_mut().rev() {
                if c.mark == name {
                    seen = true;
                } else if seen && c.state == ChunkState::Sent {
                    c.state = ChunkState::Played;
                }
            }
        }
        found
    }

    /// Whether reply audio (not held) is queued here or still playing at the caller.
    pub fn is_speaking(&self, now: Instant) -> bool {
        self.chunks
            .iter()
            .any(|c| !c.held && c.state != ChunkState::Played)
            || self.play_clock.is_some_and(|t| t > now)
    }

    /// Whether every chunk that is not held was sent and echoed.
    pub fn all_played(&self) -> bool {
        self.chunks
            .iter()
            .all(|c| c.held || c.state == ChunkState::Played)
    }

    /// Whether some chunk (not held) still waits for audio or sending.
    pub fn has_unsent(&self) -> bool {
        self.chunks
            .iter()
            .any(|c| !c.held && matches!(c.state, ChunkState::Open | ChunkState::Ended))
    }

    /// Whether chunk `id` was played (echoed or expired) or is gone.
    pub fn chunk_played(&self, id: u64) -> bool {
        self.chunks
            .iter()
            .find(|c| c.id == id)
            .is_none_or(|c| c.state == ChunkState::Played)
    }

    /// Counts sent chunks as played once they should long have finished: a lost mark
    /// echo must not stall the dialogue.
    pub fn expire_marks(&mut self, now: Instant) {
        for c in self.chunks.iter_mut() {
            if c.state == ChunkState::Sent
                && let Some(start) = c.play_start
                && start + FRAME * c.frames_sent + MARK_GRACE <= now
            {
                c.state = ChunkState::Played;
            }
        }
    }

    /// When [`Playout::expire_marks`] next has work.
    pub fn next_mark_expiry(&self) -> Option<Instant> {
        self.chunks
            .iter()
            .filter(|c| c.state == ChunkState::Sent)
            .filter_map(|c| c.play_start.map(|s| s + FRAME * c.frames_sent + MARK_GRACE))
            .min()
    }

    /// Frames sent later than the play clock needed them (underrun gaps mid-reply).
    pub fn late_frames(&self) -> u64 {
        self.late_frames
    }

    /// Gaps in a reply's playback (the queue ran dry while more audio was coming).
    pub fn underruns(&self) -> u64 {
        self.underruns
    }

    /// Audio dropped by the buffer bound.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes
    }

    /// Sends what the lead allows: audio in whole frames, a mark after each chunk.
    pub fn poll(&mut self, now: Instant) -> Vec<PlayoutOut> {
        let mut out = Vec::new();
        let lead_bytes = duration_bytes(self.cfg.lead);
        let low_bytes = duration_bytes(self.cfg.low_water);
        let ahead = self.ahead(now);
        // Batch: refill only when the lead fell to the low-water mark, except for the
        // very start of a reply, which goes out at once.
        if self.reply_playing && ahead > low_bytes {
            return out;
        }
        let mut budget = lead_bytes.saturating_sub(ahead);
        let mut audio: Vec<u8> = Vec::new();
        for c in self.chunks.iter_mut() {
            match c.state {
                ChunkState::Played | ChunkState::Sent => continue,
                ChunkState::Open | ChunkState::Ended => {}
            }
            if c.held {
                break;
            }
            while budget >= FRAME_BYTES && c.pending.len() >= FRAME_BYTES {
                let start = match self.play_clock {
                    Some(t) if t > now => t,
                    Some(_) if self.reply_playing => {
                        // The caller's playback ran dry mid-reply.
                        self.late_frames += 1;
                        if audio.is_empty() {
                            self.underruns += 1;
                        }
                        now
                    }
                    _ => now,
                };
                if c.play_start.is_none() {
                    c.play_start = Some(start);
                }
                audio.extend(c.pending.drain(..FRAME_BYTES));
                self.buffered -= FRAME_BYTES;
                c.frames_sent += 1;
                self.play_clock = Some(start + FRAME);
                self.reply_playing = true;
                budget -= FRAME_BYTES;
            }
            if c.state == ChunkState::Ended && c.pending.is_empty() {
                if !audio.is_empty() {
                    out.push(PlayoutOut::Audio(std::mem::take(&mut audio)));
                }
                c.state = ChunkState::Sent;
                out.push(PlayoutOut::Mark(c.mark.clone()));
                continue;
            }
            // This chunk is waiting for audio (or the budget ran out): later chunks wait.
            break;
        }
        if !audio.is_empty() {
            out.push(PlayoutOut::Audio(audio));
        }
        if !self.has_unsent() {
            // Between replies, a gap is not an underrun.
            self.reply_playing = false;
        }
        out
    }

    /// When [`Playout::poll`] can next send something (`None`: waiting for audio).
    pub fn next_wake(&self, now: Instant) -> Option<Instant> {
        let sendable = self
            .chunks
            .iter()
            .find(|c| matches!(c.state, ChunkState::Open | ChunkState::Ended))?;
        if sendable.held
            || (sendable.pending.len() < FRAME_BYTES && sendable.state == ChunkState::Open)
        {
            return None;
        }
        let clock = self.play_clock.unwrap_or(now);
        let low = self.cfg.low_water;
        Some(clock.checked_sub(low).unwrap_or(now).max(now))
    }

    /// The caller interrupted: drops all unsent audio (held chunks stay) and returns
    /// what was heard of the chunks since the last [`Playout::take_heard`]/`interrupt`.
    pub fn interrupt(&mut self, now: Instant) -> Heard {
        let mut parts: Vec<String> = Vec::new();
        let mut truncated = false;
        let (held, live): (VecDeque<Chunk>, VecDeque<Chunk>) = std::mem::take(&mut self.chunks)
            .into_iter()
            .partition(|c| c.held);
        self.chunks = held;
        for c in live {
            match c.state {
                ChunkState::Played => parts.push(c.text),
                _ => {
                    let sent = Duration::from_millis(u64::from(c.frames_sent) * 20);
                    let Some(start) = c.play_start else {
                        truncated = true;
                        continue;
                    };
                    let elapsed = now.saturating_duration_since(start);
                    let fully_sent = c.state == ChunkState::Sent;
                    if fully_sent && elapsed + FRAME >= sent {
                        // Its mark is in flight: the caller heard it.
                        parts.push(c.text);
                        continue;
                    }
                    truncated = true;
                    if elapsed.is_zero() {
                        continue;
                    }
                    // Total length is known only for fully received chunks; otherwise
                    // what was sent is a lower bound, which errs towards "heard less".
                    let total_frames = c.frames_sent as usize + c.pending.len() / FRAME_BYTES;
                    let total = Duration::from_millis(total_frames as u64 * 20);
                    let frac = (elapsed.as_secs_f64() / total.as_secs_f64().max(0.001)).min(1.0);
                    if let Some(p) = truncate_words(&c.text, frac) {
                        parts.push(p);
                    }
                }
            }
        }
        self.buffered = self.chunks.iter().map(|c| c.pending.len()).sum();
        self.play_clock = None;
        self.reply_playing = false;
        let mut text = parts.join(" ");
        if truncated && !text.is_empty() {
            text.push('—');
        }
        Heard { text, truncated }
    }

    /// After a reply ended normally: the texts of its chunks, forgetting them.
    /// Chunks still playing stay tracked until their marks arrive.
    pub fn take_heard(&mut self) -> String {
        let mut parts = Vec::new();
        while let Some(c) = self.chunks.front() {
            if c.state != ChunkState::Played {
                break;
            }
            if let Some(c) = self.chunks.pop_front() {
                parts.push(c.text);
            }
        }
        parts.join(" ")
    }

    fn ahead(&self, now: Instant) -> usize {
        match self.play_clock {
            Some(t) if t > now => duration_bytes(t - now),
            _ => 0,
        }
    }
}

fn duration_bytes(d: Duration) -> usize {
    (d.as_millis() as usize / 20) * FRAME_BYTES
}

/// The first `frac` of `text` by characters, cut back to a word boundary.
fn truncate_words(text: &str, frac: f64) -> Option<String> {
    let n = text.chars().count();
    let keep = ((n as f64) * frac).floor() as usize;
    let prefix: String = text.chars().take(keep).collect();
    if keep >= n {
        return Some(prefix);
    }
    // Drop the partly spoken last word.
    let cut = match text.chars().nth(keep) {
        Some(c) if c.is_whitespace() => prefix.as_str(),
        _ => prefix
            .rsplit_once(char::is_whitespace)
            .map_or("", |(a, _)| a),
    };
    let cut = cut.trim_end_matches(|c: char| c.is_whitespace() || c == ',');
    if cut.is_empty() {
        None
    } else {
        Some(cut.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn frames(n: usize) -> Vec<u8> {
        vec![0x55; n * FRAME_BYTES]
    }

    fn audio_frames(out: &[PlayoutOut]) -> usize {
        out.iter()
            .map(|o| match o {
                PlayoutOut::Audio(a) => {
                    assert_eq!(a.len() % FRAME_BYTES, 0, "whole frames only");
                    a.len() / FRAME_BYTES
                }
                PlayoutOut::Mark(_) => 0,
            })
            .sum()
    }

    #[test]
    fn first_audio_leaves_at_once_and_the_lead_is_bounded() {
        // Proves a burst of TTS audio is sent only up to the lead, then paced.
        let mut p = Playout::new(PlayoutConfig::default(), "m");
        let now = Instant::now();
        let id = p.begin_chunk("Hello there.");
        p.push_audio(id, &frames(100)); // 2 s of audio in one burst
        let out = p.poll(now);
        assert_eq!(audio_frames(&out), 13, "260 ms lead = 13 frames");
        // Nothing more until the lead drains to the low-water mark.
        assert!(p.poll(now + ms(50)).is_empty());
        let wake = p.next_wake(now).unwrap();
        assert_eq!(wake, now + ms(100));
        let out = p.poll(wake);
        assert_eq!(audio_frames(&out), 5);
        // Over 2 s, the total sent tracks real time plus the lead.
        let mut t = wake;
        let mut sent = 18;
        while let Some(w) = p.next_wake(t) {
            if w > now + ms(1000) {
                break;
            }
            t = w;
            sent += audio_frames(&p.poll(t));
        }
        assert!((sent as i64 - (1000 + 260) / 20).abs() <= 5, "sent {sent}");
        assert_eq!(p.late_frames(), 0);
    }

    #[test]
    fn each_chunk_ends_with_its_mark_and_a_partial_frame_is_padded() {
        // Proves mark-after-chunk ordering and 160-byte framing.
        let mut p = Playout::new(PlayoutConfig::default(), "r1-");
        let now = Instant::now();
        let a = p.begin_chunk("One.");
        let b = p.begin_chunk("Two.");
        p.push_audio(a, &[0x11; 250]);
        p.end_chunk(a);
        p.push_audio(b, &frames(2));
        p.end_chunk(b);
        let out = p.poll(now);
        assert_eq!(
            out,
            vec![
                PlayoutOut::Audio([vec![0x11; 250], vec![MULAW_SILENCE; 70]].concat()),
                PlayoutOut::Mark("r1-0".into()),
                PlayoutOut::Audio(frames(2)),
                PlayoutOut::Mark("r1-1".into()),
            ]
        );
        assert!(p.on_mark("r1-1"));
        assert!(p.all_played(), "an echo implies earlier marks played too");
        assert_eq!(p.take_heard(), "One. Two.");
    }

    #[test]
    fn barge_in_keeps_played_chunks_and_the_heard_part_of_the_playing_one() {
        // Proves the history after an interruption is what the caller actually heard.
        let mut p = Playout::new(
            PlayoutConfig {
                lead: ms(2000),
                ..PlayoutConfig::default()
            },
            "m",
        );
        let now = Instant::now();
        let a = p.begin_chunk("Sure, I can help.");
        let b = p.begin_chunk("The store opens at nine and closes at five.");
        let c = p.begin_chunk("Anything else?");
        p.push_audio(a, &frames(25));
        p.end_chunk(a);
        p.push_audio(b, &frames(50)); // 1 s
        p.end_chunk(b);
        p.push_audio(c, &frames(25));
        p.end_chunk(c);
        p.poll(now);
        assert!(p.on_mark("m0"));
        // 0.5 s into chunk b (which started at 0.5 s).
        let heard = p.interrupt(now + ms(1000));
        assert!(heard.truncated);
        assert_eq!(heard.text, "Sure, I can help. The store opens at—");
        // Marks echoed after the clear belong to nothing any more.
        assert!(!p.on_mark("m1"));
        assert!(!p.is_speaking(now + ms(1000)));
    }

    #[test]
    fn interruption_before_any_audio_played_keeps_nothing() {
        // Proves a reply cut before its first frame leaves no assistant text.
        let mut p = Playout::new(PlayoutConfig::default(), "m");
        let now = Instant::now();
        let a = p.begin_chunk("Hello.");
        p.push_audio(a, &frames(10));
        let heard = p.interrupt(now);
        assert_eq!(
            heard,
            Heard {
                text: String::new(),
                truncated: true
            }
        );
    }

    #[test]
    fn a_stalled_tts_mid_reply_counts_late_frames_but_the_start_of_a_reply_does_not() {
        // Proves underrun accounting: gaps inside a reply are late, the first frame never is.
        let mut p = Playout::new(PlayoutConfig::default(), "m");
        let now = Instant::now();
        let a = p.begin_chunk("First part.");
        p.push_audio(a, &frames(5));
        assert_eq!(audio_frames(&p.poll(now)), 5);
        // TTS stalls for 300 ms; playback (100 ms queued) runs dry.
        p.push_audio(a, &frames(5));
        assert_eq!(audio_frames(&p.poll(now + ms(300))), 5);
        assert_eq!(p.underruns(), 1);
        assert_eq!(p.late_frames(), 1);
        p.end_chunk(a);
        let out = p.poll(now + ms(320));
        assert_eq!(out, vec![PlayoutOut::Mark("m0".into())]);
        // A new reply much later is not an underrun.
        let b = p.begin_chunk("Second reply.");
        p.push_audio(b, &frames(3));
        p.poll(now + ms(5000));
        assert_eq!(p.underruns(), 1);
    }

    #[test]
    fn buffered_audio_is_bounded() {
        // Proves a runaway TTS cannot grow a call's memory without bound.
        let mut p = Playout::new(
            PlayoutConfig {
                max_buffered: ms(1000),
                ..PlayoutConfig::default()
            },
            "m",
        );
        let a = p.begin_chunk("x");
        p.push_audio(a, &frames(80));
        assert_eq!(p.dropped_bytes(), 30 * FRAME_BYTES as u64);
    }

    #[test]
    fn held_chunks_wait_for_release_and_survive_an_interruption() {
        // Proves preemptive audio is never sent before the turn is confirmed.
        let mut p = Playout::new(PlayoutConfig::default(), "m");
        let now = Instant::now();
        let a = p.begin_held_chunk("Preemptive answer.");
        p.push_audio(a, &frames(4));
        p.end_chunk(a);
        assert!(p.poll(now).is_empty());
        assert_eq!(p.next_wake(now), None);
        assert!(!p.is_speaking(now));
        let heard = p.interrupt(now);
        assert_eq!(heard.text, "");
        p.release_held();
        let out = p.poll(now);
        assert_eq!(audio_frames(&out), 4);
        assert_eq!(out.last(), Some(&PlayoutOut::Mark("m0".into())));
        // A discarded held chunk never plays.
        let b = p.begin_held_chunk("Discarded.");
        p.push_audio(b, &frames(4));
        p.discard(&[b]);
        p.release_held();
        assert!(p.poll(now + ms(500)).is_empty());
    }

    #[test]
    fn a_lost_mark_echo_expires_after_the_grace() {
        // Proves the dialogue never stalls waiting for a mark Twilio did not echo.
        let mut p = Playout::new(PlayoutConfig::default(), "m");
        let now = Instant::now();
        let a = p.begin_chunk("Hi.");
        p.push_audio(a, &frames(5));
        p.end_chunk(a);
        p.poll(now);
        assert!(!p.all_played());
        let due = p.next_mark_expiry().unwrap();
        assert_eq!(due, now + ms(100) + MARK_GRACE);
        p.expire_marks(due);
        assert!(p.all_played());
        assert!(p.chunk_played(a));
    }

    #[test]
    fn truncation_cuts_back_to_a_whole_word() {
        // Proves partial chunks never end in half a word.
        assert_eq!(
            truncate_words("hello wonderful world", 0.5).as_deref(),
            Some("hello")
        );
        assert_eq!(
            truncate_words("hello world", 1.0).as_deref(),
            Some("hello world")
        );
        assert_eq!(truncate_words("hello", 0.3), None);
    }
}
