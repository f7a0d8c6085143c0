"""Input specs (hwprune/inputs.py): the text form, feeds, example tensors, and that the default image spec keeps
every image path exactly as it was."""
import numpy as np
import pytest
import torch

from hwprune.errors import ModelError
from hwprune.inputs import (
    DEFAULT_SEQUENCE_LENGTH,
    InputSpec,
    as_spec,
    call_model,
    inputs_from_wire,
    inputs_key,
    inputs_to_wire,
    measured_inputs,
)
from hwprune.latency.base import DeviceProfile


def test_text_form_round_trips_and_fills_by_name():
    spec = InputSpec.parse("input_ids:int64:16:100, attention_mask:int64:16,token_type_ids:int64:16")
    assert spec.names == ("input_ids", "attention_mask", "token_type_ids")
    assert InputSpec.parse(spec.to_text()) == spec
    assert InputSpec.from_dict(spec.to_dict()) == spec
    feeds = spec.numpy_feeds(batch=3, seed=1)
    assert {k: v.shape for k, v in feeds.items()} == {n: (3, 16) for n in spec.names}
    assert all(v.dtype == np.int64 for v in feeds.values())
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 100 and feeds["input_ids"].std() > 0
    assert (feeds["attention_mask"] == 1).all() and (feeds["token_type_ids"] == 0).all()
    # seeded: the same feeds every time, other seeds differ
    assert (spec.numpy_feeds(3, 1)["input_ids"] == feeds["input_ids"]).all()
    assert not (spec.numpy_feeds(3, 2)["input_ids"] == feeds["input_ids"]).all()


def test_sequence_length_comes_from_the_profile_unless_fixed():
    open_spec = InputSpec.parse("input_ids:int64,attention_mask:int64")
    assert open_spec.shapes(2) == {"input_ids": (2, DEFAULT_SEQUENCE_LENGTH), "attention_mask": (2, DEFAULT_SEQUENCE_LENGTH)}
    profile = DeviceProfile("p", "onnxruntime", batch_size=4, sequence_length=32)
    measured = measured_inputs(open_spec, profile)
    assert measured.shapes(profile.batch_size)["input_ids"] == (4, 32)
    fixed = InputSpec.parse("input_ids:int64:64")
    assert measured_inputs(fixed, profile).shapes(1)["input_ids"] == (1, 64)
    assert InputSpec.from_dict(measured.to_dict()).sequence_length == 32


def test_image_spec_is_the_old_single_input():
    spec = InputSpec.parse("input:float32:3x8x8")
    assert spec.is_image and spec == InputSpec.image((3, 8, 8))
    x = spec.example(1)
    assert torch.equal(x, torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    profile = DeviceProfile("p", "onnxruntime", batch_size=2)
    # latency code gets the plain batch-first shape, as before: same cache keys, same worker messages
    assert measured_inputs(spec, profile) == (2, 3, 8, 8)
    assert inputs_key((2, 3, 8, 8)) == [2, 3, 8, 8]
    assert inputs_to_wire((2, 3, 8, 8)) == {"shape": [2, 3, 8, 8]}
    assert as_spec((2, 3, 8, 8)) == spec


def test_wire_form_of_a_token_spec():
    spec = InputSpec.parse("input_ids:int64:8:50,attention_mask:int64:8")
    assert inputs_from_wire(inputs_to_wire(spec)) == spec
    assert inputs_key(spec) != inputs_key(InputSpec.parse("input_ids:int64:9:50,attention_mask:int64:9"))


def test_call_conventions():
    class Kw(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).float().sum(1, keepdim=True)

    positional = InputSpec.parse("input_ids:int64:4:10,attention_mask:int64:4")
    keyword = InputSpec.parse("attention_mask:int64:4,input_ids:int64:4:10,call=keyword")
    assert isinstance(positional.example(2), tuple) and isinstance(keyword.example(2), dict)
    assert call_model(Kw(), keyword.example(2)).shape == (2, 1)
    assert call_model(Kw(), positional.example(2)).shape == (2, 1)
    assert InputSpec.parse(keyword.to_text()) == keyword


@pytest.mark.parametrize("text, fragment", [
    ("input_ids", "is not NAME:DTYPE"),
    ("input_ids:int32:128", "dtype 'int32'"),
    ("input_ids:int64:12a", "not integers"),
    ("input_ids:int64:0", "must be positive"),
    ("pixels:float32", "needs its sizes"),
    ("a:int64:4,a:int64:4", "repeat"),
    ("x:float32:3x8x8:10", "value range"),
    ("input_ids:int64:4,call=named", "call 'named'"),
    ("", "names no input"),
])
def test_bad_text_is_one_line(text, fragment):
    with pytest.raises(ModelError) as e:
        InputSpec.parse(text)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg and "input_ids:int64:128,attention_mask:int64:128" in msg


def test_profiles_declare_a_sequence_length(tmp_path):
    from hwprune.config import PROFILE_DIR, PROJECT_ROOT, load_profile

    for path in sorted((PROJECT_ROOT / PROFILE_DIR).glob("*.yaml")):
        assert load_profile(str(path)).sequence_length == 128, path.name
    p = tmp_path / "p.yaml"
    p.write_text("backend: onnxruntime\nsequence_length: 64\n")
    prof = load_profile(str(p))
    assert prof.sequence_length == 64 and DeviceProfile.from_dict(prof.to_dict()).sequence_length == 64


@pytest.mark.parametrize("value", ["0", "true", "12.5", "'128'", "100000"])
def test_profile_sequence_length_is_checked_strictly(tmp_path, value):
    from hwprune.config import load_profile
    from hwprune.errors import ConfigError

    p = tmp_path / "p.yaml"
    p.write_text(f"backend: onnxruntime\nsequence_length: {value}\n")
    with pytest.raises(ConfigError, match="sequence_length") as e:
        load_profile(str(p))
    assert "\n" not in str(e.value)


KEYWORD_FACTORY = '''
import torch
import torch.nn as nn


class TokenNet(nn.Module):
    """Takes its inputs by keyword only: the spec's call=keyword convention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden = nn.Linear(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, *, input_ids, attention_mask):
        h = torch.relu(self.hidden(self.embed(input_ids)))
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def token_net():
    return TokenNet()
'''


def test_keyword_convention_model_through_workload_macs_and_onnx(tmp_path, monkeypatch):
    import onnxruntime as ort

    from hwprune.costs import count_macs
    from hwprune.plan import apply_plan
    from hwprune.workload import build_workload

    (tmp_path / "kw_token_models.py").write_text(KEYWORD_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    w = build_workload("kw_token_models:token_net", "none", "filters",
                       inputs="input_ids:int64:12,attention_mask:int64:12,call=keyword", log=lambda m: None)
    assert w.inputs.fields[0].high == 50  # bounded by the model's embedding table
    assert isinstance(w.example_input, dict) and w.ignored == ["head"] and [g.name for g in w.groups] == ["hidden"]
    assert count_macs(w.model, w.example_input) == 12 * 16 * 32 + 32 * 4
    pruned = apply_plan(w.model, w.uniform_plan(0.5), w.example_input)[0]
    assert pruned.hidden.out_features == 16
    path = w.export_onnx(pruned, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = w.resolved_inputs.numpy_feeds(1)
    with torch.no_grad():
        expected = pruned(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert np.abs(sess.run(None, feeds)[0] - expected).max() < 1e-5


def test_padding_masks_the_last_positions():
    spec = InputSpec.parse("input_ids:int64:8:30,attention_mask:int64:8,padding=0.25")
    assert InputSpec.parse(spec.to_text()) == spec and InputSpec.from_dict(spec.to_dict()) == spec
    mask = spec.numpy_feeds(2)["attention_mask"]
    assert (mask[:, :6] == 1).all() and (mask[:, 6:] == 0).all()
    for bad in ("padding=1", "padding=-0.1", "padding=x"):
        with pytest.raises(ModelError, match="padding"):
            InputSpec.parse(f"input_ids:int64:8,{bad}")
    with pytest.raises(ModelError, match="sequence_length"):
        InputSpec.from_dict({**spec.to_dict(), "sequence_length": -3})
