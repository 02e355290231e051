"""The PyTorch peer of the GPU benchmark: transformers' BertForSequenceClassification with
BERT-base shapes (12 layers, hidden 768, 12 heads, vocab 30522; random weights: no download),
sequence 128, batch 32 (or --batch), training steps (forward, backward, AdamW) in bf16 autocast
with fp32 master weights, timed with CUDA events after a warm-up. Prints one JSON line: tokens/s
and model FLOPs utilisation against the card's dense bf16 peak (--peak-tflops, default 989 for
an H200 SXM).

FLOPs per token of a training step: 6 x (non-embedding parameters) + 12 x layers x seq x hidden
(the attention score and value products, forward and backward), as in the PaLM appendix.
"""

import argparse
import json

import torch
from transformers import BertConfig, BertForSequenceClassification


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = BertConfig(num_labels=2, attn_implementation="eager")
    model = BertForSequenceClassification(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")
    labels = torch.randint(0, 2, (a.batch,), device="cuda")
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(a.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / a.steps
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * a.seq * cfg.hidden_size
    tokens_per_s = a.batch * a.seq / seconds
    mfu = tokens_per_s * flops_per_token / (a.peak_tflops * 1e12)
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                      "batch": a.batch, "seq": a.seq, "step_s": round(seconds, 5),
                      "tokens_per_s": round(tokens_per_s), "mfu": round(mfu, 4)}), flush=True)


if __name__ == "__main__":
    main()
