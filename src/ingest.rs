//! `flywheel ingest`: JSON-lines prompts, or a dataset's rows (JSON lines or Parquet) → the
//! run's prompt topic.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, bail};
use flywheel_model::{ChatMessage, HfTokenizer};
use flywheel_storage::queue::{KafkaConfig, PromptProducer, check_prompt, ensure_topics};
use flywheel_storage::{Prompt, PromptId, PromptInput, VerifierSpec};

/// One non-empty input line (or dataset row), checked.
enum Line {
    Valid(Prompt),
    /// Not a valid prompt: where it is (`line 3`, `row 3`), its text and why.
    Invalid {
        at: String,
        text: String,
        why: String,
    },
}

/// A dataset file of `flywheel ingest`.
#[derive(Clone, Debug)]
pub enum DatasetFile {
    /// One JSON object per line (`--jsonl`).
    Jsonl(std::path::PathBuf),
    /// A Parquet file whose rows are the objects (`--parquet`).
    Parquet(std::path::PathBuf),
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
    send_lines(kafka, read_lines(kafka, file)?, raw, partitions).await
}

/// How `flywheel ingest --jsonl` reads a dataset file (GSM8K / MATH style: one JSON object per
/// line).
#[derive(Clone, Debug)]
pub struct DatasetSpec {
    /// Field holding the question.
    pub prompt_field: String,
    /// Field holding the reference answer (a string or a number).
    pub answer_field: String,
    /// Field holding a unique id; without one, ids are `<file stem>-<line number>`.
    pub id_field: Option<String>,
    /// How responses are scored.
    pub verifier: DatasetVerifier,
    /// K: samples per prompt.
    pub group_size: u32,
}

/// The verifiers a dataset line can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetVerifier {
    /// The final number or `\boxed{}` of the response against the answer.
    Math,
    /// The trimmed response against the answer.
    Exact,
}

/// The reference answer of a dataset line: GSM8K's text after its last `####`, MATH's last
/// `\boxed{…}`, else the whole answer; trimmed.
fn final_answer(answer: &str) -> &str {
    if let Some(at) = answer.rfind("####") {
        return answer[at + 4..].trim();
    }
    if let Some(at) = answer.rfind("\\boxed{") {
        let rest = &answer[at + "\\boxed{".len()..];
        let mut depth = 1;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return rest[..i].trim();
                    }
                }
                _ => {}
            }
        }
    }
    answer.trim()
}

/// One dataset line as a prompt; `chat` renders the question as a user message through the
/// checkpoint's chat template (the prompt then carries its token ids).
fn dataset_prompt(
    value: &serde_json::Value,
    spec: &DatasetSpec,
    default_id: String,
    chat: Option<&HfTokenizer>,
) -> Result<Prompt, String> {
    let field = |name: &str| -> Result<String, String> {
        match value.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(format!("field `{name}` is {other}, not a string")),
            None => Err(format!("no field `{name}`")),
        }
    };
    let question = field(&spec.prompt_field)?;
    let answer = final_answer(&field(&spec.answer_field)?).to_owned();
    if answer.is_empty() {
        return Err(format!("field `{}` holds no answer", spec.answer_field));
    }
    let id = match &spec.id_field {
        Some(f) => field(f)?,
        None => default_id,
    };
    let input = match chat {
        Some(tok) => PromptInput::Tokens(
            tok.encode_chat(&[ChatMessage {
                role: "user".into(),
                content: question,
            }])
            .map_err(|e| e.to_string())?,
        ),
        None => PromptInput::Text(question),
    };
    Ok(Prompt {
        id: PromptId(id),
        input,
        verifier: match spec.verifier {
            DatasetVerifier::Math => VerifierSpec::Math { answer },
            DatasetVerifier::Exact => VerifierSpec::ExactMatch { answer },
        },
        group_size: spec.group_size,
        metadata: Default::default(),
    })
}

/// Sends every line (row) of the dataset `file` as a prompt (see [`DatasetSpec`]); nothing is
/// sent if any is bad, and the error lists the bad ones by number.
pub async fn run_dataset(
    kafka: &KafkaConfig,
    file: &DatasetFile,
    spec: &DatasetSpec,
    chat: Option<&HfTokenizer>,
    partitions: i32,
) -> anyhow::Result<()> {
    send_lines(
        kafka,
        read_dataset(kafka, file, spec, chat)?,
        false,
        partitions,
    )
    .await
}

fn read_dataset(
    kafka: &KafkaConfig,
    file: &DatasetFile,
    spec: &DatasetSpec,
    chat: Option<&HfTokenizer>,
) -> anyhow::Result<Vec<Line>> {
    let (DatasetFile::Jsonl(path) | DatasetFile::Parquet(path)) = file;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("line")
        .to_owned();
    let prompt = |number: usize, value: &serde_json::Value| {
        let prompt = dataset_prompt(value, spec, format!("{stem}-{number}"), chat)?;
        check_prompt(&prompt, kafka).map_err(|e| e.to_string())?;
        Ok(prompt)
    };
    match file {
        DatasetFile::Jsonl(path) => read_each(path, |line_no, text| {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            prompt(line_no, &value)
        }),
        DatasetFile::Parquet(path) => read_parquet_rows(path, prompt),
    }
}

/// Every row of the Parquet file `file`, as a JSON object of its columns, through `parse`.
/// A file that cannot be read is an error; a row `parse` refuses is an invalid line.
fn read_parquet_rows(
    file: &Path,
    parse: impl Fn(usize, &serde_json::Value) -> Result<Prompt, String>,
) -> anyhow::Result<Vec<Line>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(file)
        .with_context(|| format!("cannot open dataset file {}", file.display()))?;
    let reader = SerializedFileReader::new(f)
        .with_context(|| format!("{} is not a readable Parquet file", file.display()))?;
    let rows = reader
        .get_row_iter(None)
        .with_context(|| format!("cannot read the rows of {}", file.display()))?;
    let mut lines = Vec::new();
    for (index, row) in rows.enumerate() {
        let row_no = index + 1;
        let value = row
            .with_context(|| format!("cannot read row {row_no} of {}", file.display()))?
            .to_json_value();
        lines.push(match parse(row_no, &value) {
            Ok(prompt) => Line::Valid(prompt),
            Err(why) => Line::Invalid {
                at: format!("row {row_no}"),
                text: value.to_string(),
                why,
            },
        });
    }
    Ok(lines)
}

/// Sends checked lines: refuses (listing the bad lines) unless `raw`, which sends bad lines
/// as-is for the workers to dead-letter.
async fn send_lines(
    kafka: &KafkaConfig,
    lines: Vec<Line>,
    raw: bool,
    partitions: i32,
) -> anyhow::Result<()> {
    let invalid: Vec<String> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Invalid { at, why, .. } => Some(format!("{at}: {why}")),
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

/// Send `prompts` (e.g. generated by `--demo-task`), checked first like a file's lines:
/// nothing is sent if one is invalid. Missing topics are created with `partitions` partitions.
pub async fn send_generated(
    kafka: &KafkaConfig,
    prompts: &[Prompt],
    partitions: i32,
) -> anyhow::Result<()> {
    for p in prompts {
        check_prompt(p, kafka).with_context(|| format!("generated prompt {}", p.id.0))?;
    }
    ensure_topics(kafka, partitions, 1)
        .await
        .context("cannot create the prompt topics")?;
    let producer = PromptProducer::new(kafka)?;
    for p in prompts {
        producer.send(p).await?;
    }
    eprintln!("sent {} prompts to `{}`", prompts.len(), kafka.topic);
    Ok(())
}

fn read_lines(kafka: &KafkaConfig, file: &Path) -> anyhow::Result<Vec<Line>> {
    read_each(file, |_, text| {
        let p = serde_json::from_str::<Prompt>(text).map_err(|e| e.to_string())?;
        check_prompt(&p, kafka).map_err(|e| e.to_string())?;
        Ok(p)
    })
}

/// Every non-empty line of `file` (`-`: standard input) through `parse`.
fn read_each(
    file: &Path,
    parse: impl Fn(usize, &str) -> Result<Prompt, String>,
) -> anyhow::Result<Vec<Line>> {
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
        lines.push(match parse(line_no, &text) {
            Ok(prompt) => Line::Valid(prompt),
            Err(why) => Line::Invalid {
                at: format!("line {line_no}"),
                text,
                why,
            },
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
        assert!(matches!(&lines[1], Line::Invalid { at, .. } if at == "line 3"));
        assert!(matches!(&lines[2], Line::Invalid { at, .. } if at == "line 4"));

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

    fn spec() -> DatasetSpec {
        DatasetSpec {
            prompt_field: "question".into(),
            answer_field: "answer".into(),
            id_field: None,
            verifier: DatasetVerifier::Math,
            group_size: 4,
        }
    }

    #[test]
    fn dataset_lines_become_prompts_and_bad_lines_are_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gsm8k.jsonl");
        let lines = [
            r#"{"question": "Natalia sold 48 clips in April and half as many in May. How many?", "answer": "48/2 = 24 in May.\n#### 72"}"#,
            r#"{"question": "What is $1+1$?", "answer": "It is $\\boxed{\\frac{4}{2}}$."}"#,
            r#"{"question": "no answer here"}"#,
            "not json",
            r#"{"question": ["a", "list"], "answer": 3}"#,
            r#"{"question": "Numbers are answers too.", "answer": 12}"#,
        ];
        std::fs::write(
            &path,
            lines.join(
                "
",
            ),
        )
        .unwrap();
        let file = DatasetFile::Jsonl(path);
        let read = read_dataset(&KafkaConfig::default(), &file, &spec(), None).unwrap();
        let valid: Vec<&Prompt> = read
            .iter()
            .filter_map(|l| match l {
                Line::Valid(p) => Some(p),
                Line::Invalid { .. } => None,
            })
            .collect();
        assert_eq!(valid.len(), 3);
        assert_eq!(valid[0].id.0, "gsm8k-1");
        assert_eq!(
            valid[0].verifier,
            VerifierSpec::Math {
                answer: "72".into()
            }
        );
        assert_eq!(valid[0].group_size, 4);
        assert!(matches!(&valid[0].input, PromptInput::Text(t) if t.starts_with("Natalia")));
        assert_eq!(
            valid[1].verifier,
            VerifierSpec::Math {
                answer: "\\frac{4}{2}".into()
            }
        );
        assert_eq!(
            valid[2].verifier,
            VerifierSpec::Math {
                answer: "12".into()
            }
        );
        let bad = invalid(&read);
        assert_eq!(
            bad.iter().map(|b| b.0).collect::<Vec<_>>(),
            ["line 3", "line 4", "line 5"]
        );
        assert!(bad[0].1.contains("no field `answer`"), "{bad:?}");
        assert!(
            bad[2]
                .1
                .contains("`question` is [\"a\",\"list\"], not a string"),
            "{bad:?}"
        );

        // Nothing is sent when a line is bad: the check fails before any connection.
        let kafka = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let err = runtime
            .block_on(run_dataset(&kafka, &file, &spec(), None, 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 of 6 lines") && err.contains("line 5"),
            "{err}"
        );
    }

    /// Where and why each invalid line is.
    fn invalid(lines: &[Line]) -> Vec<(&str, &str)> {
        lines
            .iter()
            .filter_map(|l| match l {
                Line::Invalid { at, why, .. } => Some((at.as_str(), why.as_str())),
                Line::Valid(_) => None,
            })
            .collect()
    }

    /// A Parquet dataset (scripts/dataset_fixtures.py writes the fixtures: the same rows in
    /// pyarrow's default snappy and in zstd) reads like JSON lines, bad rows numbered.
    #[test]
    fn parquet_rows_become_prompts_and_bad_rows_are_numbered() {
        for name in ["gsm8k-snappy.parquet", "gsm8k-zstd.parquet"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/datasets")
                .join(name);
            let file = DatasetFile::Parquet(path);
            let read = read_dataset(&KafkaConfig::default(), &file, &spec(), None).unwrap();
            assert_eq!(read.len(), 4, "{name}");
            let Line::Valid(first) = &read[0] else {
                panic!("{name}: row 1 is invalid")
            };
            assert_eq!(
                first.id.0,
                name.trim_end_matches(".parquet").to_owned() + "-1"
            );
            assert_eq!(
                first.verifier,
                VerifierSpec::Math {
                    answer: "72".into()
                }
            );
            assert!(matches!(&first.input, PromptInput::Text(t) if t.starts_with("Natalia")));
            let bad = invalid(&read);
            assert_eq!(
                bad.iter().map(|b| b.0).collect::<Vec<_>>(),
                ["row 3"],
                "{name}"
            );
            assert!(bad[0].1.contains("`answer` is null"), "{name}: {bad:?}");
        }
        let not_parquet = DatasetFile::Parquet(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"),
        );
        let err = read_dataset(&KafkaConfig::default(), &not_parquet, &spec(), None)
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("is not a readable Parquet file"),
            "{err:#}"
        );
    }

    /// With a chat template, the question goes in as a user message, as token ids.
    #[test]
    fn chat_template_prompts_carry_the_rendered_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, r#"{"id": "q-1", "q": "What is 7 * 6?", "a": "42"}"#).unwrap();
        let tok_dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("model/tests/fixtures/hf/qwen2");
        let tok = HfTokenizer::open(&tok_dir).unwrap();
        let spec = DatasetSpec {
            prompt_field: "q".into(),
            answer_field: "a".into(),
            id_field: Some("id".into()),
            verifier: DatasetVerifier::Exact,
            group_size: 2,
        };
        let read = read_dataset(
            &KafkaConfig::default(),
            &DatasetFile::Jsonl(path),
            &spec,
            Some(&tok),
        )
        .unwrap();
        let Line::Valid(p) = &read[0] else {
            panic!("a valid line")
        };
        assert_eq!(p.id.0, "q-1");
        let message = ChatMessage {
            role: "user".into(),
            content: "What is 7 * 6?".into(),
        };
        assert_eq!(
            p.input,
            PromptInput::Tokens(tok.encode_chat(&[message]).unwrap())
        );
        assert_eq!(
            p.verifier,
            VerifierSpec::ExactMatch {
                answer: "42".into()
            }
        );
    }
}
