//! The test transcoders' error type.

use symphonia::core::errors::Error as SymphoniaError;

/// Everything that can go wrong resampling PCM or decoding MP3.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The resampler only takes rates it can convert exactly in 20 ms blocks.
    #[error(
        "unsupported input sample rate {rate} Hz (supported: 8000 to 192000 Hz, a multiple of 50 Hz)"
    )]
    UnsupportedRate {
        /// The rejected rate.
        rate: u32,
    },
    /// rubato refused the configuration (not expected for supported rates).
    #[error("cannot build a resampler for {rate} Hz")]
    ResamplerSetup {
        /// The input rate.
        rate: u32,
        /// rubato's reason.
        #[source]
        source: rubato::ResamplerConstructionError,
    },
    /// rubato failed while processing a block (not expected: block sizes are fixed).
    #[error("resampling failed")]
    Resample(#[source] rubato::ResampleError),
    /// No bytes to decode.
    #[error("MP3 input is empty")]
    Mp3Empty,
    /// The bytes are not an MP3 stream symphonia can open.
    #[error("input is not a decodable MP3 stream")]
    Mp3Format(#[source] SymphoniaError),
    /// The container holds no decodable audio track.
    #[error("MP3 stream has no audio track")]
    Mp3NoTrack,
    /// The stream does not say its sample rate or channel count.
    #[error("MP3 stream does not declare its {0}")]
    Mp3MissingParameter(&'static str),
    /// The decoder could not be created for the stream's parameters.
    #[error("cannot create an MP3 decoder for this stream")]
    Mp3Decoder(#[source] SymphoniaError),
    /// Frames disagree on the sample rate: the stream is not one piece of audio.
    #[error("MP3 sample rate changed mid-stream from {from} Hz to {to} Hz")]
    Mp3RateChanged {
        /// The first frame's rate.
        from: u32,
        /// The offending frame's rate.
        to: u32,
    },
    /// Reading or decoding failed in a way that is not a recoverable bad frame.
    #[error("MP3 decoding failed")]
    Mp3Decode(#[source] SymphoniaError),
    /// Every frame was corrupt or the stream ended before the first frame.
    #[error("MP3 stream contains no decodable audio")]
    Mp3NoAudio,
    /// The decoded audio would be longer than the caller's limit.
    #[error("decoded MP3 audio exceeds the limit of {max_samples} samples")]
    Mp3TooLong {
        /// The limit that was hit.
        max_samples: usize,
    },
}

impl TranscodeError {
    /// A short, fixed label for metrics (low cardinality, no payload data).
    pub fn metric_label(&self) -> &'static str {
        match self {
            TranscodeError::UnsupportedRate { .. } => "unsupported_rate",
            TranscodeError::ResamplerSetup { .. } | TranscodeError::Resample(_) => "resampler",
            TranscodeError::Mp3Empty
            | TranscodeError::Mp3Format(_)
            | TranscodeError::Mp3NoTrack
            | TranscodeError::Mp3MissingParameter(_)
            | TranscodeError::Mp3Decoder(_)
            | TranscodeError::Mp3RateChanged { .. }
            | TranscodeError::Mp3Decode(_)
            | TranscodeError::Mp3NoAudio => "bad_mp3",
            TranscodeError::Mp3TooLong { .. } => "oversized",
        }
    }
}
