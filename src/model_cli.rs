//! `flywheel model …`: score and sample any checkpoint directory of the family, the way a user
//! checks Flywheel against other tools.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flywheel_model::{
    ChatMessage, Checkpoint, HfTokenizer, Model, SampleConfig, Sampler, Sequence, StopReason,
};
use rand::SeedableRng;
use serde_json::json;

/// What `flywheel model` does.
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {
    /// Print `{"tokens": [...], "logprobs": [null, ...]}`: `logprobs[i]` is
    /// log p(tokens[i] | tokens[..i]) under the model (the first token has none).
    Logprobs {
        /// A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, conflicts_with = "text", required_unless_present = "text")]
        tokens: Option<String>,
        /// Text, encoded as transformers' `tokenizer(text)` does (with the tokenizer's
        /// special tokens, e.g. a BOS).
        #[arg(long)]
        text: Option<String>,
    },
    /// Sample a completion of a prompt and print it.
    Generate {
        /// A Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// The prompt text.
        #[arg(long)]
        prompt: String,
        /// Send the prompt as a user message through the checkpoint's chat template.
        #[arg(long)]
        chat: bool,
        /// Most tokens to sample.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Softmax temperature (0 is greedy).
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Nucleus sampling mass (1 keeps every token).
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 keeps every token).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Seed of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print JSON (prompt and sampled token ids, log-probs, text, why it stopped).
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `flywheel model` command, printing its result to standard output.
pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Logprobs {
            model,
            tokens,
            text,
        } => {
            let out = logprobs(&model, tokens.as_deref(), text.as_deref())?;
            println!("{out}");
        }
        ModelCommand::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            json,
        } => {
            let sample = SampleConfig {
                temperature,
                top_p,
                top_k,
            };
            let out = generate(&model, &prompt, chat, max_new_tokens, sample, seed)?;
            if json {
                println!("{out}");
            } else {
                println!("{}", out["text"].as_str().unwrap_or_default());
            }
        }
    }
    Ok(())
}

fn open(dir: &Path) -> anyhow::Result<(Checkpoint, HfTokenizer)> {
    let ckpt = Checkpoint::open(dir, None)?;
    let tok = HfTokenizer::open(dir)?;
    Ok((ckpt, tok))
}

/// The JSON of `flywheel model logprobs`.
pub fn logprobs(
    dir: &Path,
    tokens: Option<&str>,
    text: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let (ckpt, tok) = open(dir)?;
    let ids: Vec<u32> = match (tokens, text) {
        (Some(list), _) => list
            .split(',')
            .map(|t| {
                t.trim()
                    .parse()
                    .with_context(|| format!("--tokens: `{t}` is not a token id"))
            })
            .collect::<anyhow::Result<_>>()?,
        (None, Some(text)) => tok.encode(text, true)?,
        (None, None) => bail!("pass --tokens or --text"),
    };
    if ids.is_empty() {
        bail!("nothing to score: the input has no tokens");
    }
    let model = Model::cpu(&ckpt.params)?;
    let cache = model.forward(&[Sequence {
        tokens: &ids,
        response_start: 1,
    }])?;
    let mut logprobs = vec![serde_json::Value::Null];
    logprobs.extend(cache.logprobs().iter().map(|&lp| json!(lp)));
    Ok(json!({ "tokens": ids, "logprobs": logprobs }))
}

/// The JSON of `flywheel model generate --json`.
pub fn generate(
    dir: &Path,
    prompt: &str,
    chat: bool,
    max_new_tokens: usize,
    sample: SampleConfig,
    seed: u64,
) -> anyhow::Result<serde_json::Value> {
    let (ckpt, tok) = open(dir)?;
    let prompt_ids = if chat {
        tok.encode_chat(&[ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        }])?
    } else {
        tok.encode(prompt, true)?
    };
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens; give some text");
    }
    let stop = tok.stop_tokens(dir)?;
    let model = Model::cpu(&ckpt.params)?;
    let mut sampler = Sampler::new(&model)?;
    sampler.prefill(&model, &prompt_ids)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    let reason = sampler.generate(
        &model,
        &sample,
        max_new_tokens,
        &stop,
        &mut rng,
        &mut tokens,
        &mut logprobs,
    )?;
    let shown = match reason {
        StopReason::Eos => &tokens[..tokens.len() - 1],
        _ => &tokens[..],
    };
    Ok(json!({
        "prompt_tokens": prompt_ids,
        "tokens": tokens,
        "logprobs": logprobs,
        "text": tok.decode(shown)?,
        "stop": reason,
    }))
}
