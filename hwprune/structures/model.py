"""Model-level API: apply per-layer structure specs to a model, and suggest them from an Optuna trial.

A spec is JSON: ``{"structure": "block", "ratio": 0.75, "params": {"b": 4}}``. ``params`` may hold
``"removed": [flat group indices]`` to pin the mask (what a particle-filter search chose), which makes replay exact
without re-running the search. Without it, masks are recomputed from the weights by the criterion and the mask
contract's deterministic ordering, so the same model + spec + criterion always gives the same result.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from hwprune.errors import ConfigError, ModelError
from hwprune.inputs import call_model
from hwprune.structures.base import LayerReport, check_ratio
from hwprune.structures.registry import get_structure

PHYSICAL_GRAPH = ("filter", "channel")


def normalize_spec(layer: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Validated copy of a spec (keys structure, ratio, params); raises ConfigError naming the layer."""
    if not isinstance(spec, dict) or "structure" not in spec:
        raise ConfigError(f"spec for layer {layer!r} is {spec!r}; it needs at least {{'structure': NAME, 'ratio': R}}")
    unknown = set(spec) - {"structure", "ratio", "params"}
    if unknown:
        raise ConfigError(f"spec for layer {layer!r} has unknown keys {sorted(unknown)}; valid keys: structure, ratio, params")
    st = get_structure(spec["structure"])
    ratio = spec.get("ratio", st.fixed_ratio if st.fixed_ratio is not None else 0.0)
    check_ratio(ratio, f"ratio of layer {layer!r}")
    out = {"structure": st.name, "ratio": float(ratio), "params": dict(spec.get("params") or {})}
    try:
        json.dumps(out)
    except TypeError as e:
        raise ConfigError(f"spec for layer {layer!r} is not JSON-serialisable ({e}); use numbers, strings and lists") from None
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"layer {name!r} is not a module of the model; use a name from model.named_modules()") from None


def input_shapes(model: nn.Module, example_input: torch.Tensor) -> Dict[str, Tuple[int, ...]]:
    """Shape of the first input of every named module in one forward pass."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = []

    def make(name):
        def hook(mod, inp, out):
            if inp and torch.is_tensor(inp[0]):
                shapes.setdefault(name, tuple(inp[0].shape))

        return hook

    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_hook(make(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_input)  # a tensor, or named inputs (hwprune/inputs.py)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return shapes


def following_bn(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The BatchNorm registered right after layer ``name`` if it normalises its outputs (conv-bn convention)."""
    mods = list(model.named_modules())
    for i, (n, m) in enumerate(mods):
        if n == name and i + 1 < len(mods):
            nxt = mods[i + 1][1]
            if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == m.weight.shape[0]:
                return nxt
    return None


def apply_layer_structures(
    model: nn.Module,
    specs: Dict[str, Dict[str, Any]],
    criterion: str = "l1",
    example_input: Optional[torch.Tensor] = None,
    grads: Optional[Dict[str, torch.Tensor]] = None,
    pf_error: Optional[Callable[[nn.Module], float]] = None,
    pf_settings: Optional[Dict[str, Any]] = None,
    physical: str = "graph",
) -> Tuple[nn.Module, List[LayerReport]]:
    """Apply every layer's spec to a copy of ``model``; returns (new model, per-layer reports).

    * ``filter``/``channel`` specs: with ``physical="graph"`` (default) they are realized first through
      ``hwprune.graph.prune_groups`` (needs ``example_input``); with ``physical="skip"`` they are ignored (the caller
      already pruned them physically) — pass only the remaining specs in that case or they are skipped silently.
    * other specs are realized per layer (masked, gathered, BSR, unified, shortcut) after that.
    * ``criterion``: l1 | l2 | block_mean | taylor (``grads`` from ``importance.taylor_grads`` on the model after
      physical pruning) | bn | pf (``pf_error(model) -> misclassification rate`` on validation batches; the chosen
      removal set is returned in ``report.extra["removed"]`` — store it in the spec's params for exact replay).
    """
    from hwprune.importance import check_criterion

    check_criterion(criterion)
    if physical not in ("graph", "skip"):
        raise ConfigError(f"physical={physical!r} is not one of graph, skip")
    norm = {layer: normalize_spec(layer, s) for layer, s in specs.items()}
    model = copy.deepcopy(model)
    reports: List[LayerReport] = []

    phys = {k: v for k, v in norm.items() if v["structure"] in PHYSICAL_GRAPH and v["ratio"] > 0}
    if phys and physical == "graph":
        if example_input is None:
            raise ConfigError("filter/channel specs need example_input to trace the dependency graph")
        from hwprune.structures.filter_channel import physical_report, realize_physical

        before = {k: copy.deepcopy(_get_module(model, k)) for k in phys}
        shapes_before = input_shapes(model, example_input)
        model, _history = realize_physical(model, example_input, phys, "l1" if criterion in ("pf", "taylor") else criterion)
        shapes_after = input_shapes(model, example_input)
        for k, spec in phys.items():
            rep = physical_report(k, spec["structure"], spec["ratio"], before[k], _get_module(model, k),
                                  shapes_before.get(k), shapes_after.get(k))
            reports.append(rep)

    shapes = input_shapes(model, example_input) if example_input is not None else {}
    rest = [(k, v) for k, v in norm.items() if v["structure"] not in PHYSICAL_GRAPH]
    rest.sort(key=lambda kv: (kv[1]["structure"] == "depth", kv[0]))  # depth last: it may remove other layers
    removed_blocks: List[str] = []
    for layer, spec in rest:
        if any(layer == b or layer.startswith(b + ".") for b in removed_blocks):
            continue  # inside a block already replaced by its shortcut
        st = get_structure(spec["structure"])
        module = _get_module(model, layer)
        params = dict(spec["params"])
        crit = criterion
        if criterion == "pf" and spec["ratio"] > 0 and "removed" not in params and st.name != "mixed":
            if pf_error is None:
                raise ConfigError("criterion 'pf' needs pf_error(model) -> misclassification rate on validation batches")
            params["removed"] = _pf_removed(model, layer, st, spec["ratio"], params, pf_error, pf_settings or {})
        if crit == "pf":
            crit = "l1"  # scores only break ties / initialise; the removal set comes from the particle filter
        bn = following_bn(model, layer) if crit == "bn" else None
        grad = grads.get(layer) if grads else None
        new, rep = st.apply(module, spec["ratio"], params, crit, grad=grad, in_shape=shapes.get(layer), bn=bn)
        rep.layer = layer
        if "removed" in params:
            rep.extra["removed"] = [int(i) for i in params["removed"]]
        _set_module(model, layer, new)
        if st.name == "depth" and rep.groups_removed:
            removed_blocks.append(layer)
        reports.append(rep)
    return model, reports


def _pf_removed(model, layer, st, ratio, params, pf_error, settings) -> List[int]:
    from hwprune.importance import particle_filter_mask

    module = _get_module(model, layer)
    p = st.check_params({k: v for k, v in params.items() if k != "removed"})
    w = module.weight.detach()
    n = st.group_index(w, p)[1]
    orig = w.clone()

    def error(keep):
        em = st.element_mask(orig, torch.as_tensor(keep), p)
        with torch.no_grad():
            module.weight.copy_(orig * em)
        try:
            return pf_error(model)
        finally:
            with torch.no_grad():
                module.weight.copy_(orig)

    keep, _info = particle_filter_mask(n, ratio, error, init_scores=st.scores(w, "l1", p, module=module).numpy(), **settings)
    return [int(i) for i in (~keep).nonzero()[0]]


def suggest_layer(
    trial,
    layer_name: str,
    module: nn.Module,
    allowed: Sequence[str],
    ratios: Union[Sequence[float], Dict[str, float]],
) -> Optional[Dict[str, Any]]:
    """Suggest one layer's spec from an Optuna trial (conditional parameters).

    Parameter names: ``{layer}.structure`` (categorical over the allowed structures that apply to the module),
    then ``{layer}.{structure}.{param}`` for its params (mixed: ``{layer}.mixed.{part}.{param}``) and
    ``{layer}.{structure}.ratio`` — categorical over ``ratios`` if it is a list, else
    ``suggest_float(low, high, step=...)`` from a dict. ``nm`` uses its fixed ratio 1.0; ``depth`` chooses 0 or 1.
    Returns None when no allowed structure applies to the module.
    """
    cands = [s for s in allowed if get_structure(s).applies_to(module)]
    if not cands:
        return None
    name = trial.suggest_categorical(f"{layer_name}.structure", cands) if len(cands) > 1 else cands[0]
    st = get_structure(name)
    params: Dict[str, Any] = {}
    for pname, choices in st.param_choices.items():
        choices = list(choices)
        if name == "mixed" and pname == "parts":
            choices = [c for c in choices if st.applies_with(module, {"parts": c})]
            if not choices:
                return None
        params[pname] = trial.suggest_categorical(f"{layer_name}.{name}.{pname}", choices)
    if name == "mixed":
        for part in st.parts(params):
            for pname, choices in get_structure(part).param_choices.items():
                params[f"{part}.{pname}"] = trial.suggest_categorical(f"{layer_name}.mixed.{part}.{pname}", list(choices))
    if st.fixed_ratio is not None:
        ratio = st.fixed_ratio
    elif name == "depth":
        ratio = trial.suggest_categorical(f"{layer_name}.depth.ratio", [0.0, 1.0])
    elif isinstance(ratios, dict):
        ratio = trial.suggest_float(f"{layer_name}.{name}.ratio", float(ratios["low"]), float(ratios["high"]),
                                    step=ratios.get("step"))
    else:
        ratio = trial.suggest_categorical(f"{layer_name}.{name}.ratio", [float(r) for r in ratios])
    return normalize_spec(layer_name, {"structure": name, "ratio": float(ratio), "params": params})
