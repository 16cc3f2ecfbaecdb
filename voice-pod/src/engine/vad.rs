//! The pod's own voice-activity detector on the caller's audio.
//!
//! Deepgram's messages arrive after network and processing delays; the pod sees the
//! caller's audio 20 ms at a time and can tell speech from silence by energy at once.
//! That early signal drives barge-in (stop talking within ~100 ms of the caller
//! starting) and preemptive generation (the caller went quiet after complete-looking
//! words). It never decides a turn on its own: transcripts do.

use tokio::time::Instant;

use crate::audio::mulaw;

/// Detector thresholds.
#[derive(Clone, Debug)]
pub struct VadConfig {
    /// RMS (of 32768) above which a 20 ms frame counts as voiced. Telephone speech
    /// sits well above 1000; line noise and comfort noise well below 300.
    pub energy_threshold: f64,
    /// Consecutive voiced frames that make an onset (filters clicks).
    pub onset_frames: u32,
    /// Consecutive quiet frames that end speech (bridges gaps between words).
    pub offset_frames: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            energy_threshold: 500.0,
            onset_frames: 3,
            offset_frames: 5,
        }
    }
}

/// A change in the caller's voice activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VadEdge {
    /// Speech started (after `onset_frames` voiced frames).
    Speech,
    /// Speech ended (after `offset_frames` quiet frames).
    Silence,
}

/// Streaming detector state.
#[derive(Debug)]
pub struct Vad {
    cfg: VadConfig,
    speaking: bool,
    run: u32,
    /// When the last voiced frame arrived (the caller's end of speech, as the pod sees it).
    last_voiced: Option<Instant>,
}

impl Vad {
    /// A detector in the silent state.
    pub fn new(cfg: VadConfig) -> Self {
        Self {
            cfg,
            speaking: false,
            run: 0,
            last_voiced: None,
        }
    }

    /// Whether the caller is speaking now.
    pub fn speaking(&self) -> bool {
        self.speaking
    }

    /// When the last voiced frame arrived.
    pub fn last_voiced(&self) -> Option<Instant> {
        self.last_voiced
    }

    /// Feeds one frame of mu-law audio received at `now`.
    pub fn frame(&mut self, mulaw_frame: &[u8], now: Instant) -> Option<VadEdge> {
        let voiced = rms(mulaw_frame) > self.cfg.energy_threshold;
        if voiced {
            self.last_voiced = Some(now);
        }
        if voiced != self.speaking {
            self.run += 1;
            let needed = if self.speaking {
                self.cfg.offset_frames
            } else {
                self.cfg.onset_frames
            };
            if self.run >= needed {
                self.speaking = voiced;
                self.run = 0;
                return Some(if voiced {
                    VadEdge::Speech
                } else {
                    VadEdge::Silence
                });
            }
        } else {
            self.run = 0;
        }
        None
    }
}

/// Root-mean-square level of mu-law audio.
pub fn rms(mulaw_audio: &[u8]) -> f64 {
    if mulaw_audio.is_empty() {
        return 0.0;
    }
    let sum: f64 = mulaw_audio
        .iter()
        .map(|&c| {
            let s = f64::from(mulaw::decode_sample(c));
            s * s
        })
        .sum();
    (sum / mulaw_audio.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Duration;

    fn tone(amplitude: i16) -> Vec<u8> {
        (0..160)
            .map(|i| {
                let s = (f64::from(amplitude) * (i as f64 * 0.3).sin()) as i16;
                mulaw::encode_sample(s)
            })
            .collect()
    }

    #[test]
    fn onset_needs_consecutive_voiced_frames_and_offset_bridges_short_gaps() {
        // Proves clicks do not start speech and a 60 ms gap between words does not end it.
        let mut v = Vad::new(VadConfig::default());
        let t0 = Instant::now();
        let loud = tone(8000);
        let quiet = vec![0xFF; 160];
        let at = |n: u64| t0 + Duration::from_millis(20 * n);
        assert_eq!(v.frame(&loud, at(0)), None);
        assert_eq!(v.frame(&quiet, at(1)), None, "a click");
        assert_eq!(v.frame(&loud, at(2)), None);
        assert_eq!(v.frame(&loud, at(3)), None);
        assert_eq!(v.frame(&loud, at(4)), Some(VadEdge::Speech));
        for n in 5..8 {
            assert_eq!(v.frame(&quiet, at(n)), None, "short gap");
        }
        assert_eq!(v.frame(&loud, at(8)), None);
        for n in 9..13 {
            assert_eq!(v.frame(&quiet, at(n)), None);
        }
        assert_eq!(v.frame(&quiet, at(13)), Some(VadEdge::Silence));
        assert_eq!(v.last_voiced(), Some(at(8)));
    }

    #[test]
    fn line_noise_stays_silent() {
        // Proves low-level noise never counts as speech.
        let mut v = Vad::new(VadConfig::default());
        let t0 = Instant::now();
        let noise = tone(200);
        for _ in 0..50 {
            assert_eq!(v.frame(&noise, t0), None);
        }
        assert!(!v.speaking());
        assert!(rms(&tone(8000)) > 4000.0);
    }
}
