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
from hwprune.export import to_onnx
from hwprune.hf_models import default_input_spec, hf_model_dir, is_hf_ref, vocab_size
from hwprune.inputs import DEFAULT_SEQUENCE_LENGTH, InputSpec, call_model, measured_inputs
from hwprune.models import check_input, load_model, load_or_train_demo, output_layer_names
from hwprune.plan import PruningPlan, apply_plan


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
    objective: str = "accuracy"  # what candidates are scored by (hwprune.fidelity.OBJECTIVES)
    # what the model takes (hwprune/inputs.py); None: the one image input of ``input_shape``
    inputs: Optional[InputSpec] = None
    # token inputs whose length neither the spec nor a profile fixes are exported and counted at this length
    # (the first target profile's, set by ``for_profiles``; DEFAULT_SEQUENCE_LENGTH until then)
    sequence_length: Optional[int] = None

    def __post_init__(self):
        if self.inputs is None:
            self.inputs = InputSpec.image(self.input_shape)

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        """The directory of an hf: / hf-package: model (its tokenizer's files are there); None for other models."""
        return hf_model_dir(self.model_ref) if is_hf_ref(self.model_ref) else None

    @property
    def resolved_inputs(self) -> InputSpec:
        """The inputs at the sequence length exported models have (the spec's, the profile's after
        ``for_profiles``, else the default)."""
        if self.inputs.sequence_length is not None:
            return self.inputs
        return self.inputs.with_sequence_length(self.sequence_length or DEFAULT_SEQUENCE_LENGTH)

    def latency_inputs(self, profile) -> object:
        """What latency backends and the worker are handed for ``profile`` (see ``hwprune.inputs.measured_inputs``)."""
        return measured_inputs(self.inputs, profile)

    def export_onnx(self, model: nn.Module, path: Path, batch: int = 1, profile=None) -> Path:
        """``model`` exported at ``batch`` with this workload's inputs (at ``profile``'s sequence length if given)."""
        if self.inputs.is_image:
            return to_onnx(model, (batch, *self.input_shape), path)
        spec = self.inputs.for_profile(profile) if profile is not None else self.resolved_inputs
        return to_onnx(model, spec, path, batch=batch)

    @property
    def round_to(self) -> Optional[int]:
        """Kept channel counts are multiples of this: the space's ``round_to`` and the profiles' multiple."""
        return combined_round_to(self.space.round_to, [self.channel_multiple])

    def for_profiles(self, profiles: Iterable) -> "Workload":
        """This workload as searched for ``profiles``: channel counts rounded to every profile's
        ``channel_multiple`` too (fp16 tensor cores want multiples of 8, say)."""
        profiles = list(profiles)
        multiple = combined_round_to(self.channel_multiple, [getattr(p, "channel_multiple", 1) for p in profiles])
        # token inputs whose length the spec leaves open: MACs, pruning and exports at the first profile's length
        seq = getattr(profiles[0], "sequence_length", None) if profiles else None
        return dataclasses.replace(self, channel_multiple=multiple or 1).with_sequence_length(seq)

    def with_sequence_length(self, sequence_length: Optional[int]) -> "Workload":
        """This workload with open token sequence lengths set to ``sequence_length`` (None: unchanged)."""
        if sequence_length is None or self.inputs.is_image:
            return self
        out = dataclasses.replace(self, sequence_length=int(sequence_length))
        resolved = out.resolved_inputs
        out.input_shape = resolved.fields[0].sample_shape(resolved.sequence_length)
        return out

    @property
    def example_input(self):
        """Batch-1 example: one tensor for the image input (as always), a tuple / dict of named inputs otherwise."""
        return self.resolved_inputs.example(1)

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

    def importance_scores(self) -> Optional[Dict[str, torch.Tensor]]:
        """Data-driven scores of the heads / MLP neurons for the ``fisher`` criterion (computed once on the training
        split, then reused by every plan); None for other criteria, and without data (magnitude then: a search
        without data ranks plans by the MACs they keep, which the choice of units does not change)."""
        if self.space.importance != "fisher" or self.data is None:
            return None
        from hwprune import fisher

        return fisher.cached_mask_fisher(self.model, [g.name for g in self.groups], self.data, self.objective,
                                         readers=fisher.mlp_readers(self.groups))

    def apply(self, plan: PruningPlan):
        """``apply_plan`` with what the plan's criterion needs from this workload (a calibration batch for
        taylor, the data-driven scores for fisher): the pruned model, the plan with its record, the reports."""
        calibration = self.calibration_batch() if plan.criterion == "taylor" else None
        scores = self.importance_scores() if plan.criterion == "fisher" else None
        return apply_plan(self.model, plan, self.example_input, calibration, scores)


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
    inputs: "InputSpec | str | dict | None" = None,
    objective: Optional[str] = None,
) -> Workload:
    """Load model and data, check they fit, and resolve which groups the space may prune. ``inputs`` (an
    InputSpec or its text form) names what the model takes; by default one image tensor (or, for an hf: model,
    its token ids and attention mask). ``objective`` (else the space's ``objective``, else accuracy with labels
    and a fidelity objective without) is what trials are scored by (hwprune.fidelity)."""
    if isinstance(inputs, str):
        inputs = InputSpec.parse(inputs)
    elif isinstance(inputs, dict):  # as a study stores it
        inputs = InputSpec.from_dict(inputs)
    if inputs is not None and inputs.is_image:
        if input_shape is not None and tuple(input_shape) != inputs.fields[0].shape:
            raise ModelError(f"--inputs {inputs.to_text()!r} and --input-shape {tuple(input_shape)} disagree; give one")
        input_shape, inputs = inputs.fields[0].shape, None  # the default image input: the old path, unchanged
    if isinstance(space, str):
        space = load_search_space(space)
    if data_ref == "none" and model_ref == "demo":
        data_ref = "mnist-5k"  # the demo model needs its data to be trained
    # text:FILE is tokenized by the model's own tokenizer (the hf: / hf-package: model's directory), at the
    # sequence length --inputs fixes (else the default length, which the exported models then keep)
    tokenizer_dir = str(hf_model_dir(model_ref)) if is_hf_ref(model_ref) else None
    text_length = (inputs.sequence_length if inputs is not None else None) or DEFAULT_SEQUENCE_LENGTH
    data = load_dataset(data_ref, seed=seed, image_size=image_size, tokenizer_dir=tokenizer_dir, seq_len=text_length)
    token_data = data is not None and isinstance(data.val[0][0], dict)  # text: dicts of named token tensors
    if token_data and inputs is None and not is_hf_ref(model_ref):
        raise ModelError(f"data {data.name!r} holds token ids; give a model that takes them (--model hf:DIR or "
                         f"hf-package:PKG, or --inputs input_ids:int64,attention_mask:int64)")
    if data is not None and not token_data:
        if input_shape is not None and tuple(input_shape) != tuple(data.input_shape):
            raise ModelError(
                f"--input-shape {tuple(input_shape)} differs from the shape of data {data.name!r} "
                f"{tuple(data.input_shape)}; drop --input-shape or use matching data"
            )
        input_shape = data.input_shape
    elif input_shape is None:
        input_shape = (3, 224, 224)
    input_shape = tuple(int(v) for v in input_shape)

    if model_ref == "demo" and data is not None and not data.labeled and not weights:
        raise ModelError(f"the demo model is trained on labelled data, and data {data.name!r} has none; give "
                         f"--weights of a trained demo model or bring your own --model")
    classes = data.num_classes if data is not None and data.labeled else None  # unlabelled: the model's own
    if model_ref == "demo":
        if weights:
            model = load_model("demo", weights=weights, num_classes=classes, in_channels=input_shape[0])
        else:
            cache = Path(run_dir or ".") / "demo_model.pt"
            model = load_or_train_demo(cache, data, seed=seed, log=log)
    else:
        model = load_model(model_ref, weights=weights, num_classes=classes,
                           trust_pickle=trust_pickle)
    model.eval()
    if inputs is None and is_hf_ref(model_ref):
        inputs = default_input_spec(model)
    if inputs is not None:
        if data is not None and not token_data:
            raise ModelError(f"the model takes {inputs.to_text()} (--inputs), but data {data.name!r} feeds one "
                             f"image tensor; use --data none or text:FILE with named (token) inputs")
        if token_data:
            fed = tuple(data.val[0][0])
            if set(inputs.names) - set(fed):
                raise ModelError(f"the model takes {', '.join(inputs.names)}, but data {data.name!r} gives "
                                 f"{', '.join(fed)}; fix --inputs")
            inputs = inputs.with_sequence_length(text_length)  # the length the texts were tokenized to
        if hasattr(model, "set_input_names"):  # an hf: model takes its inputs in the spec's order
            model.set_input_names(inputs.names)
        inputs = inputs.with_vocab(vocab_size(model))
        input_shape = inputs.fields[0].sample_shape(inputs.sequence_length)
    spec = inputs if inputs is not None else InputSpec.image(input_shape)
    what = f"data {data.name!r}" if data is not None else ("--inputs" if inputs is not None else "--input-shape")
    example = check_input(model, spec, what)
    with torch.no_grad():
        output_shape = tuple(call_model(model, example).shape)
    num_outputs = output_shape[1]
    space, objective = _with_objective(space, objective, data, output_shape)
    if data is not None and data.labeled and num_outputs != data.num_classes:
        raise ModelError(
            f"the model has {num_outputs} outputs but data {data.name!r} has {data.num_classes} classes; "
            f"use a model built for {data.num_classes} classes"
        )

    layer_names = [n for n, m in model.named_modules() if isinstance(m, graph.ROOT_TYPES)]
    all_names = [n for n, _ in model.named_modules() if n]
    # The outputs (classifier logits, or an encoder's embedding) are never pruned: the layer producing them is
    # ignored on its output side, which also keeps every group coupled to it (an encoder's hidden size) whole.
    if hasattr(model, "embedding_layers"):
        ignored = list(model.embedding_layers(example))
    else:
        ignored = list(output_layer_names(model, num_outputs))
    ignored += [n for n in layer_names if any(fnmatch.fnmatchcase(n, p) for p in space.ignore) and n not in ignored]
    if not transformer_groups.needs_channel_groups(space.prunable):  # heads:/depth: only: no channel tracing
        channel_groups = []
    else:
        channel_groups = graph.list_groups(model, example, ignored)
    if hasattr(model, "head_coupled_layers"):  # attention heads are pruned whole, never as loose channels
        heads = set(model.head_coupled_layers())
        loose = [g.name for g in channel_groups if heads.intersection(g.members) and space.matches(g.name)]
        if loose:
            log(f"{len(loose)} channel groups on attention projections left out (query/key/value channels are "
                f"split into heads)")
        channel_groups = [g for g in channel_groups if g.name not in loose]
    # transformer groups (attention heads, MLP width, depth) join the channel groups: transformer_groups.py
    structure_groups = _transformer_groups(model, example, space, channel_groups)
    space.check_patterns(layer_names + [g.name for g in structure_groups], all_names)
    groups = transformer_groups.select(space, channel_groups, structure_groups)
    _report_auto_ignored(graph.auto_ignored(model), ignored, log)
    if not groups:
        raise ModelError(
            f"search space {space.name!r} leaves no prunable group in model {model_ref!r}; widen 'prunable' or "
            f"narrow 'ignore'"
        )
    structure_layers = space.structure_layers(all_names)
    return Workload(model_ref, model, data, space, tuple(input_shape), groups, ignored, structure_layers, weights,
                    data_ref, image_size=image_size, inputs=inputs, objective=objective)


def _with_objective(space: SearchSpace, requested: Optional[str], data: Optional[DataBundle], output_shape):
    """(the space with its distillation loss fitted to the objective, the objective)."""
    from hwprune.errors import ConfigError
    from hwprune.fidelity import resolve_objective

    objective = resolve_objective(requested or space.objective, None if data is None else data.labeled, output_shape)
    if data is not None and not data.labeled and space.importance == "taylor":
        raise ConfigError(f"search space {space.name!r} ranks channels by 'taylor', which needs labels, and data "
                          f"{data.name!r} has none; use importance l1 or l2")
    if space.recovery.distill_loss is None:
        loss = "cosine" if objective == "cosine" else "kl"
        space = dataclasses.replace(space, recovery=dataclasses.replace(space.recovery, distill_loss=loss))
    return space, objective


def _report_auto_ignored(reasons: Dict[str, str], ignored: Sequence[str], log: Callable[[str], None]) -> None:
    """hwprune/adapters keep some layers' widths (never a silent skip): say how many and why."""
    by_reason: Dict[str, int] = {}
    for name, reason in reasons.items():
        if name not in ignored:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    for reason, count in by_reason.items():
        log(f"{count} layers kept automatically (their output width is not pruned): {reason}")


def _transformer_groups(model: nn.Module, example, space: SearchSpace,
                        channel_groups: List[graph.PrunableGroup]) -> List[graph.PrunableGroup]:
    """Heads, MLP widths and block lists (``heads:``/``mlp:``/``depth:`` groups), discovered only when the space
    names one of these kinds: other spaces and models pay nothing for them."""
    if not any(":" in p for p in (*space.prunable, *space.ignore)):
        return []
    return transformer_groups.list_groups(model, example, channel_groups)
