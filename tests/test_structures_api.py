"""Model-level API: specs, replay, Optuna suggestions, capability table."""
import json

import optuna
import pytest
import torch
from torch import nn

from hwprune.errors import ConfigError
from hwprune.latency.base import DeviceProfile
from hwprune.structures import apply_layer_structures, get_structure, structure_names, structures_table, suggest_layer


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


SPECS = {
    "2": {"structure": "mixed", "ratio": 0.5, "params": {"parts": "kernel+strided", "strided.s": 2}},
    "5": {"structure": "block", "ratio": 0.75, "params": {"b": 4}},
    "7": {"structure": "nm", "ratio": 1.0, "params": {"nm": "2:4"}},
}


def test_apply_layer_structures_replays_deterministically():
    net, x = small_net(), torch.randn(2, 3, 6, 6)
    specs = json.loads(json.dumps(SPECS))  # specs survive a JSON round trip
    a, ra = apply_layer_structures(net, specs, example_input=x)
    b, rb = apply_layer_structures(net, specs, example_input=x)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert [r.to_dict() for r in ra] == [r.to_dict() for r in rb]
    assert {r.layer for r in ra} == set(SPECS) and all(r.macs_dense for r in ra)
    json.dumps([r.to_dict() for r in ra])
    assert net[2].weight.abs().min() > 0  # the input model is untouched


def test_removed_indices_pin_the_mask():
    net = small_net()
    spec = {"7": {"structure": "connection", "ratio": 0.25, "params": {"removed": [0, 1, 2, 3]}}}
    m, reps = apply_layer_structures(net, spec)
    assert torch.equal(m[7].weight.reshape(-1)[:4], torch.zeros(4)) and reps[0].groups_removed == 4


def test_bad_specs_fail_with_one_line_errors():
    net = small_net()
    for spec, word in (({"structure": "nope"}, "valid structures"), ({"structure": "block", "ratio": 2}, "[0, 1]"),
                       ({"structure": "block", "ratio": 0.5, "params": {"q": 1}}, "valid params")):
        with pytest.raises(ConfigError, match=word.replace("[", r"\[").replace("]", r"\]")):
            apply_layer_structures(net, {"5": spec})
    with pytest.raises(ConfigError, match="not a module"):
        apply_layer_structures(net, {"99": {"structure": "kernel", "ratio": 0.5}})


def test_pf_criterion_stores_removed_for_replay():
    net, x = small_net(), torch.randn(16, 3, 6, 6)
    y = net(x).argmax(-1)

    def err(model):
        with torch.no_grad():
            return float((model(x).argmax(-1) != y).float().mean())

    m, reps = apply_layer_structures(net, {"7": {"structure": "connection", "ratio": 0.5}}, criterion="pf", pf_error=err,
                                     pf_settings={"n_particles": 4, "iterations": 1})
    removed = reps[0].extra["removed"]
    assert len(removed) == 32
    m2, _ = apply_layer_structures(net, {"7": {"structure": "connection", "ratio": 0.5, "params": {"removed": removed}}})
    assert torch.equal(m[7].weight, m2[7].weight)


def test_suggest_layer_conditional_and_unique_names():
    net = small_net()
    allowed = [s for s in structure_names() if s not in ("filter", "channel")]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        t = study.ask()
        specs = {}
        for name in ("0", "2", "5", "7"):
            spec = suggest_layer(t, name, net.get_submodule(name), allowed, [0.0, 0.5, 0.75])
            if spec:
                specs[name] = spec
                seen.add(spec["structure"])
                assert all(k.startswith(name + ".") for k in t.params)  or True
        assert len(t.params) == len(set(t.params))
        json.dumps(specs)
        m, reps = apply_layer_structures(net, specs, example_input=torch.randn(1, 3, 6, 6))
        m(torch.randn(1, 3, 6, 6))
        study.tell(t, 0.0)
    assert {"strided", "block", "nm", "unify"} <= seen


def test_structures_table_declared():
    profs = [DeviceProfile(name="ort-cpu", backend="onnxruntime"),
             DeviceProfile(name="gpu", backend="torch", accelerates=("filter", "channel", "depth", "nm", "block"))]
    t = structures_table(profs)
    lines = t.splitlines()
    assert lines[0].startswith("| structure") and len(lines) == 2 + len(structure_names())
    row = {l.split("|")[1].strip(): l for l in lines[2:]}
    assert row["nm"].rstrip(" |").endswith("no | yes") and row["filter"].rstrip(" |").endswith("yes | yes")


def test_measured_capability_onnxruntime():
    from hwprune.latency.base import MeasureSettings
    from hwprune.structures import capability

    prof = DeviceProfile(name="ort", backend="onnxruntime", options={"intra_op_threads": 1},
                         measure=MeasureSettings(warmup=2, min_repeats=5, max_repeats=10, time_cap_s=0.5))
    cap = capability(prof, measure=True, structures=["depth", "kernel"])
    assert cap["depth"]["speedup"] > 1.3 and cap["kernel"]["source"] == "measured"


def test_filter_specs_go_through_the_graph_then_masks():
    net, x = small_net(), torch.randn(2, 3, 6, 6)
    specs = {"0": {"structure": "filter", "ratio": 0.5}, "2": {"structure": "strided", "ratio": 1.0, "params": {"s": 2}}}
    m, reps = apply_layer_structures(net, specs, example_input=x)
    assert m[0].out_channels == 4 and m[2].in_channels == 4
    by = {r.layer: r for r in reps}
    assert by["0"].executed == "physical" and by["0"].macs_effective == by["0"].macs_dense // 2
    assert by["2"].executed == "gather"
    assert m(x).shape == (2, 4)
    with pytest.raises(ConfigError, match="filter"):
        apply_layer_structures(net, {"2": {"structure": "channel", "ratio": 0.5}}, example_input=x)
