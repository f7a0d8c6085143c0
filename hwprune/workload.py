"""A workload binds what a command works on: the dense model, its data, its input shape, and the search space's
view of it (which dependency groups may be pruned, which layers never lose outputs)."""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hwprune import graph, transformer_groups
from hwprune.config import SearchSpace, load_search_space
from hwprune.data import DataBundle, load_dataset
from hwprune.errors import ModelError
from hwprune.models import check_input, load_model, load_or_train_demo, output_layer_names
from hwprune.plan import PruningPlan


@dataclass
class Workload:
    model_ref: str
    model: nn.Module  # the dense reference, in eval mode; never modified
    data: Optional[DataBundle]
    space: SearchSpace
    input_shape: Tuple[int, ...]  # one sample (C, H, W)
    groups: List[graph.PrunableGroup]  # the groups the space lets the search prune
    ignored: List[str]  # modules whose outputs are never removed (classifier + the space's ignore patterns)
    structure_layers: List[str] = field(default_factory=list)  # layers that may take a catalog structure
    weights: Optional[str] = None
    data_ref: str = "none"
    image_size: Optional[int] = None  # images resized to this (stored in the study: export rebuilds alike)
    extra: Dict[str, object] = field(default_factory=dict)
    channel_multiple: int = 1  # what the target profiles need kept channel counts to be multiples of

    @property
    def round_to(self) -> Optional[int]:
        """Kept channel counts are multiples of this: the space's ``round_to`` and the profiles' multiple."""
        return combined_round_to(self.space.round_to, [self.channel_multiple])

    def for_profiles(self, profiles: Iterable) -> "Workload":
        """This workload as searched for ``profiles``: channel counts rounded to every profile's
        ``channel_multiple`` too (fp16 tensor cores want multiples of 8, say)."""
        multiple = combined_round_to(self.channel_multiple, [getattr(p, "channel_multiple", 1) for p in profiles])
        return dataclasses.replace(self, channel_multiple=multiple or 1)

    @property
    def example_input(self) -> torch.Tensor:
        return torch.randn(1, *self.input_shape, generator=torch.Generator().manual_seed(0))

    def plan(self, ratios: Dict[str, float]) -> PruningPlan:
        return PruningPlan(
            ratios={g.name: float(ratios.get(g.name, 0.0)) for g in self.groups},
            criterion=self.space.importance,
            round_to=self.round_to,
            ignored=list(self.ignored),
            structure_importance=self.space.structures.importance,
        )

    def uniform_plan(self, ratio: float) -> PruningPlan:
        return self.plan({g.name: ratio for g in self.groups})

    def dense_plan(self) -> PruningPlan:
        return self.uniform_plan(0.0)

    def calibration_batch(self, batch_size: int = 64) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if self.data is None:
            return None
        return next(iter(self.data.loader("train", batch_size, shuffle=True, seed=0)))


def combined_round_to(round_to: Optional[int], multiples: Iterable[int]) -> Optional[int]:
    """The least common multiple of a ``round_to`` and channel multiples (None or 1 = no rounding); None when
    nothing needs rounding."""
    r = math.lcm(int(round_to or 1), *(int(m or 1) for m in multiples))
    return None if r == 1 else r


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(v <= 0 for v in shape):
        raise ModelError(f"input shape {text!r} is not valid; write C,H,W such as 3,224,224")
    return shape


def build_workload(
    model_ref: str,
    data_ref: str = "mnist-5k",
    space: "SearchSpace | str" = "demo",
    weights: Optional[str] = None,
    input_shape: Optional[Sequence[int]] = None,
    run_dir: Optional[Path] = None,
    seed: int = 0,
    image_size: Optional[int] = None,
    log: Callable[[str], None] = print,
    trust_pickle: bool = False,
) -> Workload:
    """Load model and data, check they fit, and resolve which groups the space may prune."""
    if isinstance(space, str):
        space = load_search_space(space)
    if data_ref == "none" and model_ref == "demo":
        data_ref = "mnist-5k"  # the demo model needs its data to be trained
    data = load_dataset(data_ref, seed=seed, image_size=image_size)
    if data is not None:
        if input_shape is not None and tuple(input_shape) != tuple(data.input_shape):
            raise ModelError(
                f"--input-shape {tuple(input_shape)} differs from the shape of data {data.name!r} "
                f"{tuple(data.input_shape)}; drop --input-shape or use matching data"
            )
        input_shape = data.input_shape
    elif input_shape is None:
        input_shape = (3, 224, 224)
    input_shape = tuple(int(v) for v in input_shape)

    if model_ref == "demo":
        if weights:
            model = load_model("demo", weights=weights, num_classes=data.num_classes, in_channels=input_shape[0])
        else:
            cache = Path(run_dir or ".") / "demo_model.pt"
            model = load_or_train_demo(cache, data, seed=seed, log=log)
    else:
        model = load_model(model_ref, weights=weights, num_classes=data.num_classes if data else None,
                           trust_pickle=trust_pickle)
    model.eval()
    what = f"data {data.name!r}" if data is not None else "--input-shape"
    example = check_input(model, input_shape, what)
    with torch.no_grad():
        num_outputs = model(example).shape[1]
    if data is not None and num_outputs != data.num_classes:
        raise ModelError(
            f"the model has {num_outputs} outputs but data {data.name!r} has {data.num_classes} classes; "
            f"use a model built for {data.num_classes} classes"
        )

    layer_names = [n for n, m in model.named_modules() if isinstance(m, graph.ROOT_TYPES)]
    all_names = [n for n, _ in model.named_modules() if n]
    ignored = list(output_layer_names(model, num_outputs))
    ignored += [n for n in layer_names if any(fnmatch.fnmatchcase(n, p) for p in space.ignore) and n not in ignored]
    if not transformer_groups.needs_channel_groups(space.prunable):  # heads:/depth: only: no channel tracing
        channel_groups = []
    else:
        channel_groups = graph.list_groups(model, example, ignored)
    structure_groups = _transformer_groups(model, example, space, channel_groups)
    space.check_patterns(layer_names + [g.name for g in structure_groups], all_names)
    groups = transformer_groups.select(space, channel_groups, structure_groups)
    if not groups:
        raise ModelError(
            f"search space {space.name!r} leaves no prunable group in model {model_ref!r}; widen 'prunable' or "
            f"narrow 'ignore'"
        )
    structure_layers = space.structure_layers(all_names)
    return Workload(model_ref, model, data, space, input_shape, groups, ignored, structure_layers, weights, data_ref,
                    image_size=image_size)


def _transformer_groups(model: nn.Module, example, space: SearchSpace,
                        channel_groups: List[graph.PrunableGroup]) -> List[graph.PrunableGroup]:
    """Heads, MLP widths and block lists (``heads:``/``mlp:``/``depth:`` groups), discovered only when the space
    names one of these kinds: other spaces and models pay nothing for them."""
    if not any(":" in p for p in (*space.prunable, *space.ignore)):
        return []
    return transformer_groups.list_groups(model, example, channel_groups)
