//! The text side of a Hugging Face checkpoint: `tokenizer.json` through the `tokenizers`
//! crate, and the chat template (`tokenizer_config.json`'s `chat_template`, or
//! `chat_template.jinja` beside it) rendered with minijinja, so that a prompt can be chat
//! messages.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// One chat message, as chat templates expect it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A checkpoint's tokenizer and chat template.
pub struct HfTokenizer {
    /// The tokenizer of `tokenizer.json`.
    inner: tokenizers::Tokenizer,
    /// The Jinja chat template, if the checkpoint has one.
    chat_template: Option<String>,
    /// `bos_token` and `eos_token` of `tokenizer_config.json`, which templates may use.
    bos_token: Option<String>,
    /// See `bos_token`.
    eos_token: Option<String>,
}

fn tok_err(msg: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(msg.to_string())
}

/// A special token of `tokenizer_config.json`: a string, or an object with `content`.
fn special_token(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl HfTokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            tok_err(format!(
                "{}: {e} (a checkpoint needs a tokenizer.json; convert a slow tokenizer with \
                 transformers' save_pretrained)",
                path.display()
            ))
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| tok_err(format!("{}: {e}", config_path.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| tok_err(format!("{}: not valid JSON: {e}", config_path.display())))?
        } else {
            Value::Null
        };
        let chat_template = match &config["chat_template"] {
            Value::String(t) => Some(t.clone()),
            // Several named templates: the "default" one.
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => {
                let file = dir.join("chat_template.jinja");
                if file.is_file() {
                    Some(
                        std::fs::read_to_string(&file)
                            .map_err(|e| tok_err(format!("{}: {e}", file.display())))?,
                    )
                } else {
                    None
                }
            }
        };
        Ok(HfTokenizer {
            inner,
            chat_template,
            bos_token: special_token(&config["bos_token"]),
            eos_token: special_token(&config["eos_token"]),
        })
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string (e.g. `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of `eos_token` of `tokenizer_config.json`, if set.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The tokens that end a response of the checkpoint in `dir`: its EOS ids
    /// ([`crate::hf::eos_tokens`]) and this tokenizer's `eos_token`; an error if there is none.
    pub fn stop_tokens(&self, dir: &Path) -> Result<Vec<u32>> {
        let mut stop = crate::hf::eos_tokens(dir)?;
        stop.extend(self.eos_id().filter(|id| !stop.contains(id)));
        if stop.is_empty() {
            return Err(tok_err(format!(
                "{}: no EOS token (generation_config.json, config.json or tokenizer_config.json \
                 `eos_token`): responses would never end",
                dir.display()
            )));
        }
        Ok(stop)
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (a BOS
    /// for Llama 3, nothing for Qwen). Rendered chat templates already hold their specials.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| tok_err(format!("cannot decode {ids:?}: {e}")))
    }

    /// Whether the checkpoint has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// `messages` rendered with the chat template, followed by the assistant's turn opening
    /// when `add_generation_prompt`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            tok_err(
                "the checkpoint has no chat template (tokenizer_config.json `chat_template` or \
                 chat_template.jinja); send plain text prompts instead",
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Templates written for transformers' Jinja: keep the trailing newline, and let a
        // template fail with its own message.
        env.set_keep_trailing_newline(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| tok_err(format!("the chat template does not parse: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| tok_err(format!("the chat template failed: {e}")))
    }

    /// Token ids of `messages` as a prompt: rendered, then encoded without adding specials
    /// (the template holds them), as transformers' `apply_chat_template` does.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, true)?, false)
    }
}

/// How a run turns text prompts into tokens and responses back into text: the built-in
/// character tokenizer, or a Hugging Face checkpoint's. Workers and trainers of a run must use
/// the same one, so that a prompt has the same tokens wherever it is read.
#[derive(Clone)]
pub enum TextCodec {
    /// The character tokenizer of the built-in task (BOS in front of every prompt).
    Chars(Tokenizer),
    /// A checkpoint's tokenizer (its own special tokens, e.g. a Llama BOS) and the tokens that
    /// end its responses.
    Hf(Arc<HfTokenizer>, Vec<u32>),
}

impl TextCodec {
    /// The checkpoint's tokenizer when `hf_model` names a directory, else the characters of
    /// `charset`.
    pub fn open(hf_model: &str, charset: &str) -> Result<Self> {
        if hf_model.is_empty() {
            return Tokenizer::new(charset)
                .map(TextCodec::Chars)
                .map_err(|e| tok_err(format!("charset: {e}")));
        }
        let dir = Path::new(hf_model);
        let tok = HfTokenizer::open(dir)?;
        let stop = tok.stop_tokens(dir)?;
        Ok(TextCodec::Hf(Arc::new(tok), stop))
    }

    /// Number of token ids the tokenizer produces.
    pub fn vocab_size(&self) -> usize {
        match self {
            TextCodec::Chars(t) => t.vocab_size(),
            TextCodec::Hf(t, _) => t.vocab_size(),
        }
    }

    /// The tokens that end a response; the first is the one references end with.
    pub fn stop_tokens(&self) -> &[u32] {
        match self {
            TextCodec::Chars(_) => &[Tokenizer::EOS],
            TextCodec::Hf(_, stop) => stop,
        }
    }

    /// A text prompt's tokens.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            TextCodec::Chars(t) => t.encode_prompt(text).map_err(tok_err),
            TextCodec::Hf(t, _) => t.encode(text, true),
        }
    }

    /// A reference response's tokens, ending with EOS (supervised examples).
    pub fn encode_response(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = match self {
            TextCodec::Chars(t) => t.encode(text).map_err(tok_err)?,
            TextCodec::Hf(t, _) => t.encode(text, false)?,
        };
        ids.push(self.stop_tokens()[0]);
        Ok(ids)
    }

    /// The text of response tokens, for verifiers: special tokens (EOS) left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            TextCodec::Chars(t) => t.decode(ids).map_err(tok_err),
            TextCodec::Hf(t, _) => t
                .inner
                .decode(ids, true)
                .map_err(|e| tok_err(format!("cannot decode {ids:?}: {e}"))),
        }
    }
}
