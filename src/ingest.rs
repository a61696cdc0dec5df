//! `flywheel ingest`: JSON-lines prompts → the run's prompt topic.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, bail};
use flywheel_storage::Prompt;
use flywheel_storage::queue::{KafkaConfig, PromptProducer, check_prompt, ensure_topics};

/// One non-empty input line, checked.
enum Line {
    Valid(Prompt),
    /// Not a valid prompt: the text and why.
    Invalid {
        line_no: usize,
        text: String,
        why: String,
    },
}

/// Send every line of `file` (`-`: standard input) as a prompt. The whole file is checked
/// first: if any line is not a valid prompt, nothing is sent and the error lists the bad
/// lines — unless `raw` is set, in which case bad lines are sent as-is and the workers
/// dead-letter them with the reason. Missing topics are created with `partitions` partitions.
pub async fn run(
    kafka: &KafkaConfig,
    file: &Path,
    raw: bool,
    partitions: i32,
) -> anyhow::Result<()> {
    let lines = read_lines(kafka, file)?;
    let invalid: Vec<String> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Invalid { line_no, why, .. } => Some(format!("line {line_no}: {why}")),
            Line::Valid(_) => None,
        })
        .collect();
    if !invalid.is_empty() && !raw {
        let shown: Vec<&str> = invalid.iter().take(10).map(String::as_str).collect();
        bail!(
            "{} of {} lines are not valid prompts; nothing was sent. Fix them, or pass --raw to \
             send them anyway (workers dead-letter them):\n  {}",
            invalid.len(),
            lines.len(),
            shown.join("\n  ")
        );
    }
    ensure_topics(kafka, partitions, 1)
        .await
        .context("cannot create the prompt topics")?;
    let producer = PromptProducer::new(kafka)?;
    for line in &lines {
        match line {
            Line::Valid(prompt) => producer.send(prompt).await?,
            Line::Invalid { text, .. } => producer.send_raw(None, text.as_bytes()).await?,
        };
    }
    eprintln!(
        "sent {} prompts to `{}` ({} invalid lines sent raw)",
        lines.len() - invalid.len(),
        kafka.topic,
        invalid.len()
    );
    Ok(())
}

fn read_lines(kafka: &KafkaConfig, file: &Path) -> anyhow::Result<Vec<Line>> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("cannot open prompts file {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let mut lines = Vec::new();
    for (index, text) in reader.lines().enumerate() {
        let line_no = index + 1;
        let text =
            text.with_context(|| format!("cannot read line {line_no} of {}", file.display()))?;
        if text.trim().is_empty() {
            continue;
        }
        let checked = serde_json::from_str::<Prompt>(&text)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                check_prompt(&p, kafka)
                    .map(|()| p)
                    .map_err(|e| e.to_string())
            });
        lines.push(match checked {
            Ok(prompt) => Line::Valid(prompt),
            Err(why) => Line::Invalid { line_no, text, why },
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_are_named_and_nothing_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompts.jsonl");
        let good = r#"{"id":"p1","input":{"text":"1+2="},"verifier":{"kind":"exact_match","answer":"3"},"group_size":2}"#;
        let zero_k = good
            .replace("\"p1\"", "\"p2\"")
            .replace("\"group_size\":2", "\"group_size\":0");
        std::fs::write(&path, format!("{good}\n\nnot json\n{zero_k}\n")).unwrap();
        let lines = read_lines(&KafkaConfig::default(), &path).unwrap();
        assert_eq!(lines.len(), 3);
        assert!(matches!(&lines[0], Line::Valid(p) if p.id.0 == "p1"));
        assert!(matches!(&lines[1], Line::Invalid { line_no: 3, .. }));
        assert!(matches!(&lines[2], Line::Invalid { line_no: 4, .. }));

        // The brokers are never contacted: the check fails before any connection.
        let kafka = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let err = runtime
            .block_on(run(&kafka, &path, false, 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 of 3 lines") && err.contains("line 3") && err.contains("line 4"),
            "{err}"
        );
    }
}
