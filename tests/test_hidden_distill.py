"""Layer-wise distillation (recovery.distill_hidden): every block's output pulled toward the dense block's."""
from __future__ import annotations

import copy

import pytest
import torch

from hwprune.errors import ConfigError
from hwprune.hidden_distill import HiddenStates, chosen_blocks, default_blocks, hidden_loss

transformers = pytest.importorskip("transformers")


def _bert():
    from test_hf_models import tiny_bert_config

    torch.manual_seed(0)
    return transformers.BertModel(tiny_bert_config()).eval()


def test_the_blocks_are_the_transformer_layers_or_the_named_ones():
    bert = _bert()
    layers = bert.config.num_hidden_layers
    assert default_blocks(bert) == [f"encoder.layer.{i}" for i in range(layers)]
    assert chosen_blocks(bert, ["encoder.layer.0"]) == ["encoder.layer.0"]
    with pytest.raises(ConfigError, match="matches no module"):
        chosen_blocks(bert, ["decoder.*"])


def test_the_loss_is_relative_ignores_padding_and_skips_blocks_that_changed_shape():
    t = torch.randn(2, 5, 8)
    assert float(hidden_loss({"a": t.clone()}, {"a": t})) == 0.0
    s = t.clone()
    s[:, 3:] += 1.0  # the student differs only on the padded positions
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[:, 3:] = 0
    assert float(hidden_loss({"a": s}, {"a": t}, mask)) == 0.0
    assert float(hidden_loss({"a": s}, {"a": t})) > 0.0
    assert float(hidden_loss({"a": 2 * t}, {"a": t})) == pytest.approx(1.0)  # ||2t - t||^2 / ||t||^2
    assert hidden_loss({"a": torch.randn(2, 5, 4)}, {"a": t}) is None  # a narrowed block: nothing to compare


def _block_errors(student, dense, batch) -> list:
    blocks = default_blocks(dense)
    with HiddenStates(student, blocks) as s, HiddenStates(dense, blocks) as t, torch.no_grad():
        student(**batch)
        dense(**batch)
        return [float(hidden_loss({n: s.outputs[n]}, {n: t.outputs[n]}, batch["attention_mask"])) for n in blocks]


def test_layerwise_distillation_brings_every_block_closer_than_output_only(tmp_path):
    """Two copies of a perturbed tiny BERT distil from the dense one for the same steps: with the layer-wise term
    every block's output ends closer to the dense block's than with the output alone (which let the first block
    drift further from it than it started: the last block compensated), and no hook stays behind."""
    from hwprune.config import RecoveryBudget
    from hwprune.data import load_dataset
    from hwprune.recover import train_budget
    from test_hf_models import text_model_and_texts

    dense = _bert()
    model_dir, texts = text_model_and_texts(tmp_path, dense, count=48)
    data = load_dataset(f"text:{texts}", tokenizer_dir=str(model_dir), seq_len=16)
    start = copy.deepcopy(dense)
    with torch.no_grad():
        for p in start.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    held_out = next(iter(data.loader("val", 64)))[0]
    budget = RecoveryBudget(finetune_steps=40, batch_size=8, lr=1e-3, optimizer="adam", weight_decay=0.0,
                            distill_loss="cosine")
    output_only = train_budget(copy.deepcopy(start).train(), data, budget, 40, teacher=dense)
    layerwise = train_budget(copy.deepcopy(start).train(), data, RecoveryBudget(**{**budget.__dict__,
                             "distill_hidden": 1.0}), 40, teacher=dense)
    before = _block_errors(start, dense, held_out)
    plain, matched = _block_errors(output_only, dense, held_out), _block_errors(layerwise, dense, held_out)
    assert all(m < min(p, b) for m, p, b in zip(matched, plain, before)), (before, plain, matched)
    assert not any(m._forward_hooks for m in list(dense.modules()) + list(layerwise.modules()))


def test_the_space_reads_the_weight_and_the_patterns(tmp_path):
    from hwprune.config import load_search_space

    f = tmp_path / "s.yaml"
    f.write_text("prunable: ['*']\nrecovery:\n  distill_hidden: 2\n  distill_hidden_layers: ['encoder.layer.*']\n")
    r = load_search_space(str(f)).recovery
    assert r.distill_hidden == 2.0 and r.distill_hidden_layers == ("encoder.layer.*",)
    f.write_text("prunable: ['*']\nrecovery:\n  distill_hidden: -1\n")
    with pytest.raises(ConfigError, match="distill_hidden"):
        load_search_space(str(f))
