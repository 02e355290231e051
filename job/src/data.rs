//! Labelled text datasets: CSV, TSV and JSON Lines (`{"text": ..., "label": ...}`, the shape
//! `datasets` writes), with configurable column names. Every malformed row is an error that
//! names the file and the line.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

impl Format {
    /// From the file name: `.csv`; `.tsv`/`.tab`/`.txt`; `.jsonl`/`.json`.
    pub fn from_path(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" | "txt" => Some(Format::Tsv),
            "jsonl" | "json" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// Where a dataset is and how to read it.
#[derive(Clone, Debug)]
pub struct DataSpec {
    pub path: PathBuf,
    pub format: Option<Format>,
    pub text_column: String,
    pub text_pair_column: Option<String>,
    /// `None`: rows without labels (texts to predict); their `label` is empty.
    pub label_column: Option<String>,
    /// Rows to skip after the header (Orange's `.tab` files have two: types and flags).
    pub skip_rows_after_header: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: String,
    /// 1-based line of the row in its file.
    pub line: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{file}: {msg}")]
    File { file: PathBuf, msg: String },
    #[error("{file}:{line}: {msg}")]
    Row { file: PathBuf, line: usize, msg: String },
}

pub fn read(spec: &DataSpec) -> Result<Vec<Example>, DataError> {
    let format = spec.format.or_else(|| Format::from_path(&spec.path)).ok_or_else(|| DataError::File {
        file: spec.path.clone(),
        msg: "cannot tell the format from the extension; set data.format to csv, tsv or jsonl".into(),
    })?;
    let text = std::fs::read_to_string(&spec.path).map_err(|e| DataError::Io(spec.path.clone(), e))?;
    let examples = match format {
        Format::Jsonl => read_jsonl(spec, &text)?,
        Format::Csv => read_delimited(spec, &text, b',', true)?,
        Format::Tsv => read_delimited(spec, &text, b'\t', false)?,
    };
    if examples.is_empty() {
        return Err(DataError::File { file: spec.path.clone(), msg: "holds no examples".into() });
    }
    Ok(examples)
}

fn read_delimited(spec: &DataSpec, text: &str, delim: u8, quoting: bool) -> Result<Vec<Example>, DataError> {
    let file = &spec.path;
    let mut rdr =
        csv::ReaderBuilder::new().delimiter(delim).quoting(quoting).has_headers(true).from_reader(text.as_bytes());
    let headers =
        rdr.headers().map_err(|e| DataError::File { file: file.clone(), msg: format!("header: {e}") })?.clone();
    let col = |name: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| DataError::File {
            file: file.clone(),
            msg: format!(
                "no column `{name}` in the header (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        })
    };
    let ti = col(&spec.text_column)?;
    let li = spec.label_column.as_deref().map(col).transpose()?;
    let pi = spec.text_pair_column.as_deref().map(col).transpose()?;
    let mut out = Vec::new();
    for (n, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            DataError::Row { file: file.clone(), line, msg: e.to_string() }
        })?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(n + 2);
        if n < spec.skip_rows_after_header {
            continue;
        }
        if rec.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let field = |i: usize, what: &str| -> Result<String, DataError> {
            match rec.get(i) {
                Some(v) if !v.trim().is_empty() => Ok(v.to_string()),
                _ => Err(DataError::Row { file: file.clone(), line, msg: format!("row has no {what}") }),
            }
        };
        out.push(Example {
            text: field(ti, &format!("text (column `{}`)", spec.text_column))?,
            text_pair: pi.map(|i| field(i, "text pair")).transpose()?,
            label: match li {
                Some(i) => field(i, &format!("label (column `{}`)", spec.label_column.as_deref().unwrap_or("")))?
                    .trim()
                    .to_string(),
                None => String::new(),
            },
            line,
        });
    }
    Ok(out)
}

fn read_jsonl(spec: &DataSpec, text: &str) -> Result<Vec<Example>, DataError> {
    let file = &spec.path;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let err = |msg: String| DataError::Row { file: file.clone(), line, msg };
        let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let text_of = |key: &str| -> Result<String, DataError> {
            match obj.get(key) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => {
                    Err(err(format!("row has no `{key}`")))
                }
                Some(other) => Err(err(format!("`{key}` must be a string, got {other}"))),
            }
        };
        let label = match spec.label_column.as_deref().map(|c| (c, obj.get(c))) {
            None => String::new(),
            Some((_, Some(serde_json::Value::String(s)))) if !s.trim().is_empty() => s.trim().to_string(),
            Some((_, Some(serde_json::Value::Number(n)))) => n.to_string(),
            Some((_, Some(serde_json::Value::Bool(b)))) => b.to_string(),
            Some((c, _)) => return Err(err(format!("row has no label (`{c}`)"))),
        };
        out.push(Example {
            text: text_of(&spec.text_column)?,
            text_pair: spec.text_pair_column.as_deref().map(text_of).transpose()?,
            label,
            line,
        });
    }
    Ok(out)
}

/// The declared (or inferred) set of class names; a class id is the index of its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSet {
    pub names: Vec<String>,
    index: HashMap<String, usize>,
}

impl LabelSet {
    pub fn new(names: Vec<String>) -> Result<Self, String> {
        let mut index = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            if index.insert(n.clone(), i).is_some() {
                return Err(format!("label `{n}` is declared twice"));
            }
        }
        if names.len() < 2 {
            return Err(format!("a classifier needs at least 2 labels, got {}", names.len()));
        }
        Ok(LabelSet { names, index })
    }

    /// The sorted distinct labels of `examples`.
    pub fn infer(examples: &[Example]) -> Result<Self, String> {
        let mut names: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
        names.sort();
        names.dedup();
        Self::new(names)
    }

    pub fn id(&self, ex: &Example, file: &Path) -> Result<i64, DataError> {
        self.index.get(&ex.label).map(|&i| i as i64).ok_or_else(|| DataError::Row {
            file: file.to_owned(),
            line: ex.line,
            msg: format!("label `{}` is not one of the declared labels [{}]", ex.label, self.names.join(", ")),
        })
    }
}

/// One labelled example, its label resolved to a class id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: i64,
}

/// A job's datasets, read once, labels resolved against the job's label set.
#[derive(Clone, Debug)]
pub struct Datasets {
    pub labels: LabelSet,
    pub train: Vec<Record>,
    pub dev: Option<Vec<Record>>,
    pub test: Option<Vec<Record>>,
}

/// How the job reads the file at `path`.
pub fn spec_for(job: &crate::config::JobConfig, path: &Path) -> DataSpec {
    DataSpec {
        path: path.to_owned(),
        format: job.data.format,
        text_column: job.data.text_column.clone(),
        text_pair_column: job.data.text_pair_column.clone(),
        label_column: Some(job.data.label_column.clone()),
        skip_rows_after_header: job.data.skip_rows_after_header,
    }
}

/// Reads the job's train, dev and test files. The label set is `data.labels`, or else the sorted
/// labels of the training file; a row whose label is outside it is an error naming file:line.
pub fn load(job: &crate::config::JobConfig) -> Result<Datasets, DataError> {
    let train_rows = read(&spec_for(job, &job.data.train))?;
    let labels = match &job.data.labels {
        Some(names) => LabelSet::new(names.clone())
            .map_err(|msg| DataError::File { file: "data.labels (job config)".into(), msg })?,
        None => LabelSet::infer(&train_rows).map_err(|msg| DataError::File {
            file: job.data.train.clone(),
            msg: format!("labels inferred from the data: {msg}; declare them in data.labels"),
        })?,
    };
    let resolve = |rows: Vec<Example>, path: &Path| -> Result<Vec<Record>, DataError> {
        rows.into_iter()
            .map(|r| Ok(Record { label: labels.id(&r, path)?, text: r.text, text_pair: r.text_pair }))
            .collect()
    };
    let train = resolve(train_rows, &job.data.train)?;
    let split = |p: &Option<PathBuf>| -> Result<Option<Vec<Record>>, DataError> {
        p.as_deref().map(|p| read(&spec_for(job, p)).and_then(|rows| resolve(rows, p))).transpose()
    };
    let dev = split(&job.data.dev)?;
    let test = split(&job.data.test)?;
    Ok(Datasets { labels: labels.clone(), train, dev, test })
}
