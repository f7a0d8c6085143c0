"""The ``fisher`` importance criterion (hwprune/fisher.py): heads and MLP neurons ranked by the Fisher information of a
mask on them, computed label-free on the user's data, on tiny random-init BERT and ViT models built here."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from hwprune import fisher
from hwprune import graph
from hwprune import transformer_groups as tg
from hwprune.errors import DataError
from hwprune.plan import PruningPlan, apply_plan, replay_plan

transformers = pytest.importorskip("transformers")
from torchvision.models import VisionTransformer  # noqa: E402

HEAD_DIM = 8
ATTN0 = "encoder.layer.0.attention.self"
MLP0 = "encoder.layer.0.intermediate.dense"


def tokens(n=12, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, 6:] = 0  # some padded sequences
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def bert_with_silent_units():
    """A BERT whose layer-0 head 1 and MLP neurons 0..15 reach nothing (the output projection's columns that read
    them are zero) yet carry the largest weights: magnitude keeps them, their Fisher is exactly zero."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    layer = model.encoder.layer[0]
    with torch.no_grad():
        rows = slice(1 * HEAD_DIM, 2 * HEAD_DIM)
        for p in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            p.weight[rows] *= 10
        layer.attention.output.dense.weight[:, rows] = 0
        layer.intermediate.dense.weight[:16] *= 10
        layer.output.dense.weight[:, :16] = 0
    return model


def groups_of(model, example):
    return tg.list_groups(model, example, graph.list_groups(model, example))


def hidden(model, x):
    with torch.no_grad():
        return model(**x).last_hidden_state


def test_fisher_removes_the_silent_units_that_magnitude_keeps(bert_with_silent_units):
    model, x = bert_with_silent_units, tokens()
    groups = groups_of(model, tokens(1))
    scores = fisher.mask_fisher(model, [g.name for g in groups], [(x, None)], "cosine",
                                readers=fisher.mlp_readers(groups))
    heads, mlp = scores[f"heads:{ATTN0}"], scores[f"mlp:{MLP0}"]
    assert heads.shape == (4,) and mlp.shape == (64,)
    assert heads[1] == 0 and (heads[[0, 2, 3]] > 0).all()
    assert (mlp[:16] == 0).all() and (mlp[16:] > 0).sum() > 40
    ratios = {g.name: 0.0 for g in groups}
    ratios.update({f"heads:{ATTN0}": 0.25, f"mlp:{MLP0}": 0.25})
    dense = hidden(model, x)
    for criterion in ("l1", "fisher"):
        plan = PruningPlan(ratios=ratios, criterion=criterion)
        pruned, recorded, _ = apply_plan(model, plan, tokens(1), scores=scores if criterion == "fisher" else None)
        same = torch.allclose(hidden(pruned, x), dense, atol=1e-5)
        # removing units that reach nothing leaves the output as it was; magnitude removes live ones instead
        assert same == (criterion == "fisher"), criterion
        if criterion == "fisher":
            assert recorded.removed == {f"heads:{ATTN0}": [1]}
            replayed = replay_plan(model, recorded, tokens(1))  # the record replays without the scores
            assert torch.allclose(hidden(replayed, x), hidden(pruned, x), atol=1e-6)


def test_vision_transformer_heads_and_mlp_get_scores_under_kl():
    """nn.MultiheadAttention calls its output projection functionally: the scores come from the explicit form."""
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                            num_classes=10).eval()
    nn.init.normal_(vit.heads.head.weight)
    attention = vit.encoder.layers.encoder_layer_0.self_attention
    with torch.no_grad():
        attention.out_proj.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0  # head 2 reaches nothing
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    groups = groups_of(vit, images[:1])
    scores = fisher.mask_fisher(vit, [g.name for g in groups], [(images, None)], "kl",
                                readers=fisher.mlp_readers(groups))
    kinds = {tg.kind_of(g) for g in scores}
    assert kinds == {tg.HEADS, tg.MLP}
    head_scores = scores["heads:encoder.layers.encoder_layer_0.self_attention"]
    assert head_scores[2] == 0 and (head_scores[[0, 1, 3]] > 0).all()
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    assert isinstance(vit.encoder.layers.encoder_layer_0.self_attention, nn.MultiheadAttention)  # dense untouched


def test_accuracy_objective_needs_labels(bert_with_silent_units):
    groups = groups_of(bert_with_silent_units, tokens(1))
    with pytest.raises(DataError, match="labels"):
        fisher.mask_fisher(bert_with_silent_units, [g.name for g in groups], [(tokens(), None)], "accuracy")


def test_cli_search_with_fisher_importance_on_texts(tmp_path, profile_file):
    """The whole path: a space with ``importance: fisher`` on heads + MLP, label-free texts, cosine objective; every
    trial's plan records data-ranked heads and replays on export."""
    from test_cli_errors import run_cli
    from test_hf_models import text_model_and_texts, tiny_bert_config

    torch.manual_seed(0)
    model_dir, texts = text_model_and_texts(tmp_path, transformers.BertModel(tiny_bert_config()))
    space = tmp_path / "space.yaml"
    space.write_text("description: heads and MLP by fisher\nprunable: ['heads:*', 'mlp:*']\nignore: []\n"
                     "ratios: [0.5]\nround_to: 8\nimportance: fisher\nrecovery:\n  bn_recalibration_batches: 0\n"
                     "  finetune_steps: 2\n  batch_size: 8\n  lr: 0.0001\n  optimizer: adam\n  distill: true\n")
    out = tmp_path / "run"
    proc = run_cli(["search", "--model", f"hf:{model_dir}", "--data", f"text:{texts}", "--inputs",
                    "input_ids:int64:16,attention_mask:int64:16", "--objective", "cosine", "--search-space",
                    str(space), "--profile", str(profile_file), "--trials", "2", "--out", str(out),
                    "--verify-rounds", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    plans = [json.loads(p.read_text()) for p in (out / "trials").glob("*/plan.json")]
    assert plans and all(p["criterion"] == "fisher" for p in plans)
    assert any(len(p["removed"]) == 2 for p in plans)  # both layers lost half their heads
    metrics = json.loads(next((out / "models").glob("trial-*/metrics.json")).read_text())
    assert 0.0 < metrics["cosine"] <= 1.0 + 1e-6


def test_allocate_removes_the_cheapest_information_first_across_groups():
    scores = {"heads:a": torch.tensor([5.0, 0.0, 1.0]), "mlp:b": torch.tensor([0.09, 0.2, 9.0, 0.05])}
    cost = {"heads:a": 10.0, "mlp:b": 1.0}  # per unit; total 34
    # by Fisher per MAC: head 1 (0), neuron 3 (.05), neuron 0 (.09), head 2 (.1), neuron 1 (.2), head 0 (.5), ...
    assert fisher.allocate(scores, cost, 0.25) == {"heads:a": 1, "mlp:b": 0}  # head 1 alone saves 10 >= 8.5
    assert fisher.allocate(scores, cost, 0.4) == {"heads:a": 2, "mlp:b": 2}  # 10 + 1 + 1 < 13.6, + head 2
    everything = fisher.allocate(scores, cost, 1.0, keep_one=["heads:a"])
    assert everything == {"heads:a": 2, "mlp:b": 4}  # one head always kept


def test_fisher_global_plan_spends_the_macs_where_they_matter_least(bert_with_silent_units, tmp_path):
    """baselines.global_plan_ratios under fisher: the silent head and neurons go first, then MACs by Fisher/MAC;
    the plan removes about the fraction of the groups' MACs asked for."""
    from hwprune.baselines import global_plan_ratios
    from hwprune.costs import count_macs
    from hwprune.workload import build_workload
    from test_hf_models import text_model_and_texts

    model_dir, texts = text_model_and_texts(tmp_path, bert_with_silent_units, count=40)
    space = tmp_path / "space.yaml"
    space.write_text("prunable: ['heads:*', 'mlp:*']\nignore: []\nratios: [0.0, 0.25, 0.5, 0.75]\nround_to: 8\n"
                     "importance: fisher\n")
    w = build_workload(f"hf:{model_dir}", f"text:{texts}", str(space),
                       inputs="input_ids:int64:16,attention_mask:int64:16", objective="cosine", log=lambda m: None)
    heads0, mlp0 = f"heads:model.{ATTN0}", f"mlp:model.{MLP0}"  # hf: models are wrapped (HFTextModel.model)
    small = global_plan_ratios(w, 0.1)
    # the first units out are the free ones (Fisher 0): layer 0's silent head, then its silent neurons
    assert small[heads0] == 0.25 and 0 < small[mlp0] <= 0.25
    assert all(r == 0 for g, r in small.items() if g not in (heads0, mlp0))
    dense = count_macs(w.model, w.example_input)
    for fraction in (0.3, 0.6):
        ratios = global_plan_ratios(w, fraction)
        model, plan, _ = w.apply(w.plan(ratios))
        assert 1 in plan.removed[heads0]  # the silent head always goes
        kept = count_macs(model, w.example_input) / dense
        assert 1 - fraction - 0.15 < kept < 1 - fraction + 0.1, (fraction, kept)
