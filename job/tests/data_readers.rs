//! The dataset readers on small hand-written files: quoting, columns, line numbers, errors.

use job::data::{read, DataError, DataSpec, Format};
use std::path::PathBuf;

fn write(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn spec(path: PathBuf) -> DataSpec {
    DataSpec {
        path,
        format: None,
        text_column: "sentence".into(),
        text_pair_column: None,
        label_column: Some("y".into()),
        skip_rows_after_header: 0,
    }
}

#[test]
fn csv_with_quotes_commas_and_newlines() {
    let p = write("q.csv", "id,sentence,y\n1,\"a, b\",pos\n2,\"two\nlines\",neg\n3,plain,pos\n");
    let rows = read(&spec(p)).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].text, "a, b");
    assert_eq!(rows[1].text, "two\nlines");
    assert_eq!((rows[0].line, rows[1].line, rows[2].line), (2, 3, 5));
}

#[test]
fn tsv_is_unquoted() {
    let p = write("t.tsv", "sentence\ty\nsaid \"hi\" twice\tpos\n");
    let rows = read(&spec(p)).unwrap();
    assert_eq!(rows[0].text, "said \"hi\" twice");
}

#[test]
fn jsonl_with_numeric_labels_and_pairs() {
    let p = write(
        "j.jsonl",
        "{\"sentence\": \"a\", \"other\": \"b\", \"y\": 1}\n\n{\"sentence\": \"c\", \"other\": \"d\", \"y\": 0}\n",
    );
    let mut s = spec(p);
    s.text_pair_column = Some("other".into());
    let rows = read(&s).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].label.as_str(), rows[0].text_pair.as_deref()), ("1", Some("b")));
    assert_eq!(rows[1].line, 3);
}

#[test]
fn errors_name_file_and_line() {
    let p = write("bad.jsonl", "{\"sentence\": \"a\", \"y\": 1}\n{\"sentence\": \"a\", \"y\": 1\n");
    let e = read(&spec(p)).unwrap_err();
    assert!(matches!(e, DataError::Row { line: 2, .. }), "{e}");
    assert!(e.to_string().contains("bad.jsonl:2: invalid JSON"), "{e}");

    let p = write("short.csv", "sentence,y\nfine,pos\ntoo,many,fields\n");
    let e = read(&spec(p)).unwrap_err();
    assert!(e.to_string().contains("short.csv:3"), "{e}");

    let p = write("cols.csv", "text,label\nfine,pos\n");
    let e = read(&spec(p)).unwrap_err().to_string();
    assert!(e.contains("no column `sentence`") && e.contains("text, label"), "{e}");

    let p = write("empty.csv", "sentence,y\n");
    assert!(read(&spec(p)).unwrap_err().to_string().contains("holds no examples"));

    let p = write("data.parquet", "x");
    assert!(read(&spec(p)).unwrap_err().to_string().contains("data.format"));
    assert_eq!(Format::from_path(std::path::Path::new("x.tab")), Some(Format::Tsv));
}
