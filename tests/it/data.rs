//! The real datasets as scripts/fetch-assets.sh lays them out.

use crate::support::repo_root;
use job::data::{read, DataSpec, LabelSet};
use std::collections::{BTreeSet, HashSet};

fn spec(rel: &str, text: &str, label: &str, skip: usize) -> DataSpec {
    let path = repo_root().join(rel);
    assert!(path.exists(), "{} is missing: run scripts/fetch-assets.sh", path.display());
    DataSpec {
        path,
        format: None,
        text_column: text.into(),
        text_pair_column: None,
        label_column: Some(label.into()),
        skip_rows_after_header: skip,
    }
}

#[test]
fn rotten_tomatoes_split_is_by_movie_and_complete() {
    let mut movies = Vec::new();
    let mut total = 0;
    for side in ["train", "dev", "test"] {
        let s = spec(&format!("data/rotten_tomatoes/{side}.csv"), "text", "label", 0);
        let rows = read(&s).unwrap();
        let labels = LabelSet::infer(&rows).unwrap();
        assert_eq!(labels.names, vec!["negative", "positive"]);
        total += rows.len();
        let m = read(&DataSpec { label_column: Some("movie".into()), ..s }).unwrap();
        movies.push(m.into_iter().map(|r| r.label).collect::<HashSet<_>>());
    }
    // 7,403 fresh + 5,405 rotten snippets; plot summaries are not reviews and are dropped.
    assert_eq!(total, 12_808);
    assert!(
        movies[0].is_disjoint(&movies[1]) && movies[0].is_disjoint(&movies[2]) && movies[1].is_disjoint(&movies[2])
    );
}

#[test]
fn reuters_r8_reads_from_the_orange_tab_file() {
    let rows = read(&spec("data/reuters-r8/train.tab", "Text", "Category", 2)).unwrap();
    assert_eq!(rows.len(), 5_485);
    let labels: BTreeSet<_> = rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels.len(), 8, "{labels:?}");
    assert_eq!(rows[0].line, 4, "the first example sits below the three header lines");
    let test = read(&spec("data/reuters-r8/test.tab", "Text", "Category", 2)).unwrap();
    assert_eq!(test.len(), 2_189);
}
