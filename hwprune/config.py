"""Search spaces and device profiles: YAML files -> frozen dataclasses.

Every file is validated strictly: an unknown key or value is rejected with the file, the key path and the valid
choices, so a typo never silently becomes a default.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from hwprune.errors import ConfigError
from hwprune.latency.base import DeviceProfile, MeasureSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SEARCH_SPACE_DIR = "search_spaces"
PROFILE_DIR = "device_profiles"

IMPORTANCE_CRITERIA = ("l1", "l2", "bn_scale", "taylor", "random", "fisher")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class RecoveryBudget:
    """What every candidate (and the dense reference, for a fair comparison) gets after pruning."""

    bn_recalibration_batches: int = 10
    finetune_steps: int = 100
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    distill: bool = False
    distill_temperature: float = 4.0
    distill_alpha: float = 0.7  # weight of the distillation term; 1 - alpha on the hard labels
    # what distillation compares: "kl" on logits at distill_temperature, "cosine" (+ MSE) on embeddings. Unset in a
    # file, it follows the objective (cosine for the cosine objective, else kl). Unlabelled data always distils.
    distill_loss: Optional[str] = None
    # weight of layer-wise distillation (every block's output matched to the dense block's; 0: off) and the glob
    # patterns of the blocks (empty: the model's longest ModuleList, a transformer's layers); hwprune.hidden_distill
    distill_hidden: float = 0.0
    distill_hidden_layers: Tuple[str, ...] = ()
    # how the finetune_steps are spent (hwprune.recovery); several: the search chooses one per trial
    method: Tuple[str, ...] = ("finetune",)
    method_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> its hyperparameters


@dataclass(frozen=True)
class StructureChoices:
    """Per-layer structures beyond filter/channel pruning (the sparse-structure catalog), searched per layer."""

    layers: Tuple[str, ...] = ()  # glob patterns on module names of the layers that may take a structure
    allowed: Tuple[str, ...] = ()  # structure names offered (filtered by what the target profiles accelerate)
    ratios: Tuple[float, ...] = (0.0, 0.5, 0.75)
    explore_all: bool = False  # also offer structures no target accelerates (size-only goals)
    importance: str = "l1"  # l1 | l2 | block_mean | bn


@dataclass(frozen=True)
class SearchSpace:
    name: str
    prunable: Tuple[str, ...] = ("*",)  # glob patterns on module names (roots of dependency groups)
    ignore: Tuple[str, ...] = ()
    ratios: Tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    round_to: Optional[int] = 8
    importance: str = "l1"
    structures: StructureChoices = field(default_factory=StructureChoices)
    recovery: RecoveryBudget = field(default_factory=RecoveryBudget)
    objective: Optional[str] = None  # accuracy | agreement | cosine | kl (hwprune.fidelity); None: by the data
    description: str = ""
    source: Optional[str] = None

    def matches(self, module_name: str) -> bool:
        """Whether a module may be pruned: matched by a ``prunable`` pattern and by no ``ignore`` pattern."""
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.prunable) and not any(
            fnmatch.fnmatchcase(module_name, p) for p in self.ignore
        )

    def structure_layers(self, module_names: Sequence[str]) -> List[str]:
        """Layers that may take a per-layer structure from the catalog."""
        return [n for n in module_names if any(fnmatch.fnmatchcase(n, p) for p in self.structures.layers)]

    def check_patterns(self, module_names: Sequence[str], all_names: Optional[Sequence[str]] = None) -> None:
        """A pattern that matches no layer of the model is an error (it is almost always a typo). ``prunable`` and
        ``ignore`` match conv/linear layers (``module_names``); ``structures.layers`` any module (blocks too)."""
        checks = (("prunable", self.prunable, module_names), ("ignore", self.ignore, module_names),
                  ("structures.layers", self.structures.layers, all_names or module_names))
        for key, patterns, names in checks:
            for p in patterns:
                if not any(fnmatch.fnmatchcase(n, p) for n in names):
                    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                    raise ConfigError(
                        f"{self.source or self.name}: {key} pattern {p!r} matches no layer of the model; "
                        f"layers are: {shown}"
                    )


# ---------------------------------------------------------------------------------------------------------------
# Strict YAML reading helpers


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _check_keys(where: str, data: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r}; valid keys: {', '.join(allowed)}")


def _typed(where: str, value: Any, kind: type, *, minimum: Optional[float] = None, maximum: Optional[float] = None):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: {value!r} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: {value!r} is above the maximum {maximum}")
    return value


def arg_number(kind: type, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False):
    """An argparse ``type=`` for a number in a range (``low_open``: strictly above ``low``); NaN and infinities
    are refused. The CLI and the agent's command line take every numeric argument through this."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if low_open else 'at least'} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be at most {high:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _typed_section(where: str, section: Any, types: Mapping[str, Tuple[type, Any, Any]]) -> Dict[str, Any]:
    """A mapping whose every key is known and every value has its type and range (``types``: key -> kind, min, max)."""
    section = section or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {section!r}")
    _check_keys(where, section, types)
    out = {}
    for k, v in section.items():
        kind, lo, hi = types[k]
        out[k] = _typed(f"{where}.{k}", v, kind, minimum=lo, maximum=hi)
    return out


def _choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def _patterns(where: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of glob patterns on module names, got {value!r}")
    return tuple(value)


def resolve(ref: str, folder: str, what: str) -> Path:
    """A file given by path, or by stem in ./<folder>/ or in the project's own <folder>/."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    candidates = [Path.cwd() / folder, PROJECT_ROOT / folder]
    for base in candidates:
        for suffix in (".yaml", ".yml"):
            q = base / f"{ref}{suffix}"
            if q.is_file():
                return q
    known = sorted({q.stem for base in candidates if base.is_dir() for q in base.glob("*.y*ml")})
    raise ConfigError(
        f"{what} {ref!r} not found: give a path to a .yaml file or one of: {', '.join(known) or '(none found)'}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Search spaces

_SPACE_KEYS = ("description", "prunable", "ignore", "ratios", "round_to", "importance", "structures", "recovery",
               "objective")
_RECOVERY_TYPES = {
    "bn_recalibration_batches": (int, 0, None),
    "finetune_steps": (int, 0, None),
    "batch_size": (int, 1, None),
    "lr": (float, 0.0, None),
    "optimizer": (str, None, None),
    "weight_decay": (float, 0.0, None),
    "distill": (bool, None, None),
    "distill_temperature": (float, 1e-6, None),
    "distill_alpha": (float, 0.0, 1.0),
    "distill_loss": (str, None, None),
    "distill_hidden": (float, 0.0, None),
}


def parse_search_space(data: Mapping[str, Any], name: str, source: str) -> SearchSpace:
    _check_keys(source, data, _SPACE_KEYS)
    kw: Dict[str, Any] = {"name": name, "source": source}
    if "description" in data:
        kw["description"] = str(data["description"])
    if "prunable" in data:
        kw["prunable"] = _patterns(f"{source}: prunable", data["prunable"])
    if "ignore" in data:
        kw["ignore"] = _patterns(f"{source}: ignore", data["ignore"] or [])
    if "ratios" in data:
        ratios = data["ratios"]
        if not isinstance(ratios, list) or not ratios:
            raise ConfigError(f"{source}: ratios: expected a non-empty list of numbers in [0, 1), got {ratios!r}")
        vals = tuple(
            _typed(f"{source}: ratios[{i}]", r, float, minimum=0.0, maximum=0.99) for i, r in enumerate(ratios)
        )
        if len(set(vals)) != len(vals):
            raise ConfigError(f"{source}: ratios: {list(vals)} lists a value twice; list each ratio once")
        kw["ratios"] = tuple(sorted(vals))
    if "round_to" in data:
        rt = data["round_to"]
        kw["round_to"] = None if rt in (None, 1) else _typed(f"{source}: round_to", rt, int, minimum=1)
    if "importance" in data:
        kw["importance"] = _choice(f"{source}: importance", data["importance"], IMPORTANCE_CRITERIA)
    if "structures" in data:
        kw["structures"] = _parse_structures(data["structures"] or {}, source)
    if "recovery" in data:
        kw["recovery"] = _parse_recovery(data["recovery"], source)
    if "objective" in data:
        from hwprune.fidelity import OBJECTIVES

        kw["objective"] = _choice(f"{source}: objective", data["objective"], OBJECTIVES)
    return SearchSpace(**kw)


def _parse_recovery(section: Any, source: str) -> RecoveryBudget:
    """The recovery budget; ``method`` (a name or a list) and one optional section of hyperparameters per method."""
    from hwprune.recovery import get_method, method_names

    where = f"{source}: recovery"
    section = dict(section or {}) if isinstance(section, dict) else section
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {section!r}")
    methods = section.pop("method", "finetune")
    per_method = {name: section.pop(name) for name in method_names() if name in section}
    hidden_layers = section.pop("distill_hidden_layers", None)
    rkw = _typed_section(where, section, {**_RECOVERY_TYPES, "method": None, "distill_hidden_layers": None, **{m: None for m in method_names()}})
    if hidden_layers:
        rkw["distill_hidden_layers"] = _patterns(f"{where}.distill_hidden_layers", hidden_layers)
    if "optimizer" in rkw:
        _choice(f"{where}.optimizer", rkw["optimizer"], OPTIMIZERS)
    if "distill_loss" in rkw:
        from hwprune.fidelity import DISTILL_LOSSES

        _choice(f"{where}.distill_loss", rkw["distill_loss"], DISTILL_LOSSES)
    names = [methods] if isinstance(methods, str) else methods
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{where}.method: expected a method name or a list of them from: {', '.join(method_names())}")
    names = [_choice(f"{where}.method[{i}]", m, method_names()) for i, m in enumerate(names)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.method: {names} lists a method twice; list each method once")
    params = {}
    for name, sec in per_method.items():
        method = get_method(name)
        types = {k: v[:3] for k, v in method.param_types.items()}
        if not types:
            raise ConfigError(f"{where}.{name}: method {name!r} has no hyperparameters; remove the section")
        params[name] = _typed_section(f"{where}.{name}", sec, types)
        for k, valid in method.choices.items():
            if k in params[name]:
                _choice(f"{where}.{name}.{k}", params[name][k], valid)
    return RecoveryBudget(method=tuple(names), method_params=params, **rkw)


def _parse_structures(st: Any, source: str) -> StructureChoices:
    from hwprune.structures import structure_names

    where = f"{source}: structures"
    if not isinstance(st, dict):
        raise ConfigError(f"{where}: expected a mapping, got {st!r}")
    _check_keys(where, st, ("layers", "allowed", "ratios", "explore_all", "importance"))
    kw: Dict[str, Any] = {}
    if "layers" in st:
        kw["layers"] = _patterns(f"{where}.layers", st["layers"])
    # filter/channel are searched per dependency group (the top-level ratios); here only the per-layer catalog.
    names = [n for n in structure_names() if n not in ("filter", "channel")]
    allowed = st.get("allowed", [])
    if not isinstance(allowed, list) or not allowed:
        raise ConfigError(f"{where}.allowed: expected a non-empty list of structures from: {', '.join(names)}")
    kw["allowed"] = tuple(_choice(f"{where}.allowed[{i}]", a, names) for i, a in enumerate(allowed))
    if "ratios" in st:
        r = st["ratios"]
        if not isinstance(r, list) or not r:
            raise ConfigError(f"{where}.ratios: expected a non-empty list of numbers in [0, 1), got {r!r}")
        kw["ratios"] = tuple(sorted({_typed(f"{where}.ratios[{i}]", v, float, minimum=0.0, maximum=0.99)
                                     for i, v in enumerate(r)}))
    if "explore_all" in st:
        kw["explore_all"] = _typed(f"{where}.explore_all", st["explore_all"], bool)
    if "importance" in st:
        kw["importance"] = _choice(f"{where}.importance", st["importance"], ("l1", "l2", "block_mean", "bn"))
    if kw.get("allowed") and not kw.get("layers"):
        raise ConfigError(f"{where}.layers: give glob patterns of the layers that may take these structures")
    return StructureChoices(**kw)


def load_search_space(ref: str) -> SearchSpace:
    path = resolve(ref, SEARCH_SPACE_DIR, "search space")
    return parse_search_space(_read_yaml(path), name=path.stem, source=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Device profiles

_PROFILE_KEYS = ("name", "description", "backend", "batch_size", "sequence_length", "channel_multiple", "options",
                 "measure", "accelerates")


def parse_measure_settings(where: str, section: Any) -> MeasureSettings:
    """Measure settings from a mapping (a profile's ``measure:``, an agent request's ``settings``): the one
    validation in ``MeasureSettings.from_dict`` (typed, within limits; ConfigError with one line otherwise)."""
    return MeasureSettings.from_dict(section if section is not None else {}, where)


def parse_profile(data: Mapping[str, Any], name: str, source: str) -> DeviceProfile:
    from hwprune.latency.base import backend_names

    _check_keys(source, data, _PROFILE_KEYS)
    if "backend" not in data:
        raise ConfigError(f"{source}: missing key 'backend'; choose one of: {', '.join(backend_names())}")
    kw: Dict[str, Any] = {
        "name": str(data.get("name", name)),
        "backend": _choice(f"{source}: backend", data["backend"], backend_names()),
        "source": source,
    }
    if "batch_size" in data:
        kw["batch_size"] = _typed(f"{source}: batch_size", data["batch_size"], int, minimum=1)
    if "sequence_length" in data:  # token inputs whose length the input spec leaves to the profile
        kw["sequence_length"] = _typed(f"{source}: sequence_length", data["sequence_length"], int, minimum=1,
                                        maximum=65536)
    if "channel_multiple" in data:
        kw["channel_multiple"] = _typed(f"{source}: channel_multiple", data["channel_multiple"], int, minimum=1)
    if "options" in data:
        opts = data["options"] or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"{source}: options: expected a mapping, got {opts!r}")
        kw["options"] = dict(opts)
    if "measure" in data:
        kw["measure"] = MeasureSettings.from_dict(data["measure"] or {}, f"{source}: measure")
    if "accelerates" in data:
        acc = data["accelerates"] or []
        if not isinstance(acc, list) or not all(isinstance(a, str) for a in acc):
            raise ConfigError(f"{source}: accelerates: expected a list of structure names, got {acc!r}")
        kw["accelerates"] = tuple(acc)
    return DeviceProfile(**kw)


def load_profile(ref: str) -> DeviceProfile:
    path = resolve(ref, PROFILE_DIR, "device profile")
    return parse_profile(_read_yaml(path), name=path.stem, source=str(path))


def load_profiles(refs: Sequence[str]) -> List[DeviceProfile]:
    profiles = [load_profile(r) for r in refs]
    names = [p.name for p in profiles]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"device profiles {sorted(dup)} given twice; give each profile once")
    return profiles
