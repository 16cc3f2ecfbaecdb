//! Real caller speech for tests: espeak-ng renders a line to WAV (22.05 kHz, 16-bit),
//! the pod's own resampler turns it into mu-law 8 kHz, exactly what Twilio would send.
//!
//! Renders are cached on disk (the system temp dir, which `scripts/test.sh` makes private
//! to the run) under a hash of everything that shapes the bytes: the text, voice and
//! rate, the installed espeak-ng's version line, and the source of this renderer and of
//! the resampler. A new espeak-ng or a changed pipeline can never be served an old
//! render. Temporary files are unique per writer and renamed into place, so concurrent
//! test threads and processes never see or delete each other's half-written files.
//! `scripts/test.sh` installs espeak-ng.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// Voice used for every render (a plain, deterministic US English voice).
pub const VOICE: &str = "en-us";
/// Speaking rate, words per minute (close to a relaxed human caller).
pub const WORDS_PER_MINUTE: u32 = 165;
/// The code that turns espeak-ng's WAV into the cached bytes: part of the cache key, so
/// any edit to the pipeline invalidates old renders without anyone remembering to.
const PIPELINE_SOURCES: [&str; 2] = [
    include_str!("speech.rs"),
    include_str!("transcode/resample.rs"),
];
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

/// `espeak-ng --version` (its version and data path), read once per process.
fn espeak_version() -> Result<&'static str, SpeechError> {
    static VERSION: OnceLock<Result<String, String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new("espeak-ng")
                .arg("--version")
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .as_deref()
        .map_err(|e| SpeechError::Espeak(e.clone()))
}

/// The cache file name for `text`: a hash of every input that shapes the render.
fn cache_key(text: &str) -> Result<String, SpeechError> {
    let mut key = Vec::new();
    for part in [
        espeak_version()?,
        VOICE,
        &WORDS_PER_MINUTE.to_string(),
        text,
    ]
    .into_iter()
    .chain(PIPELINE_SOURCES)
    {
        // Length-prefixed, so no two different inputs concatenate to the same bytes.
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    Ok(format!("{:016x}", fnv1a(&key)))
}

/// Renders `text` as mu-law 8 kHz mono (no header, no padding). Blocking; cached.
pub fn render_mulaw(text: &str) -> Result<Vec<u8>, SpeechError> {
    let dir = cache_dir();
    let key = cache_key(text)?;
    let path = dir.join(format!("{key}.ulaw"));
    if let Ok(bytes) = std::fs::read(&path)
        && !bytes.is_empty()
    {
        return Ok(bytes);
    }
    std::fs::create_dir_all(&dir)?;
    // A name no other writer (thread or process) can hold: created exclusively.
    let wav_file = tempfile::Builder::new()
        .prefix(&format!("{key}."))
        .suffix(".wav")
        .tempfile_in(&dir)?;
    let out = Command::new("espeak-ng")
        .args(["-v", VOICE, "-s", &WORDS_PER_MINUTE.to_string(), "-w"])
        .arg(wav_file.path())
        .arg("--")
        .arg(text)
        .output()
        .map_err(|e| SpeechError::Espeak(e.to_string()))?;
    if !out.status.success() {
        return Err(SpeechError::Espeak(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let wav = std::fs::read(wav_file.path())?;
    drop(wav_file);
    let (rate, pcm) = parse_wav(&wav)?;
    let mulaw = crate::transcode::pcm_to_mulaw_8k(rate, &pcm)
        .map_err(|e| SpeechError::Resample(e.to_string()))?;
    // Written under a unique name, then renamed into place: readers see all or nothing.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{key}."))
        .suffix(".tmp")
        .tempfile_in(&dir)?;
    tmp.write_all(&mulaw)?;
    tmp.persist(&path).map_err(|e| SpeechError::Io(e.error))?;
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
