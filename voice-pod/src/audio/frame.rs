//! 20 ms framing of mu-law audio for Twilio Media Streams.
//!
//! Twilio plays what it receives, but the pacing, `mark` bookkeeping and the
//! `voice_frames_total` metric all count in 20 ms frames, while TTS providers hand out
//! chunks of any size. [`Framer`] turns the one into the other without losing a byte:
//! full frames come out as soon as they are complete, and [`Framer::flush_padded`]
//! pads the tail with mu-law silence at the end of an utterance.

use super::mulaw::SILENCE;

/// Twilio Media Streams audio: 8 kHz mono.
pub const SAMPLE_RATE: u32 = 8000;
/// Duration of one frame.
pub const FRAME_MS: u32 = 20;
/// Samples (= mu-law bytes) in one frame: 8000 Hz * 20 ms.
pub const FRAME_BYTES: usize = (SAMPLE_RATE * FRAME_MS / 1000) as usize;

/// One 20 ms frame of mu-law audio.
pub type Frame = [u8; FRAME_BYTES];

/// A frame of digital silence.
pub const SILENT_FRAME: Frame = [SILENCE; FRAME_BYTES];

/// Accumulates mu-law chunks of any size and yields exact 20 ms frames.
///
/// ```
/// use voice_pod::audio::frame::{Framer, FRAME_BYTES};
/// let mut framer = Framer::new();
/// framer.push(&[0x55; 300]);
/// assert!(framer.next_frame().is_some()); // bytes 0..160
/// assert!(framer.next_frame().is_none()); // 140 bytes wait for more
/// let tail = framer.flush_padded().unwrap(); // 140 bytes + 20 bytes of silence
/// assert_eq!(tail[FRAME_BYTES - 1], 0xFF);
/// ```
#[derive(Debug, Default, Clone)]
pub struct Framer {
    /// Pending bytes; `buf[start..]` is not yet framed.
    buf: Vec<u8>,
    /// Read position in `buf`; compacted lazily so a push does not shift memory each frame.
    start: usize,
}

impl Framer {
    /// An empty framer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a chunk of mu-law bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        // Drop consumed bytes before growing, so the buffer stays around one chunk in size.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let end = self.start + FRAME_BYTES;
        let bytes = self.buf.get(self.start..end)?;
        let mut frame = [0u8; FRAME_BYTES];
        frame.copy_from_slice(bytes);
        self.start = end;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Some(frame)
    }

    /// Pushes a chunk and appends every frame it completes to `out`.
    pub fn push_frames(&mut self, chunk: &[u8], out: &mut Vec<Frame>) {
        self.push(chunk);
        while let Some(frame) = self.next_frame() {
            out.push(frame);
        }
    }

    /// The partial tail padded with silence to a full frame, or `None` when no bytes are
    /// pending. Call it at the end of an utterance so its last few milliseconds are played.
    /// Complete frames still buffered are not touched: drain [`Framer::next_frame`] first.
    pub fn flush_padded(&mut self) -> Option<Frame> {
        if let Some(frame) = self.next_frame() {
            // A full frame was still pending: hand it out unpadded, the caller calls again.
            return Some(frame);
        }
        let tail = &self.buf[self.start..];
        if tail.is_empty() {
            return None;
        }
        let mut frame = SILENT_FRAME;
        frame[..tail.len()].copy_from_slice(tail);
        self.clear();
        Some(frame)
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Drops everything pending (barge-in: the rest of the utterance must not play).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }
}

/// Splits a whole buffer into frames, padding the last one with silence.
pub fn frames_padded(audio: &[u8]) -> Vec<Frame> {
    let mut framer = Framer::new();
    let mut out = Vec::with_capacity(audio.len().div_ceil(FRAME_BYTES));
    framer.push_frames(audio, &mut out);
    out.extend(framer.flush_padded());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn sample_audio(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn frame_constants_describe_20ms_at_8khz() {
        // Proves the framing constants match Twilio's 8 kHz, 20 ms media payloads.
        assert_eq!(SAMPLE_RATE, 8000);
        assert_eq!(FRAME_MS, 20);
        assert_eq!(FRAME_BYTES, 160);
    }

    #[test]
    fn arbitrary_chunking_yields_the_same_frames_as_one_chunk() {
        // Proves frames depend only on the byte stream, not on how it was chunked.
        let audio = sample_audio(160 * 37 + 91);
        let whole = frames_padded(&audio);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let mut framer = Framer::new();
            let mut frames = Vec::new();
            let mut rest = &audio[..];
            while !rest.is_empty() {
                let n = rng.random_range(0..=rest.len().min(500));
                framer.push_frames(&rest[..n], &mut frames);
                rest = &rest[n..];
            }
            while let Some(frame) = framer.flush_padded() {
                frames.push(frame);
            }
            assert_eq!(frames, whole);
        }
        let bytes: Vec<u8> = whole.concat();
        assert_eq!(&bytes[..audio.len()], &audio[..]);
        assert!(bytes[audio.len()..].iter().all(|&b| b == SILENCE));
    }

    #[test]
    fn flush_pads_the_tail_with_mulaw_silence() {
        // Proves a partial frame is kept and padded with 0xFF rather than lost.
        let mut framer = Framer::new();
        framer.push(&[0x11; 50]);
        assert_eq!(framer.next_frame(), None);
        assert_eq!(framer.pending(), 50);
        let frame = framer.flush_padded().unwrap();
        assert!(frame[..50].iter().all(|&b| b == 0x11));
        assert!(frame[50..].iter().all(|&b| b == 0xFF));
        assert_eq!(framer.pending(), 0);
        assert_eq!(framer.flush_padded(), None);
    }

    #[test]
    fn exact_multiple_needs_no_padding() {
        // Proves a stream of whole frames produces no extra silent frame on flush.
        assert_eq!(frames_padded(&sample_audio(320)).len(), 2);
        let mut framer = Framer::new();
        framer.push(&sample_audio(160));
        assert_eq!(
            framer.flush_padded(),
            Some(sample_audio(160).try_into().unwrap())
        );
        assert_eq!(framer.flush_padded(), None);
        assert!(frames_padded(&[]).is_empty());
    }

    #[test]
    fn clear_drops_pending_audio() {
        // Proves barge-in can discard buffered audio so none of it plays later.
        let mut framer = Framer::new();
        framer.push(&sample_audio(400));
        framer.clear();
        assert_eq!(framer.pending(), 0);
        assert_eq!(framer.next_frame(), None);
        assert_eq!(framer.flush_padded(), None);
        framer.push(&[1; 160]);
        assert_eq!(framer.next_frame(), Some([1; 160]));
    }
}
