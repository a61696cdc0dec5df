//! Segment codec: round trips, and rejection of truncated, oversized, corrupt and arbitrary
//! input with typed errors and no panic.

use flywheel_storage::codec::{
    self, CodecError, FORMAT_VERSION, MAGIC, MAX_PROMPT_ID_BYTES, MAX_TOKENS_PER_SEGMENT,
};
use flywheel_storage::{FinishReason, PromptId, Segment, TrajectoryId};
use proptest::prelude::*;

fn finish_strategy() -> impl Strategy<Value = FinishReason> {
    prop_oneof![
        Just(FinishReason::None),
        Just(FinishReason::Eos),
        Just(FinishReason::Length),
        Just(FinishReason::Abort),
    ]
}

/// Log-probabilities as engines produce them, plus the awkward edges (−0, −∞, tiny values).
fn logprob_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -50.0f32..=0.0,
        1 => Just(f32::NEG_INFINITY),
        1 => Just(-0.0f32),
        1 => Just(f32::MIN_POSITIVE),
        1 => Just(-f32::MIN_POSITIVE),
    ]
}

fn segment_strategy() -> impl Strategy<Value = Segment> {
    (
        // Non-empty, any Unicode, up to the byte limit (a char is at most 4 bytes).
        proptest::collection::vec(any::<char>(), 1..=MAX_PROMPT_ID_BYTES / 4)
            .prop_map(|cs| cs.into_iter().collect::<String>()),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        finish_strategy(),
        proptest::collection::vec((any::<u32>(), logprob_strategy()), 0..300),
    )
        .prop_map(
            |(prompt, sample, seq, version, lease_epoch, finish, toks)| {
                let (tokens, logprobs) = toks.into_iter().unzip();
                Segment {
                    trajectory: TrajectoryId {
                        prompt: PromptId(prompt),
                        sample,
                    },
                    seq,
                    version,
                    lease_epoch,
                    tokens,
                    logprobs,
                    finish,
                }
            },
        )
}

fn sample_segment() -> Segment {
    Segment {
        trajectory: TrajectoryId {
            prompt: PromptId::from("gsm8k/train/00042"),
            sample: 3,
        },
        seq: 7,
        version: 12,
        lease_epoch: 5,
        tokens: vec![1, 2, 3, 50_000, u32::MAX],
        logprobs: vec![-0.1, -2.5, 0.0, -17.25, f32::NEG_INFINITY],
        finish: FinishReason::Eos,
    }
}

/// Bit-exact equality: `==` on f32 would call −0 and 0 equal.
fn assert_same(a: &Segment, b: &Segment) {
    assert_eq!(a.trajectory, b.trajectory);
    assert_eq!(
        (a.seq, a.version, a.lease_epoch, a.finish),
        (b.seq, b.version, b.lease_epoch, b.finish)
    );
    assert_eq!(a.tokens, b.tokens);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.logprobs), bits(&b.logprobs));
}

/// Re-seals a hand-edited encoding with a correct checksum, so a test can reach the checks
/// that come after the CRC.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - 4;
    let crc = crc32c::crc32c(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Offset of the finish-reason byte in an encoding whose prompt id has `prompt_len` bytes.
fn finish_offset(prompt_len: usize) -> usize {
    4 + 2 + 4 + prompt_len + 4 + 4 + 8 + 8
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trips_random_segments(segment in segment_strategy()) {
        let bytes = codec::encode(&segment).unwrap();
        prop_assert_eq!(bytes.len(), codec::encoded_len(&segment));
        let back = codec::decode(&bytes).unwrap();
        assert_same(&segment, &back);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        // Any outcome is fine except a panic; random bytes essentially never form a segment.
        let _ = codec::decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        // Get past the magic and version checks so the fuzzing reaches the length fields.
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&tail);
        prop_assert!(codec::decode(&bytes).is_err());
    }

    #[test]
    fn random_corruption_of_a_valid_encoding_is_rejected(
        segment in segment_strategy(),
        index in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let mut bytes = codec::encode(&segment).unwrap().to_vec();
        let i = index.index(bytes.len());
        bytes[i] ^= xor;
        prop_assert!(codec::decode(&bytes).is_err(), "corruption at byte {} accepted", i);
    }
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = codec::encode(&sample_segment()).unwrap();
    for len in 0..bytes.len() {
        match codec::decode(&bytes[..len]) {
            Err(CodecError::Truncated { available, .. }) => assert_eq!(available, len),
            other => panic!("truncation to {len} bytes gave {other:?}, expected Truncated"),
        }
    }
    assert_same(&codec::decode(&bytes).unwrap(), &sample_segment());
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let bytes = codec::encode(&sample_segment()).unwrap().to_vec();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1 << bit;
            let err = codec::decode(&flipped)
                .expect_err(&format!("bit {bit} of byte {i} flipped was accepted"));
            // The region decides which check catches it.
            match i {
                0..4 => assert!(matches!(err, CodecError::BadMagic { .. }), "{i}: {err:?}"),
                4..6 => {
                    assert!(
                        matches!(err, CodecError::UnsupportedVersion { .. }),
                        "{i}: {err:?}"
                    )
                }
                _ => {}
            }
        }
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = codec::encode(&sample_segment()).unwrap().to_vec();
    bytes.extend_from_slice(&[0, 0]);
    assert_eq!(
        codec::decode(&bytes),
        Err(CodecError::TrailingBytes { extra: 2 })
    );
}

#[test]
fn bad_magic_and_unknown_version_are_named() {
    let bytes = codec::encode(&sample_segment()).unwrap().to_vec();

    let mut other = bytes.clone();
    other[..4].copy_from_slice(b"PK\x03\x04");
    assert_eq!(
        codec::decode(&other),
        Err(CodecError::BadMagic {
            found: *b"PK\x03\x04"
        })
    );
    // A short input that is not a prefix of the magic is not a segment either.
    assert!(matches!(
        codec::decode(b"{"),
        Err(CodecError::BadMagic { .. })
    ));

    let mut newer = bytes.clone();
    newer[4..6].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(
        codec::decode(&newer),
        Err(CodecError::UnsupportedVersion {
            found: 2,
            supported: FORMAT_VERSION
        })
    );
}

/// A header that claims the largest lengths the fields can hold, followed by a few bytes.
fn forged_header(prompt_len: u32, prompt: &[u8], token_count: Option<u32>) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&prompt_len.to_le_bytes());
    bytes.extend_from_slice(prompt);
    if let Some(n) = token_count {
        bytes.extend_from_slice(&[0u8; 4 + 4 + 8 + 8 + 1]);
        bytes.extend_from_slice(&n.to_le_bytes());
    }
    bytes.extend_from_slice(&[0u8; 16]);
    bytes
}

#[test]
fn oversized_length_fields_are_rejected() {
    for prompt_len in [MAX_PROMPT_ID_BYTES as u32 + 1, u32::MAX] {
        assert_eq!(
            codec::decode(&forged_header(prompt_len, b"", None)),
            Err(CodecError::Oversized {
                field: "prompt_id",
                len: u64::from(prompt_len),
                max: MAX_PROMPT_ID_BYTES as u64,
            })
        );
    }
    for n in [MAX_TOKENS_PER_SEGMENT as u32 + 1, u32::MAX] {
        assert_eq!(
            codec::decode(&forged_header(1, b"p", Some(n))),
            Err(CodecError::Oversized {
                field: "tokens",
                len: u64::from(n),
                max: MAX_TOKENS_PER_SEGMENT as u64,
            })
        );
    }
    // At the limit the length is legal, so the short input is reported as truncated.
    assert!(matches!(
        codec::decode(&forged_header(1, b"p", Some(MAX_TOKENS_PER_SEGMENT as u32))),
        Err(CodecError::Truncated { .. })
    ));
}

#[test]
fn encoder_refuses_what_the_decoder_would_reject() {
    let mut s = sample_segment();
    s.logprobs.pop();
    assert!(matches!(
        codec::encode(&s),
        Err(CodecError::InvalidField {
            field: "logprobs",
            ..
        })
    ));

    let mut s = sample_segment();
    s.logprobs[1] = f32::NAN;
    assert!(matches!(
        codec::encode(&s),
        Err(CodecError::InvalidField {
            field: "logprobs",
            ..
        })
    ));

    let mut s = sample_segment();
    s.trajectory.prompt = PromptId(String::new());
    assert!(matches!(
        codec::encode(&s),
        Err(CodecError::InvalidField {
            field: "prompt_id",
            ..
        })
    ));

    let mut s = sample_segment();
    s.trajectory.prompt = PromptId("x".repeat(MAX_PROMPT_ID_BYTES + 1));
    assert!(matches!(
        codec::encode(&s),
        Err(CodecError::Oversized {
            field: "prompt_id",
            ..
        })
    ));

    let mut s = sample_segment();
    s.tokens = vec![0; MAX_TOKENS_PER_SEGMENT + 1];
    s.logprobs = vec![0.0; MAX_TOKENS_PER_SEGMENT + 1];
    assert!(matches!(
        codec::encode(&s),
        Err(CodecError::Oversized {
            field: "tokens",
            ..
        })
    ));

    // Exactly at the limits is fine.
    let mut s = sample_segment();
    s.trajectory.prompt = PromptId("x".repeat(MAX_PROMPT_ID_BYTES));
    s.tokens = vec![7; MAX_TOKENS_PER_SEGMENT];
    s.logprobs = vec![-1.0; MAX_TOKENS_PER_SEGMENT];
    let bytes = codec::encode(&s).unwrap();
    assert_eq!(bytes.len(), codec::MAX_ENCODED_LEN);
    assert_same(&codec::decode(&bytes).unwrap(), &s);
}

#[test]
fn semantically_invalid_fields_with_a_valid_checksum_are_rejected() {
    let seg = sample_segment();
    let plen = seg.trajectory.prompt.0.len();
    let bytes = codec::encode(&seg).unwrap().to_vec();

    let mut bad_finish = bytes.clone();
    bad_finish[finish_offset(plen)] = 9;
    assert!(matches!(
        codec::decode(&reseal(bad_finish)),
        Err(CodecError::InvalidField {
            field: "finish",
            ..
        })
    ));

    let mut bad_utf8 = bytes.clone();
    bad_utf8[10] = 0xff;
    assert!(matches!(
        codec::decode(&reseal(bad_utf8)),
        Err(CodecError::InvalidField {
            field: "prompt_id",
            ..
        })
    ));

    let mut nan = bytes.clone();
    let first_logprob = finish_offset(plen) + 1 + 4 + seg.tokens.len() * 4;
    nan[first_logprob..first_logprob + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(
        codec::decode(&reseal(nan)),
        Err(CodecError::InvalidField {
            field: "logprobs",
            ..
        })
    ));
}

#[test]
fn empty_segment_round_trips() {
    let mut s = sample_segment();
    s.tokens.clear();
    s.logprobs.clear();
    s.finish = FinishReason::Abort;
    assert_same(&codec::decode(&codec::encode(&s).unwrap()).unwrap(), &s);
}

#[test]
fn errors_say_what_is_wrong() {
    let msg = codec::decode(b"FWSG\x01").unwrap_err().to_string();
    assert!(msg.contains("truncated"), "{msg}");
    let msg = codec::decode(b"GIF89a").unwrap_err().to_string();
    assert!(msg.contains("not an encoded segment"), "{msg}");
}
