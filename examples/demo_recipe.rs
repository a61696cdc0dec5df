//! The demo's recipe in one process, without the infrastructure: warm-start the built-in model
//! on the addition task with a deliberately short supervised phase, then improve it with GRPO
//! (IcePop + PPO-clip loss with the constant normaliser Φ, AdamW), and report held-out
//! accuracy before, during and after RL.
//!
//! It calibrates `flywheel demo`, which wires the same pieces (task, model, loss, optimizer)
//! through the real worker, coordinator and trainer: if this loop does not learn, neither can
//! the demo.
//!
//! ```text
//! cargo run --release --example demo_recipe                # the default recipe, seed 0
//! cargo run --release --example demo_recipe -- --seed 1    # another seed
//! cargo run --release --example demo_recipe -- --help      # every knob
//! ```
//!
//! Evaluation samples one response per held-out prompt at temperature 1 (the policy RL
//! optimises) with a fixed random stream per prompt, so the numbers before and after RL differ
//! only by the weights (`--eval-greedy` evaluates greedy decoding instead).
//!
//! The default recipe:
//! - task: [`TaskConfig::default`], 2..=20 terms of 0..=9 with P(n) ∝ n⁻², responses of 11 to
//!   84 tokens; 400 held-out problems;
//! - model: d_model 64, 2 layers, 4 heads, d_ff 256 (110 016 parameters);
//! - warm start: 32 problems per step, AdamW lr 3e-3, stopped as soon as 15% of 256 training
//!   prompts are solved at temperature 1 (checked every 25 steps);
//! - RL: 600 steps of GRPO, K = 8, rounds of 16 prompts until Φ = 2048 response tokens sit in
//!   groups with non-zero reward variance (at most 4 rounds), one on-policy AdamW step per
//!   batch (lr 3e-4, no weight decay, gradient norm clipped at 1), PPO ε = 0.2, IcePop
//!   [0.5, 5].
//!
//! It prints the held-out accuracy before and after RL, the wall time, and the sampling and
//! training throughput it measured.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use flywheel_model::{
    Model, ModelConfig, Params, SampleConfig, Sampler, Sequence, Tensor, TextCodec, Tokenizer,
};
use flywheel_task::eval::respond;
use flywheel_task::{Problem, ProblemStream, Split, TaskConfig, held_out_set, mix};
use flywheel_trainer::step::SupervisedExample;
use flywheel_trainer::{
    AdamW, AdamWConfig, LossConfig, LossStats, Param, PolicyLoss, PolicyTokens, SupervisedTokens,
    supervised_loss,
};
use rayon::prelude::*;

/// Every setting of the recipe; the defaults are the calibrated demo.
#[derive(Parser, Debug, Clone)]
#[command(about = "The flywheel demo's recipe in one process: short SFT, then GRPO")]
struct Args {
    /// Seed of the model initialisation, the problem streams and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    // ---- the task ----
    /// Fewest terms per problem.
    #[arg(long, default_value_t = TaskConfig::default().min_terms)]
    min_terms: usize,
    /// Most terms per problem.
    #[arg(long, default_value_t = TaskConfig::default().max_terms)]
    max_terms: usize,
    /// Largest term.
    #[arg(long, default_value_t = TaskConfig::default().max_term)]
    max_term: u32,
    /// Exponent of the length distribution P(n) ∝ n^(−a).
    #[arg(long, default_value_t = TaskConfig::default().tail_exponent)]
    tail_exponent: f64,

    // ---- the model ----
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Number of transformer blocks.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Number of attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,

    // ---- the supervised warm start ----
    /// Most supervised steps.
    #[arg(long, default_value_t = 600)]
    sft_steps: usize,
    /// The warm start stops as soon as the policy solves this fraction of a fixed set of
    /// training prompts (temperature 1), so that it is mediocre by design whatever the seed;
    /// 0 runs all `--sft-steps`.
    #[arg(long, default_value_t = 0.15)]
    sft_target: f64,
    /// Check the warm start's accuracy every this many supervised steps.
    #[arg(long, default_value_t = 25)]
    sft_check_every: usize,
    /// Training prompts the warm start's accuracy is checked on.
    #[arg(long, default_value_t = 256)]
    sft_check_size: usize,
    /// Problems per supervised step.
    #[arg(long, default_value_t = 32)]
    sft_batch: usize,
    /// Learning rate of the supervised phase.
    #[arg(long, default_value_t = 3e-3)]
    sft_lr: f64,

    // ---- RL ----
    /// RL optimizer steps.
    #[arg(long, default_value_t = 600)]
    rl_steps: usize,
    /// Samples per prompt (the GRPO group size K).
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    /// Prompts sampled per generation round; rounds repeat until Φ tokens are collected.
    #[arg(long, default_value_t = 16)]
    prompts_per_round: usize,
    /// Most generation rounds per step (bounds a step once most groups have zero variance).
    #[arg(long, default_value_t = 4)]
    max_rounds: usize,
    /// The token budget Φ per optimizer step, and the loss's constant normaliser.
    #[arg(long, default_value_t = 2048)]
    token_budget: u64,
    /// Learning rate of the RL phase.
    #[arg(long, default_value_t = 3e-4)]
    rl_lr: f64,
    /// Optimizer steps per batch of rollouts: the batch is split in this many mini-batches
    /// (the first is on-policy; later ones are off-policy by one or more steps).
    #[arg(long, default_value_t = 1)]
    minibatches: usize,
    /// PPO clip range ε.
    #[arg(long, default_value_t = 0.2)]
    clip_epsilon: f64,

    // ---- evaluation ----
    /// Held-out problems evaluated before and after RL.
    #[arg(long, default_value_t = 400)]
    eval_size: usize,
    /// Evaluate every this many RL steps (0: only before and after).
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Evaluate greedy decoding instead of temperature-1 sampling.
    #[arg(long)]
    eval_greedy: bool,
    /// Also print the accuracy per number of terms at each evaluation.
    #[arg(long)]
    eval_by_length: bool,
}

/// One sampled response to a prompt.
struct Rollout {
    /// Response token ids, EOS included when it was sampled.
    tokens: Vec<u32>,
    /// logπ_infer of each response token, as the sampler reported it.
    logprobs: Vec<f32>,
    /// The reward of the response.
    reward: f32,
}

/// A prompt and its K rollouts, with their group advantages.
struct Group {
    /// The prompt's token ids (BOS first).
    prompt: Vec<u32>,
    /// The K responses.
    rollouts: Vec<Rollout>,
    /// One advantage per rollout.
    advantages: Vec<f32>,
}

/// Counts tokens generated and trained, for throughput figures.
#[derive(Default)]
struct Throughput {
    /// Response tokens sampled (rollouts and evaluations).
    generated: u64,
    /// Wall seconds spent sampling.
    gen_secs: f64,
    /// Response tokens trained on (supervised and RL).
    trained: u64,
    /// Wall seconds spent in forward, loss, backward and optimizer steps.
    train_secs: f64,
}

/// The model being trained and everything the phases share.
struct Recipe {
    /// The settings.
    args: Args,
    /// The character tokenizer of the arithmetic charset.
    tok: Tokenizer,
    /// The task's shape (from the settings).
    task: TaskConfig,
    /// The canonical weights the optimizer updates (the model holds a copy).
    params: Params,
    /// The model at `params`, for sampling and training.
    model: Model,
    /// Most response tokens a sample may have (the longest reference, its EOS, and slack).
    max_new: usize,
    /// Token counts and time, for the throughput report.
    throughput: Throughput,
}

impl Recipe {
    fn new(args: Args) -> Result<Self> {
        let task = TaskConfig {
            min_terms: args.min_terms,
            max_terms: args.max_terms,
            max_term: args.max_term,
            tail_exponent: args.tail_exponent,
        };
        task.validate()?;
        let tok = Tokenizer::arithmetic();
        let max_new = task.max_response_chars() + 1 + 8;
        let config = ModelConfig {
            d_model: args.d_model,
            n_layers: args.layers,
            n_heads: args.heads,
            d_ff: 4 * args.d_model,
            // BOS, the prompt, the response and its EOS.
            max_seq_len: 1 + task.prompt_chars() + max_new,
            ..ModelConfig::tiny(tok.vocab_size())
        };
        let params = Params::init(&config, args.seed)?;
        let model = Model::cpu(&params)?;
        Ok(Self {
            args,
            tok,
            task,
            params,
            model,
            max_new,
            throughput: Throughput::default(),
        })
    }

    fn prompt_ids(&self, p: &Problem) -> Result<Vec<u32>> {
        Ok(self.tok.encode_prompt(&self.task.prompt(p))?)
    }

    /// Applies one AdamW step with the model's accumulated gradients and reloads the weights.
    fn apply(&mut self, opt: &mut AdamW, grads: &Params) -> Result<f64> {
        let mut list: Vec<Param<'_>> = self
            .params
            .tensors_mut()
            .iter_mut()
            .zip(grads.tensors())
            .map(|(Tensor { name, data, .. }, g)| Param {
                name: name.as_str(),
                value: data.as_mut_slice(),
                grad: &g.data,
            })
            .collect();
        let report = opt.step(&mut list)?;
        self.model.load_params(&self.params)?;
        Ok(report.grad_norm)
    }

    /// The supervised warm start: cross-entropy on reference responses.
    /// Returns the number of steps taken.
    fn warm_start(&mut self) -> Result<usize> {
        let a = &self.args;
        let mut opt = AdamW::new(AdamWConfig {
            lr: a.sft_lr,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        })?;
        let mut stream = ProblemStream::new(self.task.clone(), Split::Train, mix(&[a.seed, 1]))?;
        let mut grads = self.model.new_gradients()?;
        let (steps, batch, target, every) = (
            a.sft_steps,
            a.sft_batch,
            a.sft_target,
            a.sft_check_every.max(1),
        );
        // Training prompts (never the held-out ones) on which the warm start is checked.
        let check: Vec<Problem> =
            ProblemStream::new(self.task.clone(), Split::Train, mix(&[a.seed, 6]))?
                .take(a.sft_check_size)
                .collect();
        for step in 0..steps {
            let t0 = Instant::now();
            let mut seqs_owned = Vec::with_capacity(batch);
            for p in stream.by_ref().take(batch) {
                let mut ids = self.prompt_ids(&p)?;
                let start = ids.len();
                self.tok.encode_into(&self.task.reference(&p), &mut ids)?;
                ids.push(Tokenizer::EOS);
                seqs_owned.push(SupervisedExample {
                    tokens: ids,
                    response_start: start,
                });
            }
            let seqs: Vec<Sequence<'_>> =
                seqs_owned.iter().map(SupervisedExample::sequence).collect();
            let cache = self.model.forward(&seqs)?;
            let n = cache.logprobs().len();
            let trained = vec![true; n];
            let out = supervised_loss(
                &SupervisedTokens {
                    new_logprobs: cache.logprobs(),
                    trained: &trained,
                },
                n as u64,
            )?;
            self.model.zero_gradients(&mut grads)?;
            self.model.backward(&cache, &out.grad, None, &mut grads)?;
            let g = self.model.gradients_to_params(&grads)?;
            self.apply(&mut opt, &g)?;
            self.throughput.trained += n as u64;
            self.throughput.train_secs += t0.elapsed().as_secs_f64();
            if target > 0.0 && (step + 1) % every == 0 {
                let acc = self.evaluate(&check, false)?;
                println!(
                    "sft step {:>4}/{steps}  loss {:.4}  train-prompt accuracy {:.1}%",
                    step + 1,
                    out.loss(),
                    100.0 * acc
                );
                if acc >= target {
                    return Ok(step + 1);
                }
            } else if (step + 1) % every == 0 {
                println!("sft step {:>4}/{steps}  loss {:.4}", step + 1, out.loss());
            }
        }
        Ok(steps)
    }

    /// Samples one response per (prompt, seed) in parallel.
    fn sample(
        &mut self,
        jobs: &[(&Problem, &[u32], u64)],
        sample: SampleConfig,
    ) -> Result<Vec<Rollout>> {
        let t0 = Instant::now();
        let model = &self.model;
        let tok = &TextCodec::Chars(self.tok.clone());
        let max_new = self.max_new;
        let out: Vec<Rollout> = jobs
            .par_iter()
            .map_init(
                || Sampler::new(model),
                |sampler, &(problem, prompt, seed)| -> Result<Rollout> {
                    let sampler = sampler.as_mut().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let r = respond(
                        sampler,
                        model,
                        prompt,
                        &sample,
                        tok.stop_tokens(),
                        max_new,
                        seed,
                    )?;
                    Ok(Rollout {
                        reward: r.reward(problem, tok),
                        tokens: r.tokens,
                        logprobs: r.logprobs,
                    })
                },
            )
            .collect::<Result<_>>()?;
        self.throughput.generated += out.iter().map(|r| r.tokens.len() as u64).sum::<u64>();
        self.throughput.gen_secs += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Held-out accuracy: one response per problem, each with its own fixed random stream.
    fn evaluate(&mut self, problems: &[Problem], by_length: bool) -> Result<f64> {
        let prompts = problems
            .iter()
            .map(|p| self.prompt_ids(p))
            .collect::<Result<Vec<_>>>()?;
        let seed = self.args.seed;
        let jobs: Vec<(&Problem, &[u32], u64)> = problems
            .iter()
            .zip(&prompts)
            .enumerate()
            .map(|(i, (p, ids))| (p, ids.as_slice(), mix(&[seed, 2, i as u64])))
            .collect();
        let sample = SampleConfig {
            temperature: if self.args.eval_greedy { 0.0 } else { 1.0 },
            top_p: 1.0,
            top_k: 0,
        };
        let rollouts = self.sample(&jobs, sample)?;
        if by_length && self.args.eval_by_length {
            let mut by_len = std::collections::BTreeMap::<usize, (f32, usize)>::new();
            for (p, r) in problems.iter().zip(&rollouts) {
                let e = by_len.entry(p.terms.len()).or_default();
                e.0 += r.reward;
                e.1 += 1;
            }
            let cells: Vec<String> = by_len
                .iter()
                .map(|(n, (c, t))| format!("{n}:{:.0}%/{t}", 100.0 * c / *t as f32))
                .collect();
            println!("     accuracy by terms: {}", cells.join(" "));
        }
        let correct: f32 = rollouts.iter().map(|r| r.reward).sum();
        Ok(f64::from(correct) / problems.len() as f64)
    }

    /// Collects groups until Φ response tokens are in groups with non-zero variance (or the
    /// round limit is hit). Returns the groups, the mean reward of every sample drawn, and the
    /// fraction of groups skipped for zero variance.
    fn collect(
        &mut self,
        stream: &mut ProblemStream,
        step: usize,
        budget: u64,
    ) -> Result<(Vec<Group>, f64, f64)> {
        let (k, per_round) = (self.args.group_size, self.args.prompts_per_round);
        let mut groups = Vec::new();
        let (mut tokens, mut reward_sum, mut samples, mut skipped, mut seen) = (0, 0.0, 0, 0, 0);
        for round in 0..self.args.max_rounds {
            if tokens >= budget {
                break;
            }
            let problems: Vec<Problem> = stream.by_ref().take(per_round).collect();
            let prompts = problems
                .iter()
                .map(|p| self.prompt_ids(p))
                .collect::<Result<Vec<_>>>()?;
            let seed = self.args.seed;
            let jobs: Vec<(&Problem, &[u32], u64)> = (0..problems.len() * k)
                .map(|j| {
                    let (i, s) = (j / k, j % k);
                    let tag = mix(&[seed, 3, step as u64, round as u64, i as u64, s as u64]);
                    (&problems[i], prompts[i].as_slice(), tag)
                })
                .collect();
            let mut rollouts = self.sample(&jobs, SampleConfig::default())?.into_iter();
            for prompt in prompts {
                let group: Vec<Rollout> = rollouts.by_ref().take(k).collect();
                let rewards: Vec<f32> = group.iter().map(|r| r.reward).collect();
                reward_sum += rewards.iter().map(|&r| f64::from(r)).sum::<f64>();
                samples += k;
                seen += 1;
                let Some(advantages) = group_advantages(&rewards) else {
                    skipped += 1;
                    continue;
                };
                tokens += group.iter().map(|r| r.tokens.len() as u64).sum::<u64>();
                groups.push(Group {
                    prompt,
                    rollouts: group,
                    advantages,
                });
            }
        }
        Ok((
            groups,
            reward_sum / samples.max(1) as f64,
            skipped as f64 / seen.max(1) as f64,
        ))
    }

    /// One batch of rollouts and the optimizer steps on it.
    fn rl_step(
        &mut self,
        stream: &mut ProblemStream,
        opt: &mut AdamW,
        loss: &PolicyLoss,
        step: usize,
    ) -> Result<StepLog> {
        let m = self.args.minibatches;
        let budget = self.args.token_budget * m as u64;
        let (groups, mean_reward, skipped) = self.collect(stream, step, budget)?;
        let mut log = StepLog {
            mean_reward,
            skipped,
            ..StepLog::default()
        };
        if groups.is_empty() {
            return Ok(log);
        }
        let t0 = Instant::now();
        // Flatten: one sequence per rollout, with its advantage and π_infer per token.
        let mut seqs_owned = Vec::new();
        let (mut infer, mut adv) = (Vec::new(), Vec::new());
        for g in &groups {
            for (r, &a) in g.rollouts.iter().zip(&g.advantages) {
                seqs_owned.push(SupervisedExample {
                    tokens: [g.prompt.as_slice(), &r.tokens].concat(),
                    response_start: g.prompt.len(),
                });
                infer.push(r.logprobs.clone());
                adv.push(vec![a; r.tokens.len()]);
            }
        }
        let seqs: Vec<Sequence<'_>> = seqs_owned.iter().map(SupervisedExample::sequence).collect();
        // Mini-batches: whole sequences, dealt round-robin so they have similar token counts.
        let parts: Vec<Vec<usize>> = (0..m)
            .map(|j| (j..seqs.len()).step_by(m).collect())
            .collect();
        // π_train under θ_old (the weights that generated the samples). With one mini-batch
        // the training forward runs at θ = θ_old and is itself the recompute; with several,
        // later mini-batches run after updates, so θ_old's log-probs are taken up front.
        let old: Vec<Vec<f32>> = if m == 1 {
            Vec::new()
        } else {
            let all = self.model.forward(&seqs)?;
            (0..seqs.len())
                .map(|i| Ok(all.sequence_logprobs(i).context("sequence")?.to_vec()))
                .collect::<Result<_>>()?
        };
        let mut grads = self.model.new_gradients()?;
        let mut stats = LossStats::default();
        let mut entropy = (0.0, 0usize);
        for part in &parts {
            let batch: Vec<Sequence<'_>> = part.iter().map(|&i| seqs[i]).collect();
            let cache = self.model.forward(&batch)?;
            let pick = |v: &[Vec<f32>]| -> Vec<f32> {
                part.iter().flat_map(|&i| v[i].iter().copied()).collect()
            };
            let old_mb = if m == 1 {
                cache.logprobs().to_vec()
            } else {
                pick(&old)
            };
            let (infer_mb, adv_mb) = (pick(&infer), pick(&adv));
            let trained = vec![true; old_mb.len()];
            let out = loss.compute(&PolicyTokens {
                new_logprobs: cache.logprobs(),
                old_logprobs: &old_mb,
                infer_logprobs: &infer_mb,
                advantages: &adv_mb,
                trained: &trained,
            })?;
            stats.merge(&out.stats);
            entropy.0 += cache.entropies().iter().map(|&e| f64::from(e)).sum::<f64>();
            entropy.1 += cache.entropies().len();
            self.model.zero_gradients(&mut grads)?;
            self.model.backward(&cache, &out.grad, None, &mut grads)?;
            let g = self.model.gradients_to_params(&grads)?;
            log.grad_norm = self.apply(opt, &g)?;
        }
        self.throughput.trained += stats.tokens_trained;
        self.throughput.train_secs += t0.elapsed().as_secs_f64();
        log.tokens = stats.tokens_trained;
        log.groups = groups.len();
        log.masked = stats.masked_fraction();
        log.clipped = stats.clip_fraction();
        log.abs_log_k = stats.mean_abs_log_k();
        log.entropy = entropy.0 / entropy.1.max(1) as f64;
        Ok(log)
    }
}

/// GRPO group advantages (R − mean) / (std + 1e-6) with the population std; `None` for a
/// group whose rewards are all equal (it carries no signal and is skipped).
fn group_advantages(rewards: &[f32]) -> Option<Vec<f32>> {
    if rewards.iter().all(|&r| r == rewards[0]) {
        return None;
    }
    let n = rewards.len() as f64;
    let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / n;
    let var = rewards
        .iter()
        .map(|&r| (f64::from(r) - mean).powi(2))
        .sum::<f64>()
        / n;
    let denom = var.sqrt() + 1e-6;
    Some(
        rewards
            .iter()
            .map(|&r| ((f64::from(r) - mean) / denom) as f32)
            .collect(),
    )
}

/// What one RL step did.
#[derive(Default)]
struct StepLog {
    /// Mean reward of every sample drawn for the step (skipped groups included).
    mean_reward: f64,
    /// Fraction of groups skipped because all their rewards were equal.
    skipped: f64,
    /// Groups trained on.
    groups: usize,
    /// Response tokens trained on.
    tokens: u64,
    /// Fraction of trained tokens IcePop masked out.
    masked: f64,
    /// Fraction of trained tokens whose gradient the PPO clip removed.
    clipped: f64,
    /// Mean |log π_train(θ_old) − log π_infer| (0 up to rounding when on-policy).
    abs_log_k: f64,
    /// Mean per-token entropy of the policy on the trained responses.
    entropy: f64,
    /// Gradient norm of the last optimizer step, before clipping.
    grad_norm: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.group_size < 2 || args.minibatches == 0 {
        bail!("--group-size must be ≥ 2 and --minibatches ≥ 1");
    }
    let start = Instant::now();
    let mut r = Recipe::new(args.clone())?;
    println!(
        "model: d_model {} × {} layers ({} params), max_seq_len {}; rayon threads {}",
        args.d_model,
        args.layers,
        r.params.num_elements(),
        r.model.config().max_seq_len,
        rayon::current_num_threads()
    );
    let probs = r.task.length_probabilities();
    println!(
        "task: {}..={} terms of 0..={}, P(terms) = [{}]",
        args.min_terms,
        args.max_terms,
        args.max_term,
        probs
            .iter()
            .map(|p| format!("{p:.3}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let held_out = held_out_set(&r.task, mix(&[args.seed, 4]), args.eval_size)?;
    let eval_kind = if args.eval_greedy {
        "greedy"
    } else {
        "temperature-1 sampling"
    };

    let sft_steps = r.warm_start()?;
    let sft_secs = start.elapsed().as_secs_f64();
    let before = r.evaluate(&held_out, true)?;
    println!(
        "warm start done in {sft_steps} steps, {sft_secs:.1} s: held-out accuracy {:.1}% \
         ({eval_kind}, {} problems)",
        100.0 * before,
        held_out.len()
    );

    let loss = PolicyLoss::new(LossConfig {
        token_budget: args.token_budget,
        clip_epsilon: args.clip_epsilon,
        ..LossConfig::default()
    })?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: args.rl_lr,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })?;
    let mut stream = ProblemStream::new(r.task.clone(), Split::Train, mix(&[args.seed, 5]))?;
    let mut table = vec![(0usize, before, start.elapsed().as_secs_f64())];
    let rl_start = Instant::now();
    println!(
        "{:>4} {:>7} {:>6} {:>5} {:>6} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6}",
        "step",
        "reward",
        "skip",
        "grps",
        "tokens",
        "masked",
        "clip",
        "|logk|",
        "ent",
        "|g|",
        "secs"
    );
    for step in 1..=args.rl_steps {
        let t0 = Instant::now();
        let l = r.rl_step(&mut stream, &mut opt, &loss, step)?;
        println!(
            "{step:>4} {:>7.3} {:>6.2} {:>5} {:>6} {:>6.3} {:>6.3} {:>7.4} {:>6.3} {:>6.3} {:>6.2}",
            l.mean_reward,
            l.skipped,
            l.groups,
            l.tokens,
            l.masked,
            l.clipped,
            l.abs_log_k,
            l.entropy,
            l.grad_norm,
            t0.elapsed().as_secs_f64()
        );
        if args.eval_every > 0 && step % args.eval_every == 0 && step != args.rl_steps {
            let acc = r.evaluate(&held_out, true)?;
            println!(
                "     held-out accuracy after step {step}: {:.1}%",
                100.0 * acc
            );
            table.push((step, acc, start.elapsed().as_secs_f64()));
        }
    }
    let after = r.evaluate(&held_out, true)?;
    let total = start.elapsed().as_secs_f64();
    table.push((args.rl_steps, after, total));

    println!(
        "\nheld-out accuracy ({eval_kind}, {} problems):",
        held_out.len()
    );
    println!("{:>6} {:>9} {:>9}", "step", "accuracy", "wall s");
    for (step, acc, t) in &table {
        println!("{step:>6} {:>8.1}% {t:>9.1}", 100.0 * acc);
    }
    let tp = &r.throughput;
    println!(
        "\nwarm-start accuracy {:.1}%  →  after RL {:.1}%  (gain {:+.1} points)",
        100.0 * before,
        100.0 * after,
        100.0 * (after - before)
    );
    println!(
        "wall time {total:.1} s (warm start {sft_secs:.1} s, RL + evals {:.1} s); \
         generation {:.0} tokens/s ({} tokens), training {:.0} tokens/s ({} tokens)",
        rl_start.elapsed().as_secs_f64(),
        tp.generated as f64 / tp.gen_secs.max(1e-9),
        tp.generated,
        tp.trained as f64 / tp.train_secs.max(1e-9),
        tp.trained
    );
    Ok(())
}
