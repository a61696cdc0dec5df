//! A character-level tokenizer: one id per character of a fixed charset, plus the special
//! tokens PAD, BOS and EOS.

use std::collections::HashMap;

/// Why text or ids could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// The text holds a character outside the charset.
    #[error(
        "character {ch:?} at character index {index} is not in the tokenizer's charset {charset:?}"
    )]
    UnknownChar {
        /// The offending character.
        ch: char,
        /// Its index (in characters) in the text.
        index: usize,
        /// The characters the tokenizer knows.
        charset: String,
    },
    /// An id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// Number of ids the tokenizer knows.
        vocab_size: usize,
    },
    /// The charset given to [`Tokenizer::new`] is empty or repeats a character.
    #[error("invalid charset: {0}")]
    InvalidCharset(String),
}

/// Character-level tokenizer. Ids: [`Tokenizer::PAD`] = 0, [`Tokenizer::BOS`] = 1,
/// [`Tokenizer::EOS`] = 2, then the charset's characters in order from 3.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenizer {
    /// The characters, in id order (id = index + [`Tokenizer::NUM_SPECIAL`]).
    charset: Vec<char>,
    /// Character → id.
    ids: HashMap<char, u32>,
}

impl Tokenizer {
    /// Padding id (never produced by `encode`).
    pub const PAD: u32 = 0;
    /// Beginning-of-sequence id; prompts start with it.
    pub const BOS: u32 = 1;
    /// End-of-sequence id; generation stops when it is sampled.
    pub const EOS: u32 = 2;
    /// Number of special ids before the first character.
    pub const NUM_SPECIAL: u32 = 3;
    /// The charset of the built-in arithmetic task: digits, operators and separators.
    pub const ARITHMETIC_CHARSET: &'static str = "0123456789+-*=,; ";

    /// A tokenizer over the characters of `charset` (each at most once).
    pub fn new(charset: &str) -> Result<Self, TokenizerError> {
        if charset.is_empty() {
            return Err(TokenizerError::InvalidCharset(
                "the charset is empty; give every character the text may contain".into(),
            ));
        }
        let charset: Vec<char> = charset.chars().collect();
        let mut ids = HashMap::with_capacity(charset.len());
        for (i, &c) in charset.iter().enumerate() {
            if ids.insert(c, i as u32 + Self::NUM_SPECIAL).is_some() {
                return Err(TokenizerError::InvalidCharset(format!(
                    "character {c:?} appears more than once"
                )));
            }
        }
        Ok(Tokenizer { charset, ids })
    }

    /// The tokenizer of the built-in arithmetic task ([`Self::ARITHMETIC_CHARSET`]).
    pub fn arithmetic() -> Self {
        Self::new(Self::ARITHMETIC_CHARSET).expect("the built-in charset is valid")
    }

    /// Number of ids (specials included); the model's `vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.charset.len() + Self::NUM_SPECIAL as usize
    }

    /// The characters, in id order.
    pub fn charset(&self) -> String {
        self.charset.iter().collect()
    }

    /// The ids of `text`'s characters (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len());
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Appends the ids of `text`'s characters to `out`; on error `out` is left unchanged.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let start = out.len();
        for (index, ch) in text.chars().enumerate() {
            match self.ids.get(&ch) {
                Some(&id) => out.push(id),
                None => {
                    out.truncate(start);
                    return Err(TokenizerError::UnknownChar {
                        ch,
                        index,
                        charset: self.charset(),
                    });
                }
            }
        }
        Ok(())
    }

    /// A prompt as the model sees it: BOS then `text`'s ids.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() + 1);
        out.push(Self::BOS);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// The character of `id`, or `None` for a special id.
    pub fn token_char(&self, id: u32) -> Result<Option<char>, TokenizerError> {
        if id < Self::NUM_SPECIAL {
            return Ok(None);
        }
        self.charset
            .get((id - Self::NUM_SPECIAL) as usize)
            .map(|&c| Some(c))
            .ok_or(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size(),
            })
    }

    /// The text of `ids`; special ids (PAD, BOS, EOS) produce no characters.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut s = String::with_capacity(ids.len());
        for &id in ids {
            if let Some(c) = self.token_char(id)? {
                s.push(c);
            }
        }
        Ok(s)
    }

    /// The same tokenizer as Hugging Face files: `tokenizer.json` (a word-level model over
    /// single characters, BOS added in front like [`Tokenizer::encode_prompt`], pieces fused
    /// back on decoding), `tokenizer_config.json` and `generation_config.json`, so that an
    /// exported built-in model loads with its tokenizer anywhere.
    pub fn hf_files(&self) -> [(&'static str, String); 3] {
        const SPECIALS: [&str; 3] = ["<pad>", "<s>", "</s>"];
        let mut vocab = serde_json::Map::new();
        for (id, name) in SPECIALS.iter().enumerate() {
            vocab.insert((*name).to_owned(), serde_json::json!(id));
        }
        for (i, c) in self.charset.iter().enumerate() {
            vocab.insert(
                c.to_string(),
                serde_json::json!(i as u32 + Self::NUM_SPECIAL),
            );
        }
        let added: Vec<serde_json::Value> = SPECIALS
            .iter()
            .enumerate()
            .map(|(id, content)| {
                serde_json::json!({"id": id, "content": content, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let bos = serde_json::json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let tokenizer = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."},
                              "behavior": "Isolated", "invert": false},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [Self::BOS], "tokens": ["<s>"]}},
            },
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        let config = serde_json::json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        let generation = serde_json::json!({
            "bos_token_id": Self::BOS,
            "eos_token_id": Self::EOS,
            "pad_token_id": Self::PAD,
        });
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON value");
        [
            ("tokenizer.json", pretty(&tokenizer)),
            ("tokenizer_config.json", pretty(&config)),
            ("generation_config.json", pretty(&generation)),
        ]
    }
}
