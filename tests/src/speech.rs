//! Real caller speech for tests: espeak-ng renders a line to WAV (22.05 kHz, 16-bit),
//! the pod's own resampler turns it into mu-law 8 kHz, exactly what Twilio would send.
//!
//! Renders are cached on disk (the system temp dir) by a hash of the text and voice, so
//! a test suite renders each line once. `scripts/test.sh` installs espeak-ng.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Voice used for every render (a plain, deterministic US English voice).
pub const VOICE: &str = "en-us";
/// Speaking rate, words per minute (close to a relaxed human caller).
pub const WORDS_PER_MINUTE: u32 = 165;
/// Bump when the render pipeline changes, to invalidate old cache files.
const CACHE_VERSION: u32 = 1;
/// mu-law silence.
pub const MULAW_SILENCE: u8 = 0xFF;
/// Bytes in one 20 ms Twilio frame.
pub const FRAME_BYTES: usize = 160;

/// Rendering failures.
#[derive(Debug, thiserror::Error)]
pub enum SpeechError {
    /// espeak-ng is not installed or failed.
    #[error("espeak-ng failed (install it: apt-get install -y espeak-ng): {0}")]
    Espeak(String),
    /// The WAV it produced is not what we expect.
    #[error("unexpected WAV from espeak-ng: {0}")]
    Wav(String),
    /// Resampling failed.
    #[error("resampling failed: {0}")]
    Resample(String),
    /// Cache I/O.
    #[error("speech cache: {0}")]
    Io(#[from] std::io::Error),
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn cache_dir() -> PathBuf {
    std::env::temp_dir().join("callmeback-speech")
}

/// Renders `text` as mu-law 8 kHz mono (no header, no padding). Blocking; cached.
pub fn render_mulaw(text: &str) -> Result<Vec<u8>, SpeechError> {
    let key = format!("{CACHE_VERSION}|{VOICE}|{WORDS_PER_MINUTE}|{text}");
    let dir = cache_dir();
    let path = dir.join(format!("{:016x}.ulaw", fnv1a(key.as_bytes())));
    if let Ok(bytes) = std::fs::read(&path)
        && !bytes.is_empty()
    {
        return Ok(bytes);
    }
    std::fs::create_dir_all(&dir)?;
    let wav_path = dir.join(format!(
        "{:016x}.{}.wav",
        fnv1a(key.as_bytes()),
        std::process::id()
    ));
    let out = Command::new("espeak-ng")
        .args(["-v", VOICE, "-s", &WORDS_PER_MINUTE.to_string(), "-w"])
        .arg(&wav_path)
        .arg("--")
        .arg(text)
        .output()
        .map_err(|e| SpeechError::Espeak(e.to_string()))?;
    if !out.status.success() {
        return Err(SpeechError::Espeak(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let wav = std::fs::read(&wav_path)?;
    let _ = std::fs::remove_file(&wav_path);
    let (rate, pcm) = parse_wav(&wav)?;
    let mulaw = voice_pod::audio::resample::pcm_to_mulaw_8k(rate, &pcm)
        .map_err(|e| SpeechError::Resample(e.to_string()))?;
    // Write atomically so concurrent tests never read half a file.
    let tmp = dir.join(format!(
        "{:016x}.{}.tmp",
        fnv1a(key.as_bytes()),
        std::process::id()
    ));
    std::fs::write(&tmp, &mulaw)?;
    std::fs::rename(&tmp, &path)?;
    Ok(mulaw)
}

/// [`render_mulaw`] off the async runtime.
pub async fn render_mulaw_async(text: &str) -> Result<Vec<u8>, SpeechError> {
    let text = text.to_owned();
    tokio::task::spawn_blocking(move || render_mulaw(&text))
        .await
        .map_err(|e| SpeechError::Espeak(e.to_string()))?
}

/// mu-law silence of a duration.
pub fn silence(d: Duration) -> Vec<u8> {
    vec![MULAW_SILENCE; (d.as_secs_f64() * 8000.0).round() as usize]
}

/// Splits audio into 20 ms frames (the last one padded with silence), as Twilio sends.
pub fn frames(audio: &[u8]) -> Vec<Vec<u8>> {
    audio
        .chunks(FRAME_BYTES)
        .map(|c| {
            let mut f = c.to_vec();
            f.resize(FRAME_BYTES, MULAW_SILENCE);
            f
        })
        .collect()
}

/// Duration of mu-law 8 kHz audio.
pub fn duration(audio: &[u8]) -> Duration {
    Duration::from_secs_f64(audio.len() as f64 / 8000.0)
}

/// Mono 16-bit PCM WAV -> (sample rate, samples).
fn parse_wav(wav: &[u8]) -> Result<(u32, Vec<i16>), SpeechError> {
    if wav.len() < 12 || &wav[..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
        return Err(SpeechError::Wav("not a RIFF/WAVE file".into()));
    }
    let mut pos = 12;
    let mut rate = None;
    while pos + 8 <= wav.len() {
        let id = &wav[pos..pos + 4];
        let size =
            u32::from_le_bytes([wav[pos + 4], wav[pos + 5], wav[pos + 6], wav[pos + 7]]) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            if body + 16 > wav.len() {
                return Err(SpeechError::Wav("short fmt chunk".into()));
            }
            let channels = u16::from_le_bytes([wav[body + 2], wav[body + 3]]);
            let r =
                u32::from_le_bytes([wav[body + 4], wav[body + 5], wav[body + 6], wav[body + 7]]);
            let bits = u16::from_le_bytes([wav[body + 14], wav[body + 15]]);
            if channels != 1 || bits != 16 {
                return Err(SpeechError::Wav(format!(
                    "{channels} channels, {bits} bits"
                )));
            }
            rate = Some(r);
        } else if id == b"data" {
            let rate = rate.ok_or_else(|| SpeechError::Wav("data before fmt".into()))?;
            // espeak may leave the size unset when streaming; take what is there.
            let end = body.saturating_add(size).min(wav.len());
            let pcm = wav[body..end]
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            return Ok((rate, pcm));
        }
        pos = body + size + (size & 1);
    }
    Err(SpeechError::Wav("no data chunk".into()))
}
