//! G.711 mu-law, the codec of Twilio Media Streams (8 kHz, one byte per sample).
//!
//! The quantiser is the classic G.711 segment/bias algorithm on 16-bit linear PCM
//! (`BIAS` 0x84, `CLIP` 32635): add the bias to the magnitude, the segment is the
//! position of the leading one, the mantissa the four bits after it, and the byte is
//! the ones' complement of `sign | segment | mantissa`. Negative samples use their
//! exact magnitude, so the quantiser is symmetric: `encode(-x) == encode(x) ^ 0x80`.
//!
//! Both directions are table lookups built at compile time, so the hot path is one
//! load per sample:
//! - decode: 256 entries, one per code (the standard's reconstruction values);
//! - encode: 8192 entries indexed by `|x| >> 2`. The code depends only on the magnitude's
//!   top 14 bits because the bias (132 = 4 * 33) is a multiple of 4 and every mantissa
//!   shift is at least 3, so the 16-bit input reduces to the standard's 14-bit one.
//!
//! Two codes decode to zero: 0xFF (+0) and 0x7F (-0). Silence is encoded as 0xFF.

/// Added to the magnitude before segmenting (the standard's 33 in 14-bit units).
pub const BIAS: i32 = 0x84;
/// Largest magnitude the quantiser represents; anything above encodes like it.
pub const CLIP: i32 = 32635;
/// The mu-law byte for digital silence (positive zero).
pub const SILENCE: u8 = 0xFF;

/// Linear value of every mu-law code, index = code.
pub static DECODE_TABLE: [i16; 256] = build_decode_table();

/// Encoded byte (with the sign bit set, i.e. as for a positive sample) for every
/// magnitude `m >> 2`, `m` in `0..=32767`; magnitudes at or above [`CLIP`] share the
/// last segment's top code.
static ENCODE_TABLE: [u8; ENCODE_TABLE_LEN] = build_encode_table();
const ENCODE_TABLE_LEN: usize = 8192;

/// The reconstruction value of one code: `((mantissa << 3) + BIAS) << segment) - BIAS`.
const fn decode_code(code: u8) -> i16 {
    let c = !code;
    let segment = ((c >> 4) & 0x07) as i32;
    let mantissa = (c & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + BIAS) << segment) - BIAS;
    if c & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// The code of a non-negative magnitude, sign bit set (positive). Not on the hot path:
/// only used to fill [`ENCODE_TABLE`].
const fn encode_magnitude(magnitude: i32) -> u8 {
    let m = if magnitude > CLIP { CLIP } else { magnitude };
    let biased = m + BIAS;
    // Segment = index of the leading one above bit 7 (biased >= 132 so bit 7 or higher is set).
    let segment = 31 - (biased >> 7 | 1).leading_zeros() as i32;
    let mantissa = (biased >> (segment + 3)) & 0x0F;
    !((segment << 4) | mantissa) as u8
}

const fn build_decode_table() -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut code = 0;
    while code < 256 {
        table[code] = decode_code(code as u8);
        code += 1;
    }
    table
}

const fn build_encode_table() -> [u8; ENCODE_TABLE_LEN] {
    let mut table = [0u8; ENCODE_TABLE_LEN];
    let mut i = 0;
    while i < ENCODE_TABLE_LEN {
        table[i] = encode_magnitude((i as i32) << 2);
        i += 1;
    }
    table
}

/// Decodes one mu-law byte to 16-bit linear PCM.
#[inline]
pub fn decode_sample(code: u8) -> i16 {
    DECODE_TABLE[code as usize]
}

/// Encodes one 16-bit linear PCM sample to mu-law.
#[inline]
pub fn encode_sample(sample: i16) -> u8 {
    let v = i32::from(sample);
    // All ones for negative samples, zero otherwise: a branchless absolute value and sign.
    let neg = v >> 31;
    let magnitude = (v ^ neg) - neg;
    // |-32768| >> 2 = 8192 is past the table, but every index from CLIP >> 2 up encodes
    // the same clipped code, so clamping the index is exact (and drops the bounds check).
    let index = ((magnitude >> 2) as usize).min(ENCODE_TABLE_LEN - 1);
    ENCODE_TABLE[index] ^ ((neg as u8) & 0x80)
}

/// Decodes `input` into `output`, sample by sample; converts `min(input.len(),
/// output.len())` samples and returns that count.
#[inline]
pub fn decode_into(input: &[u8], output: &mut [i16]) -> usize {
    let n = input.len().min(output.len());
    for (out, &code) in output[..n].iter_mut().zip(&input[..n]) {
        *out = DECODE_TABLE[code as usize];
    }
    n
}

/// Encodes `input` into `output`, sample by sample; converts `min(input.len(),
/// output.len())` samples and returns that count.
#[inline]
pub fn encode_into(input: &[i16], output: &mut [u8]) -> usize {
    let n = input.len().min(output.len());
    for (out, &sample) in output[..n].iter_mut().zip(&input[..n]) {
        *out = encode_sample(sample);
    }
    n
}

/// Decodes a mu-law buffer into a new PCM vector.
pub fn decode(input: &[u8]) -> Vec<i16> {
    input.iter().map(|&c| DECODE_TABLE[c as usize]).collect()
}

/// Encodes a PCM buffer into a new mu-law vector.
pub fn encode(input: &[i16]) -> Vec<u8> {
    input.iter().map(|&s| encode_sample(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The G.711 encoder written out the long way (sign, clip, bias, segment search,
    /// mantissa, complement), with no tables and no shared helpers.
    fn reference_encode(sample: i16) -> u8 {
        let mut x = i32::from(sample);
        let sign = if x < 0 {
            x = -x;
            0x80
        } else {
            0
        };
        if x > 32635 {
            x = 32635;
        }
        x += 0x84;
        let mut segment = 0;
        while segment < 7 && x >= (0x100 << segment) {
            segment += 1;
        }
        let mantissa = (x >> (segment + 3)) & 0x0F;
        !(sign | (segment << 4) | mantissa) as u8
    }

    /// The G.711 decoder written out the long way.
    fn reference_decode(code: u8) -> i16 {
        // Segment base values of the standard's decoding table.
        const SEGMENT_BASE: [i32; 8] = [0, 132, 396, 924, 1980, 4092, 8316, 16764];
        let c = !code;
        let segment = usize::from((c >> 4) & 0x07);
        let mantissa = i32::from(c & 0x0F);
        let magnitude = SEGMENT_BASE[segment] + (mantissa << (segment + 3));
        if c & 0x80 != 0 {
            -magnitude as i16
        } else {
            magnitude as i16
        }
    }

    /// The ITU-T G.191 (STL) `ulaw_compress`, which maps negative input to its ones'
    /// complement in 14-bit units (`~x >> 2`) instead of its exact magnitude.
    fn stl_encode(sample: i16) -> u8 {
        let x = i32::from(sample);
        let mut absno = if x < 0 { (!x >> 2) + 33 } else { (x >> 2) + 33 };
        if absno > 0x1FFF {
            absno = 0x1FFF;
        }
        let mut i = absno >> 6;
        let mut segno = 1;
        while i != 0 {
            segno += 1;
            i >>= 1;
        }
        let high = 0x08 - segno;
        let low = 0x0F - ((absno >> segno) & 0x0F);
        let mut out = (high << 4) | low;
        if x >= 0 {
            out |= 0x80;
        }
        out as u8
    }

    #[test]
    fn decode_matches_the_standard_reference_values() {
        // Proves the endpoints and zeros of the G.711 decoding table.
        assert_eq!(decode_sample(0x00), -32124);
        assert_eq!(decode_sample(0x80), 32124);
        assert_eq!(decode_sample(0xFF), 0);
        assert_eq!(decode_sample(0x7F), 0);
        assert_eq!(decode_sample(0xFE), 8);
        assert_eq!(decode_sample(0x7E), -8);
        assert_eq!(decode_sample(0xF0), 120);
        assert_eq!(decode_sample(0xEF), 132);
        assert_eq!(decode_sample(0x8F), 16764);
        assert_eq!(decode_sample(0x0F), -16764);
    }

    #[test]
    fn encode_matches_the_standard_reference_values() {
        // Proves zero, the first decision level, segment edges and clipping against G.711
        // Table 2a (14-bit decision values 1, 31, 4063 and 8159, times 4 for 16-bit input).
        assert_eq!(encode_sample(0), 0xFF);
        assert_eq!(encode_sample(-1), 0x7F);
        assert_eq!(encode_sample(3), 0xFF);
        assert_eq!(encode_sample(4), 0xFE);
        assert_eq!(encode_sample(-3), 0x7F);
        assert_eq!(encode_sample(-4), 0x7E);
        // End of segment 0 (step 8) and start of segment 1 (step 16).
        assert_eq!(encode_sample(123), 0xF0);
        assert_eq!(encode_sample(124), 0xEF);
        assert_eq!(encode_sample(-124), 0x6F);
        // End of segment 6 and start of segment 7.
        assert_eq!(encode_sample(16251), 0x90);
        assert_eq!(encode_sample(16252), 0x8F);
        // The top code and clipping beyond the last decision value.
        assert_eq!(encode_sample(32124), 0x80);
        assert_eq!(encode_sample(32635), 0x80);
        assert_eq!(encode_sample(32767), 0x80);
        assert_eq!(encode_sample(-32124), 0x00);
        assert_eq!(encode_sample(-32768), 0x00);
    }

    #[test]
    fn decode_table_equals_reference_decoder_for_all_256_codes() {
        // Proves the compile-time decode table against the long-hand decoder.
        for code in 0..=255u8 {
            assert_eq!(
                decode_sample(code),
                reference_decode(code),
                "code {code:#04x}"
            );
        }
    }

    #[test]
    fn encode_table_equals_reference_encoder_for_all_65536_inputs() {
        // Proves the table encoder is bit-exact with the segment/bias algorithm everywhere.
        for x in i16::MIN..=i16::MAX {
            assert_eq!(encode_sample(x), reference_encode(x), "sample {x}");
        }
    }

    #[test]
    fn every_code_survives_decode_then_encode_except_negative_zero() {
        // Proves decode/encode round-trips all codes; 0x7F (-0) decodes to 0, which encodes as 0xFF (+0).
        for code in 0..=255u8 {
            let back = encode_sample(decode_sample(code));
            if code == 0x7F {
                assert_eq!(back, 0xFF);
            } else {
                assert_eq!(back, code, "code {code:#04x}");
            }
        }
    }

    #[test]
    fn quantiser_is_symmetric_around_zero() {
        // Proves negative samples use their exact magnitude (sign-magnitude symmetry).
        for x in 1..=i16::MAX {
            assert_eq!(encode_sample(-x), encode_sample(x) ^ 0x80, "sample {x}");
        }
    }

    #[test]
    fn agrees_with_itu_stl_encoder_except_one_step_at_negative_decision_levels() {
        // Proves the only difference from the G.191 STL encoder: negative inputs exactly on a
        // decision level land one step apart (STL takes ones' complement of negative input).
        let mut differing = 0;
        for x in i16::MIN..=i16::MAX {
            let ours = encode_sample(x);
            let stl = stl_encode(x);
            if ours != stl {
                assert!(x < 0, "positive sample {x} differs");
                assert_eq!(ours & 0x80, stl & 0x80, "sign differs at {x}");
                assert_eq!(stl - ours, 1, "more than one step apart at {x}");
                // The exact magnitude sits on a decision level: magnitude + bias divisible
                // by the segment's step.
                let m = -i32::from(x);
                let segment = i32::from((!ours >> 4) & 0x07);
                assert_eq!((m + BIAS) % (8 << segment), 0, "sample {x}");
                differing += 1;
            }
        }
        // One decision level per mantissa step below the clip level: 8 segments x 16 steps,
        // minus the zero level.
        assert_eq!(differing, 127);
    }

    #[test]
    fn slice_and_vec_apis_agree_with_the_per_sample_functions() {
        // Proves decode_into/encode_into/decode/encode convert every sample and report the count.
        let pcm: Vec<i16> = (0..1000)
            .map(|i| ((i * 7919) % 65536 - 32768) as i16)
            .collect();
        let mut codes = vec![0u8; pcm.len()];
        assert_eq!(encode_into(&pcm, &mut codes), pcm.len());
        assert_eq!(codes, encode(&pcm));
        assert!(codes.iter().zip(&pcm).all(|(&c, &s)| c == encode_sample(s)));
        let mut back = vec![0i16; codes.len()];
        assert_eq!(decode_into(&codes, &mut back), codes.len());
        assert_eq!(back, decode(&codes));
        // A short output converts only what fits.
        let mut short = [0i16; 10];
        assert_eq!(decode_into(&codes, &mut short), 10);
        assert_eq!(&short[..], &back[..10]);
    }
}
