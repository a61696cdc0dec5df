//! Object-store keys of a run, in one place.
//!
//! Every object of a run lives under the run id: `{run}/…`. Numbers are zero-padded so that a
//! lexicographic listing is also numeric order (the newest version or step sorts last).
//!
//! | what                     | key                                                      |
//! |--------------------------|----------------------------------------------------------|
//! | segment                  | `{run}/segments/{prompt}/{sample}/{seq:08}-e{epoch}`     |
//! | step manifest            | `{run}/steps/{step:010}/manifest.json`                   |
//! | per-rank gradient        | `{run}/steps/{step:010}/grads/rank-{r:04}`               |
//! | entries left out of step | `{run}/steps/{step:010}/dropped/rank-{r:04}`             |
//! | exchange rendezvous      | `{run}/steps/{step:010}/exchange/rank-{r:04}`            |
//! | exchange communicator id | `{run}/steps/{step:010}/exchange/id`                     |
//! | weights manifest         | `{run}/weights/v{version:010}/manifest.json`             |
//! | weights chunk            | `{run}/chunks/{hash}`                                    |
//! | checkpoint object        | `{run}/checkpoints/step-{step:010}/{name}`               |

use crate::types::{PolicyVersion, PromptId, StepId};

/// `{run}/segments/{prompt}/{sample}/{seq:08}-e{epoch}`: one segment of a trajectory. The
/// lease epoch in the key means a fenced-out writer never overwrites a live segment.
pub fn segment(run: &str, prompt: &PromptId, sample: u32, seq: u32, epoch: u64) -> String {
    format!("{run}/segments/{prompt}/{sample}/{seq:08}-e{epoch}")
}

/// `{run}/segments/`: the prefix of every segment of the run.
pub fn segments_prefix(run: &str) -> String {
    format!("{run}/segments/")
}

/// `{run}/steps/{step:010}/manifest.json`: the batch manifest of step `step`.
pub fn step_manifest(run: &str, step: StepId) -> String {
    format!("{run}/steps/{step:010}/manifest.json")
}

/// `{run}/steps/{step:010}/grads/`: the prefix of step `step`'s per-rank gradients.
pub fn step_grads_prefix(run: &str, step: StepId) -> String {
    format!("{run}/steps/{step:010}/grads/")
}

/// `{run}/steps/{step:010}/grads/rank-{r:04}`: rank `rank`'s gradient sum for step `step`.
pub fn step_grads(run: &str, step: StepId, rank: u32) -> String {
    format!("{run}/steps/{step:010}/grads/rank-{rank:04}")
}

/// `{run}/steps/{step:010}/exchange/`: the prefix of step `step`'s exchange rendezvous.
pub fn step_exchange_prefix(run: &str, step: StepId) -> String {
    format!("{run}/steps/{step:010}/exchange/")
}

/// `{run}/steps/{step:010}/exchange/rank-{r:04}`: the arrival of rank `rank`'s holder at step
/// `step`'s collective gradient exchange (JSON).
pub fn step_exchange(run: &str, step: StepId, rank: u32) -> String {
    format!("{run}/steps/{step:010}/exchange/rank-{rank:04}")
}

/// `{run}/steps/{step:010}/exchange/id`: the id of the communicator step `step`'s exchange
/// forms (JSON).
pub fn step_exchange_id(run: &str, step: StepId) -> String {
    format!("{run}/steps/{step:010}/exchange/id")
}

/// `{run}/steps/{step:010}/dropped/rank-{r:04}`: the entries rank `rank` left out of step
/// `step` because their data is unusable, and why (JSON).
pub fn step_dropped(run: &str, step: StepId, rank: u32) -> String {
    format!("{run}/steps/{step:010}/dropped/rank-{rank:04}")
}

/// `{run}/weights/`: the prefix under which every version's weights manifest lives.
pub fn weights_prefix(run: &str) -> String {
    format!("{run}/weights/")
}

/// `{run}/weights/v{version:010}/manifest.json`: the weights manifest of `version`.
pub fn weights_manifest(run: &str, version: PolicyVersion) -> String {
    format!("{run}/weights/v{version:010}/manifest.json")
}

/// Parses the version out of a key built by [`weights_manifest`] (`None` for other keys).
pub fn parse_weights_manifest(run: &str, key: &str) -> Option<PolicyVersion> {
    let rest = key.strip_prefix(run)?.strip_prefix("/weights/v")?;
    let digits = rest.strip_suffix("/manifest.json")?;
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `{run}/chunks/`: the prefix of the content-addressed weights chunks.
pub fn chunks_prefix(run: &str) -> String {
    format!("{run}/chunks/")
}

/// `{run}/chunks/{hash}`: a content-addressed chunk (`hash` is the lowercase hex digest).
pub fn chunk(run: &str, hash: &str) -> String {
    format!("{run}/chunks/{hash}")
}

/// `{run}/checkpoints/`: the prefix of every checkpoint.
pub fn checkpoints_prefix(run: &str) -> String {
    format!("{run}/checkpoints/")
}

/// `{run}/checkpoints/step-{step:010}/`: the prefix of the checkpoint taken after `step`.
pub fn checkpoint_prefix(run: &str, step: StepId) -> String {
    format!("{run}/checkpoints/step-{step:010}/")
}

/// `{run}/checkpoints/step-{step:010}/{name}`: one object of a checkpoint.
pub fn checkpoint_object(run: &str, step: StepId, name: &str) -> String {
    format!("{run}/checkpoints/step-{step:010}/{name}")
}

/// Parses the step out of any key under [`checkpoint_prefix`] (`None` for other keys).
pub fn parse_checkpoint_step(run: &str, key: &str) -> Option<StepId> {
    let rest = key.strip_prefix(run)?.strip_prefix("/checkpoints/step-")?;
    let digits = rest.get(..10)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || rest.as_bytes().get(10) != Some(&b'/') {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_protocol_shape() {
        let p = PromptId::from("p7");
        assert_eq!(segment("r", &p, 2, 3, 4), "r/segments/p7/2/00000003-e4");
        assert_eq!(step_manifest("r", 5), "r/steps/0000000005/manifest.json");
        assert_eq!(step_grads("r", 5, 1), "r/steps/0000000005/grads/rank-0001");
        assert_eq!(
            step_exchange("r", 5, 1),
            "r/steps/0000000005/exchange/rank-0001"
        );
        assert!(step_exchange("r", 5, 1).starts_with(&step_exchange_prefix("r", 5)));
        assert!(step_exchange_id("r", 5).starts_with(&step_exchange_prefix("r", 5)));
        assert_eq!(
            weights_manifest("r", 12),
            "r/weights/v0000000012/manifest.json"
        );
        assert_eq!(chunk("r", "ab"), "r/chunks/ab");
        assert_eq!(
            checkpoint_object("r", 3, "optim"),
            "r/checkpoints/step-0000000003/optim"
        );
    }

    #[test]
    fn parsers_invert_the_builders_and_reject_others() {
        assert_eq!(
            parse_weights_manifest("r", &weights_manifest("r", 42)),
            Some(42)
        );
        assert_eq!(
            parse_weights_manifest("r", "r/weights/v12/manifest.json"),
            None
        );
        assert_eq!(parse_weights_manifest("r", &weights_manifest("s", 1)), None);
        assert_eq!(
            parse_checkpoint_step("r", &checkpoint_object("r", 9, "x")),
            Some(9)
        );
        assert_eq!(parse_checkpoint_step("r", "r/checkpoints/step-12/x"), None);
    }
}
