//! The binary segment codec (DESIGN.md §4).
//!
//! A segment is written once to the object store and read back by trainers, possibly much
//! later and by another build, so the encoding is versioned, self-describing and checksummed.
//! The decoder is the guard of invariant 3 of DESIGN.md §7 ("a corrupt or truncated segment is
//! detected and never trained"): it rejects anything truncated, oversized or corrupt with a
//! typed [`CodecError`] and never panics, whatever the input.
//!
//! # Layout (format version 1, all integers little-endian)
//!
//! | field            | type                         | notes                                   |
//! |------------------|------------------------------|-----------------------------------------|
//! | magic            | 4 bytes                      | [`MAGIC`] = `b"FWSG"`                   |
//! | format version   | u16                          | [`FORMAT_VERSION`]                      |
//! | prompt-id length | u32                          | ≤ [`MAX_PROMPT_ID_BYTES`], > 0          |
//! | prompt id        | that many bytes, UTF-8       |                                         |
//! | sample           | u32                          | trajectory's sample index k             |
//! | seq              | u32                          | segment position in the trajectory      |
//! | policy version   | u64                          |                                         |
//! | lease epoch      | u64                          |                                         |
//! | finish reason    | u8                           | 0 none, 1 eos, 2 length, 3 abort        |
//! | token count n    | u32                          | ≤ [`MAX_TOKENS_PER_SEGMENT`]            |
//! | tokens           | n × u32                      |                                         |
//! | logprobs         | n × f32                      | not NaN, not +∞                         |
//! | crc32c           | u32                          | CRC-32C of every byte before it         |
//!
//! Length fields are checked against the limits and against the input's real length before
//! anything is allocated, so a forged length costs nothing.

use bytes::Bytes;
use thiserror::Error;

use crate::types::{FinishReason, PromptId, Segment, TrajectoryId};

/// The four bytes every encoded segment starts with ("FlyWheel SeGment").
pub const MAGIC: [u8; 4] = *b"FWSG";

/// The format version this build writes, and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Longest prompt id accepted, in UTF-8 bytes. Prompt ids are keys, not content: anything
/// longer is a malformed prompt, and the bound keeps a forged length field harmless.
pub const MAX_PROMPT_ID_BYTES: usize = 1024;

/// Most tokens one segment may carry. Segments are at most S tokens (a few thousand in
/// practice); 1 Mi tokens (8 MiB of payload) leaves ample room while bounding what a forged
/// token count can make the decoder consider.
pub const MAX_TOKENS_PER_SEGMENT: usize = 1 << 20;

/// Bytes before the prompt id: magic, format version, prompt-id length.
const PREFIX_LEN: usize = 4 + 2 + 4;
/// Fixed-size fields between the prompt id and the tokens: sample, seq, policy version,
/// lease epoch, finish reason, token count.
const FIXED_LEN: usize = 4 + 4 + 8 + 8 + 1 + 4;
/// The trailing checksum.
const CRC_LEN: usize = 4;
/// Bytes per token: a u32 id and an f32 log-probability.
const BYTES_PER_TOKEN: usize = 4 + 4;

/// The largest encoding this build will produce or accept, in bytes.
pub const MAX_ENCODED_LEN: usize = PREFIX_LEN
    + MAX_PROMPT_ID_BYTES
    + FIXED_LEN
    + MAX_TOKENS_PER_SEGMENT * BYTES_PER_TOKEN
    + CRC_LEN;

/// Why a segment could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CodecError {
    /// The input ends before the encoding does: the object was cut short (a partial upload
    /// or a truncated read). Re-fetch it; if it stays short, the segment is lost.
    #[error("encoded segment is truncated: needs {needed} bytes, has {available}")]
    Truncated {
        /// Bytes the encoding needs up to the point where it ran out.
        needed: usize,
        /// Bytes actually present.
        available: usize,
    },
    /// The input does not start with [`MAGIC`]: it is not a Flywheel segment at all (wrong
    /// key, or another object written there).
    #[error(
        "not an encoded segment: magic bytes are {found:02x?}, expected {MAGIC:02x?} (\"FWSG\")"
    )]
    BadMagic {
        /// The first four bytes of the input.
        found: [u8; 4],
    },
    /// The segment was written in a format version this build does not read; upgrade the
    /// reader (or the writer wrote from a newer build).
    #[error(
        "segment format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// The version in the input.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// A length field (or a segment being encoded) exceeds the codec's documented limit.
    #[error("segment field `{field}` has length {len}, over the limit of {max}")]
    Oversized {
        /// Which field.
        field: &'static str,
        /// Its length as stated (or as given to the encoder).
        len: u64,
        /// The limit ([`MAX_PROMPT_ID_BYTES`] or [`MAX_TOKENS_PER_SEGMENT`]).
        max: u64,
    },
    /// Bytes follow the checksum: the object holds more than one encoding, or a length field
    /// was corrupted to a smaller value.
    #[error("{extra} unexpected bytes after the end of the encoded segment")]
    TrailingBytes {
        /// How many bytes follow the encoding.
        extra: usize,
    },
    /// The stored CRC-32C does not match the content: the object is corrupt and must not be
    /// trained on.
    #[error("segment checksum mismatch: stored crc32c {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The checksum in the input.
        stored: u32,
        /// The checksum of the input's content.
        computed: u32,
    },
    /// A field holds a value no valid segment has (an unknown finish reason, a prompt id that
    /// is not UTF-8, tokens and logprobs of different lengths, a NaN logprob…).
    #[error("invalid segment field `{field}`: {reason}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The on-disk code of each finish reason. Fixed forever within a format version.
fn finish_code(finish: FinishReason) -> u8 {
    match finish {
        FinishReason::None => 0,
        FinishReason::Eos => 1,
        FinishReason::Length => 2,
        FinishReason::Abort => 3,
    }
}

fn finish_from_code(code: u8) -> Result<FinishReason, CodecError> {
    Ok(match code {
        0 => FinishReason::None,
        1 => FinishReason::Eos,
        2 => FinishReason::Length,
        3 => FinishReason::Abort,
        other => {
            return Err(CodecError::InvalidField {
                field: "finish",
                reason: format!("unknown finish-reason code {other} (known: 0..=3)"),
            });
        }
    })
}

/// Checks the prompt id both ways round: the encoder refuses what the decoder would reject.
fn check_prompt_id(id: &str) -> Result<(), CodecError> {
    if id.is_empty() {
        return Err(CodecError::InvalidField {
            field: "prompt_id",
            reason: "empty".into(),
        });
    }
    Ok(())
}

/// NaN would poison the IcePop ratio silently and +∞ is not a log-probability; −∞ (a token
/// the engine thought impossible) is kept so the loss can mask it.
fn check_logprob(index: usize, lp: f32) -> Result<(), CodecError> {
    if lp.is_nan() || lp == f32::INFINITY {
        return Err(CodecError::InvalidField {
            field: "logprobs",
            reason: format!("logprob {index} is {lp}, not a log-probability"),
        });
    }
    Ok(())
}

/// The exact length of `segment`'s encoding (without validating it).
pub fn encoded_len(segment: &Segment) -> usize {
    PREFIX_LEN
        + segment.trajectory.prompt.0.len()
        + FIXED_LEN
        + segment.tokens.len() * BYTES_PER_TOKEN
        + CRC_LEN
}

/// Encodes `segment`.
///
/// Fails (rather than writing something [`decode`] would reject) when the prompt id is empty
/// or longer than [`MAX_PROMPT_ID_BYTES`], there are more than [`MAX_TOKENS_PER_SEGMENT`]
/// tokens, `tokens` and `logprobs` differ in length, or a logprob is NaN or +∞.
pub fn encode(segment: &Segment) -> Result<Bytes, CodecError> {
    let prompt = segment.trajectory.prompt.0.as_bytes();
    if prompt.len() > MAX_PROMPT_ID_BYTES {
        return Err(CodecError::Oversized {
            field: "prompt_id",
            len: prompt.len() as u64,
            max: MAX_PROMPT_ID_BYTES as u64,
        });
    }
    check_prompt_id(&segment.trajectory.prompt.0)?;
    let n = segment.tokens.len();
    if n > MAX_TOKENS_PER_SEGMENT {
        return Err(CodecError::Oversized {
            field: "tokens",
            len: n as u64,
            max: MAX_TOKENS_PER_SEGMENT as u64,
        });
    }
    if segment.logprobs.len() != n {
        return Err(CodecError::InvalidField {
            field: "logprobs",
            reason: format!("{} logprobs for {n} tokens", segment.logprobs.len()),
        });
    }
    for (i, &lp) in segment.logprobs.iter().enumerate() {
        check_logprob(i, lp)?;
    }

    let mut out = Vec::with_capacity(encoded_len(segment));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // Both lengths fit in u32: they were checked against limits far below u32::MAX.
    out.extend_from_slice(&(prompt.len() as u32).to_le_bytes());
    out.extend_from_slice(prompt);
    out.extend_from_slice(&segment.trajectory.sample.to_le_bytes());
    out.extend_from_slice(&segment.seq.to_le_bytes());
    out.extend_from_slice(&segment.version.to_le_bytes());
    out.extend_from_slice(&segment.lease_epoch.to_le_bytes());
    out.push(finish_code(segment.finish));
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for token in &segment.tokens {
        out.extend_from_slice(&token.to_le_bytes());
    }
    for lp in &segment.logprobs {
        out.extend_from_slice(&lp.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), encoded_len(segment));
    Ok(Bytes::from(out))
}

/// The input ended before a read: `needed` bytes were wanted up to that point,
/// `available` were there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("truncated: needs {needed} bytes, has {available}")]
pub struct Truncated {
    /// Bytes the read needed, counted from the start of the input.
    pub needed: usize,
    /// Bytes in the input.
    pub available: usize,
}

impl From<Truncated> for CodecError {
    fn from(t: Truncated) -> Self {
        CodecError::Truncated {
            needed: t.needed,
            available: t.available,
        }
    }
}

/// A bounds-checked little-endian reader over a byte buffer: every read either succeeds or
/// says how many bytes it needed, so no slice index can go out of range. Every binary format
/// of the workspace (segments, gradients, optimizer state) is read through it.
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        ByteReader { buf, pos: 0 }
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `len` bytes.
    pub fn take(&mut self, len: usize) -> Result<&'a [u8], Truncated> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.buf.len())
            .ok_or(Truncated {
                needed: self.pos.saturating_add(len),
                available: self.buf.len(),
            })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.array::<1>()?[0])
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A little-endian IEEE `f64`.
    pub fn f64(&mut self) -> Result<f64, Truncated> {
        Ok(f64::from_bits(self.u64()?))
    }
}

/// Decodes one segment, rejecting anything truncated, oversized or corrupt.
///
/// The checks run in an order that gives the most useful error: magic, then format version,
/// then the length fields against the limits and the input's length, then the checksum, and
/// only then the meaning of the fields. Never panics, whatever `input` holds.
pub fn decode(input: &[u8]) -> Result<Segment, CodecError> {
    let mut r = ByteReader::new(input);

    // A short input that is not even a prefix of the magic is "not a segment", not "truncated".
    let head = &input[..input.len().min(MAGIC.len())];
    if head != &MAGIC[..head.len()] {
        let mut found = [0u8; 4];
        found[..head.len()].copy_from_slice(head);
        return Err(CodecError::BadMagic { found });
    }
    r.take(MAGIC.len())?;

    let version = r.u16()?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }

    let prompt_len = r.u32()? as usize;
    if prompt_len > MAX_PROMPT_ID_BYTES {
        return Err(CodecError::Oversized {
            field: "prompt_id",
            len: prompt_len as u64,
            max: MAX_PROMPT_ID_BYTES as u64,
        });
    }
    let prompt = r.take(prompt_len)?;
    let sample = r.u32()?;
    let seq = r.u32()?;
    let policy_version = r.u64()?;
    let lease_epoch = r.u64()?;
    let finish_code = r.u8()?;
    let n = r.u32()? as usize;
    if n > MAX_TOKENS_PER_SEGMENT {
        return Err(CodecError::Oversized {
            field: "tokens",
            len: n as u64,
            max: MAX_TOKENS_PER_SEGMENT as u64,
        });
    }

    // Bounded by the limits above, so this cannot overflow.
    let body_end = r.position() + n * BYTES_PER_TOKEN;
    let total = body_end + CRC_LEN;
    if input.len() < total {
        return Err(CodecError::Truncated {
            needed: total,
            available: input.len(),
        });
    }
    if input.len() > total {
        return Err(CodecError::TrailingBytes {
            extra: input.len() - total,
        });
    }
    let token_bytes = r.take(n * 4)?;
    let logprob_bytes = r.take(n * 4)?;
    let stored = r.u32()?;
    let computed = crc32c::crc32c(&input[..body_end]);
    if stored != computed {
        return Err(CodecError::ChecksumMismatch { stored, computed });
    }

    // The content is what the writer wrote; now check it means something.
    let prompt = std::str::from_utf8(prompt).map_err(|e| CodecError::InvalidField {
        field: "prompt_id",
        reason: format!("not UTF-8: {e}"),
    })?;
    check_prompt_id(prompt)?;
    let finish = finish_from_code(finish_code)?;
    let tokens: Vec<u32> = token_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let logprobs: Vec<f32> = logprob_bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    for (i, &lp) in logprobs.iter().enumerate() {
        check_logprob(i, lp)?;
    }

    Ok(Segment {
        trajectory: TrajectoryId {
            prompt: PromptId(prompt.to_owned()),
            sample,
        },
        seq,
        version: policy_version,
        lease_epoch,
        tokens,
        logprobs,
        finish,
    })
}
