"""``reconstruct`` recovery: the least-squares refit of layers whose input was narrowed (Kwon et al. 2022)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hwprune.recovery import get_method
from hwprune.recovery.reconstruct import reconstruct, refittable_layers


class TwoLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.up = nn.Linear(4, hidden)
        self.down = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.down(self.up(x))


def test_refit_is_exact_when_the_kept_inputs_span_the_dropped_ones():
    torch.manual_seed(0)
    dense = TwoLayer(8)
    with torch.no_grad():  # hidden units 4..7 duplicate 0..3: dropping them loses nothing a refit cannot restore
        dense.up.weight[4:] = dense.up.weight[:4]
        dense.up.bias[4:] = dense.up.bias[:4]
    pruned = TwoLayer(4)
    with torch.no_grad():
        pruned.up.weight.copy_(dense.up.weight[:4])
        pruned.up.bias.copy_(dense.up.bias[:4])
        pruned.down.weight.copy_(dense.down.weight[:, :4])  # what channel pruning leaves: half the contributions
        pruned.down.bias.copy_(dense.down.bias)
    batches = [torch.randn(32, 4) for _ in range(4)]
    x = torch.randn(64, 4)
    before = (pruned(x) - dense(x)).norm() / dense(x).norm()
    assert refittable_layers(pruned, dense) == ["down"]  # "up" lost outputs, not inputs: not refitted
    residuals = reconstruct(pruned, dense, batches, ridge=0.0)
    after = (pruned(x) - dense(x)).norm() / dense(x).norm()
    assert before > 0.1 and residuals["down"] < 1e-6 and after < 1e-5


def test_reconstruct_brings_a_pruned_tiny_bert_closer_to_the_dense_one():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    from hwprune import graph
    from hwprune.hf_models import HFTextModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, attn_implementation="eager"))
    dense = HFTextModel(bert, ["input_ids", "attention_mask"], output="embedding").eval()
    example = (torch.randint(0, 100, (1, 12)), torch.ones(1, 12, dtype=torch.long))
    ratios = {f"model.encoder.layer.{i}.intermediate.dense": 0.5 for i in range(2)}
    pruned, _ = graph.prune_groups(dense, example, ratios)
    batches = [{"input_ids": torch.randint(0, 100, (16, 12)), "attention_mask": torch.ones(16, 12, dtype=torch.long)}
               for _ in range(4)]
    held_out = batches[0]

    def cosine():
        with torch.no_grad():
            return float(nn.functional.cosine_similarity(pruned(**held_out), dense(**held_out)).mean())

    before = cosine()
    residuals = reconstruct(pruned, dense, batches[1:], ridge=1e-3)
    assert sorted(residuals) == [f"model.encoder.layer.{i}.output.dense" for i in range(2)]
    assert cosine() > before


def test_reconstruct_is_a_recovery_method_with_its_parameters():
    from hwprune.config import RecoveryBudget

    method = get_method("reconstruct")
    p = method.params(RecoveryBudget(method=("reconstruct",), method_params={"reconstruct": {"ridge": 0.01}}))
    assert p == {"calibration_batches": 16, "ridge": 0.01}
