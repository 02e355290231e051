//! `worker preprocess` as a user runs it: the real binary on generated corpora (plain text, blank-
//! line separated, JSON Lines, gzip, a directory), tokenized with the tiny fixture's WordPiece
//! tokenizer; the shards read back through `job::tokens` and compared with the `tokenizers`
//! library's own encoding, the bytes the same for any thread count; bad input named by file and
//! line, with nothing already written lost.

use job::tokens::Corpus;
use job::tokens::TokenShard;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tokenizer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-cls/tokenizer.json")
}

fn temp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("tandem-preprocess-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn preprocess(inputs: &[&Path], out: &Path, extra: &[&str], threads: usize) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.arg("preprocess").args(inputs).arg("--tokenizer").arg(tokenizer()).arg("--out").arg(out);
    cmd.args(extra).env("RAYON_NUM_THREADS", threads.to_string()).output().unwrap()
}

fn ok(out: Output) -> Corpus {
    assert!(out.status.success(), "preprocess failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails_with(out: Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "preprocess succeeded");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// Every document of the corpus in `dir`, as (ids, word starts).
fn read_back(dir: &Path, corpus: &Corpus) -> Vec<(Vec<u32>, Vec<bool>)> {
    let mut docs = Vec::new();
    for s in &corpus.shards {
        let shard = TokenShard::open(&dir.join(&s.file)).unwrap();
        assert_eq!((shard.header().documents, shard.header().tokens), (s.documents, s.tokens));
        for d in 0..s.documents {
            let r = shard.document(d);
            docs.push((r.clone().map(|t| shard.id(t)).collect(), r.map(|t| shard.word_start(t)).collect()));
        }
    }
    docs
}

/// What the `tokenizers` library gives for one document: no special tokens, no truncation.
fn encode(text: &str) -> (Vec<u32>, Vec<bool>) {
    let mut tok = tokenizers::Tokenizer::from_file(tokenizer()).unwrap();
    tok.with_truncation(None).unwrap();
    tok.with_padding(None);
    let e = tok.encode(text, false).unwrap();
    let w = e.get_word_ids();
    let starts = (0..w.len()).map(|t| w[t].is_none() || t == 0 || w[t] != w[t - 1]).collect();
    (e.get_ids().to_vec(), starts)
}

fn sentence(i: usize) -> String {
    let words = ["the", "film", "was", "good", "bad", "unbelievably", "long", "and", "boring", "fun"];
    (0..3 + i % 17).map(|k| words[(i * 7 + k * 3) % words.len()]).collect::<Vec<_>>().join(" ")
}

#[test]
fn text_json_lines_and_gzip_become_shards_of_the_tokenizers_ids() {
    let dir = temp("formats");
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    // In path order: a.txt (one per line, a blank line skipped), b.jsonl, c.txt.gz.
    let a: Vec<String> = (0..40).map(sentence).collect();
    std::fs::write(inputs.join("a.txt"), format!("{}\n\n{}\n", a[..20].join("\n"), a[20..].join("\n"))).unwrap();
    let b: Vec<String> = (40..60).map(sentence).collect();
    let jsonl: String = b.iter().map(|t| serde_json::json!({ "id": 1, "body": t }).to_string() + "\n").collect();
    std::fs::write(inputs.join("b.jsonl"), jsonl).unwrap();
    let c: Vec<String> = (60..90).map(sentence).collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(c.join("\n").as_bytes()).unwrap();
    std::fs::write(inputs.join("c.txt.gz"), gz.finish().unwrap()).unwrap();

    let out = dir.join("out");
    let corpus = ok(preprocess(&[&inputs], &out, &["--text-field", "body", "--shard-tokens", "200"], 2));
    assert!(corpus.shards.len() > 3, "200-token shards: {:?}", corpus.shards);
    assert!(corpus.shards.iter().all(|s| s.tokens <= 200));
    let want: Vec<_> = a.iter().chain(&b).chain(&c).map(|t| encode(t)).collect();
    assert_eq!(corpus.documents, 90);
    assert_eq!(corpus.tokens, want.iter().map(|d| d.0.len() as u64).sum::<u64>());
    assert_eq!(read_back(&out, &corpus), want);
    assert!(want.iter().any(|d| d.1.contains(&false)), "no word split into pieces: the word starts are untested");

    // Blank-line separated documents keep their line breaks inside.
    let blank = dir.join("blank.txt");
    std::fs::write(&blank, "one two\nthree\n\n\nfour five\n").unwrap();
    let corpus = ok(preprocess(&[&blank], &dir.join("out-blank"), &["--blank-lines"], 1));
    assert_eq!(read_back(&dir.join("out-blank"), &corpus), vec![encode("one two\nthree"), encode("four five")]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_output_is_the_same_bytes_for_any_thread_count() {
    let dir = temp("threads");
    // More than one chunk of text.
    let text: String = (0..120_000).map(|i| sentence(i) + "\n").collect();
    assert!(text.len() > worker::preprocess::CHUNK_BYTES);
    let input = dir.join("big.txt");
    std::fs::write(&input, text).unwrap();
    let one = ok(preprocess(&[&input], &dir.join("one"), &["--shard-tokens", "300000"], 1));
    let two = ok(preprocess(&[&input], &dir.join("two"), &["--shard-tokens", "300000"], 2));
    assert_eq!(one, two);
    assert!(one.shards.len() > 1);
    for s in &one.shards {
        let (a, b) =
            (std::fs::read(dir.join("one").join(&s.file)).unwrap(), std::fs::read(dir.join("two").join(&s.file)));
        assert!(a == b.unwrap(), "{} differs between 1 and 2 threads", s.file);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A Parquet file as `datasets` writes a split (pyarrow, snappy, 3 row groups; made by
/// `scripts/make_fixtures.py parquet` beside the same documents as JSON Lines) becomes the same
/// shards, byte for byte, as the JSON Lines; a missing or non-string column is named.
#[test]
fn a_parquet_file_gives_the_shards_of_the_same_json_lines() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let dir = temp("parquet");
    let (from_parquet, from_jsonl) = (dir.join("parquet"), dir.join("jsonl"));
    let a = ok(preprocess(&[&fixtures.join("corpus.parquet")], &from_parquet, &[], 2));
    let b = ok(preprocess(&[&fixtures.join("corpus.jsonl")], &from_jsonl, &[], 2));
    assert_eq!(a, b);
    assert_eq!(a.documents, 50);
    for s in &a.shards {
        let (x, y) =
            (std::fs::read(from_parquet.join(&s.file)).unwrap(), std::fs::read(from_jsonl.join(&s.file)).unwrap());
        assert!(x == y, "{}: the shards differ", s.file);
    }
    let out = preprocess(&[&fixtures.join("corpus.parquet")], &dir.join("x"), &["--text-field", "body"], 1);
    fails_with(out, &["corpus.parquet", "no column \"body\"", "id, text, label"]);
    let out = preprocess(&[&fixtures.join("corpus.parquet")], &dir.join("y"), &["--text-field", "id"], 1);
    fails_with(out, &["corpus.parquet:1", "not a string"]);
    for failed in ["x", "y"] {
        let left: Vec<_> = std::fs::read_dir(dir.join(failed)).map(|d| d.flatten().collect()).unwrap_or_default();
        assert!(left.is_empty(), "a failed run left {left:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_named_and_nothing_written_is_lost() {
    let dir = temp("bad");
    let rows = dir.join("rows.jsonl");
    std::fs::write(&rows, "{\"text\": \"fine\"}\n{\"title\": \"no text\"}\n").unwrap();
    fails_with(preprocess(&[&rows], &dir.join("o1"), &[], 1), &["rows.jsonl:2", "no string field \"text\""]);
    std::fs::write(&rows, "{\"text\": \"fine\"}\n\n{not json\n").unwrap();
    fails_with(preprocess(&[&rows], &dir.join("o2"), &[], 1), &["rows.jsonl:3", "not a JSON object"]);
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    fails_with(preprocess(&[&empty], &dir.join("o3"), &[], 1), &["no documents in", "empty.txt"]);
    let long = dir.join("long.txt");
    std::fs::write(&long, format!("short one\n{}\n", sentence(16).repeat(20))).unwrap();
    fails_with(
        preprocess(&[&long], &dir.join("o4"), &["--shard-tokens", "50"], 1),
        &["long.txt:2", "more than a shard holds (--shard-tokens 50)"],
    );
    assert!(!dir.join("o4/corpus.json").exists(), "an incomplete corpus got a manifest");
    fails_with(preprocess(&[&dir.join("missing.txt")], &dir.join("o5"), &[], 1), &["missing.txt"]);

    // An output directory that holds a corpus is refused and left as it was.
    let good = dir.join("good.txt");
    std::fs::write(&good, "a film\n").unwrap();
    ok(preprocess(&[&good], &dir.join("done"), &[], 1));
    let before = std::fs::read(dir.join("done/shard-00000.tok")).unwrap();
    std::fs::write(&good, "another film entirely\n").unwrap();
    fails_with(preprocess(&[&good], &dir.join("done"), &[], 1), &["already holds a corpus"]);
    assert_eq!(std::fs::read(dir.join("done/shard-00000.tok")).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The corpus as training reads it: every document, across the shards, checked against the
/// manifest and the model's tokenizer.
#[test]
fn a_corpus_reads_back_across_its_shards_for_its_tokenizer_only() {
    use job::tokens::CorpusReader;
    let dir = temp("reader");
    let input = dir.join("docs.txt");
    let texts: Vec<String> = (0..200).map(sentence).collect();
    std::fs::write(&input, texts.join("\n")).unwrap();
    let out = dir.join("out");
    let corpus = ok(preprocess(&[&input], &out, &["--shard-tokens", "300"], 2));
    assert!(corpus.shards.len() > 3);
    let tok = worker::tokenize::load_tokenizer(&tokenizer()).unwrap();
    let hash = worker::tokenize::content_hash(&tok);
    let reader = CorpusReader::open(&out, Some((&hash, &tokenizer()))).unwrap();
    assert_eq!(reader.documents(), 200);
    for (d, text) in texts.iter().enumerate() {
        assert_eq!(reader.document(d as u64), encode(text), "document {d}");
    }
    let other =
        CorpusReader::open(&out, Some((&[0; 32], Path::new("other/tokenizer.json")))).err().unwrap().to_string();
    assert!(
        other.contains("shard-00000.tok") && other.contains("another tokenizer than other/tokenizer.json"),
        "{other}"
    );
    let manifest = out.join("corpus.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let first = &corpus.shards[0];
    let changed = text.replacen(
        &format!("\"documents\": {}", first.documents),
        &format!("\"documents\": {}", first.documents + 1),
        1,
    );
    assert_ne!(changed, text);
    std::fs::write(&manifest, changed).unwrap();
    let e = CorpusReader::open(&out, Some((&hash, &tokenizer()))).err().unwrap().to_string();
    assert!(e.contains("shard-00000.tok") && e.contains("where corpus.json says"), "{e}");
    std::fs::remove_file(&manifest).unwrap();
    let e = CorpusReader::open(&out, Some((&hash, &tokenizer()))).err().unwrap().to_string();
    assert!(e.contains("corpus.json") && e.contains("incomplete or missing"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A memory cgroup of `limit` bytes for one child process: (the directory, the file that takes a
/// pid), cgroup v1 or v2, or None where this machine lets us create none.
fn memory_cgroup(tag: &str, limit: u64) -> Option<(PathBuf, PathBuf)> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
    let (dir, files): (PathBuf, &[&str]) =
        if std::fs::read_to_string(v2).is_ok_and(|c| c.split_whitespace().any(|x| x == "memory")) {
            (
                PathBuf::from(format!("/sys/fs/cgroup/tandem-{tag}-{}", std::process::id())),
                &["memory.max", "memory.swap.max"],
            )
        } else {
            let base = Path::new("/sys/fs/cgroup/memory");
            (
                base.join(format!("tandem-{tag}-{}", std::process::id())),
                &["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
            )
        };
    std::fs::create_dir(&dir).ok()?;
    // The first file must take the limit; the swap one exists only where swap is accounted.
    if std::fs::write(dir.join(files[0]), limit.to_string()).is_err() {
        let _ = std::fs::remove_dir(&dir);
        return None;
    }
    let _ =
        std::fs::write(dir.join(files[1]), if files[1] == "memory.swap.max" { "0".into() } else { limit.to_string() });
    Some((dir.clone(), dir.join("cgroup.procs")))
}

/// The acceptance test of streaming: a corpus twice the size of the memory the process may use
/// (a memory cgroup, which counts what the process touches, unlike `ulimit -v`, which would
/// count mapped files) is preprocessed whole, then pretrained on under the same limit.
#[test]
fn a_corpus_larger_than_the_memory_limit_is_preprocessed_and_trained_on() {
    const LIMIT: u64 = 64 << 20;
    let Some((cgroup, procs)) = memory_cgroup("preprocess", LIMIT) else {
        println!(
            "a_corpus_larger_than_the_memory_limit_is_preprocessed_and_trained_on: skipped: no memory cgroup can be \
             created here"
        );
        return;
    };
    let dir = temp("memory");
    let input = dir.join("big.txt");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    let mut lines = 0u64;
    let mut bytes = 0u64;
    while bytes < 2 * LIMIT {
        let s = sentence(lines as usize * 7 + 3) + "\n";
        f.write_all(s.as_bytes()).unwrap();
        bytes += s.len() as u64;
        lines += 1;
    }
    drop(f);
    let out = dir.join("out");
    let script = format!("echo $$ > {}; exec \"$0\" \"$@\"", procs.display());
    let run = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_worker"), "preprocess"])
        .arg(&input)
        .arg("--tokenizer")
        .arg(tokenizer())
        .arg("--out")
        .arg(&out)
        .arg("--no-progress")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&cgroup);
    let corpus = ok(run);
    assert_eq!(corpus.documents, lines, "every line of the {bytes}-byte corpus is a document");
    println!("preprocessed {bytes} bytes ({} tokens) under a {LIMIT}-byte memory cgroup", corpus.tokens);

    // Pretraining on it under the same limit: the rows are numbered from the document lengths
    // and read from the mapped shards as the shuffled epoch asks for them.
    let Some((cgroup, procs)) = memory_cgroup("pretrain", LIMIT) else { panic!("the second cgroup") };
    let script = format!("echo $$ > {}; exec \"$0\" \"$@\"", procs.display());
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-cls");
    let cfg = dir.join("job.toml");
    let text = format!(
        "[model]\npath = {model:?}\nmax_seq_len = 32\n[data]\ntrain = {out:?}\n[train]\ntask = \"mlm\"\n\
         max_steps = 4\nbatch_size = 8\n[output]\ndir = {:?}\n",
        dir.join("run")
    );
    std::fs::write(&cfg, text).unwrap();
    let run = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_worker"), "train", "--no-progress", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let peak = std::fs::read_to_string(cgroup.join("memory.max_usage_in_bytes"))
        .or_else(|_| std::fs::read_to_string(cgroup.join("memory.peak")))
        .unwrap_or_default();
    let _ = std::fs::remove_dir(&cgroup);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "training failed: {}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    println!("pretrained 4 steps on it under the same limit (peak {} bytes)", peak.trim());
    std::fs::remove_dir_all(&dir).unwrap();
}
