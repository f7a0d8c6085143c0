"""Writing a model out: ONNX (what devices run) and the PyTorch module (what users fine-tune further)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from hwprune.atomic import atomic_path
from hwprune.costs import positional
from hwprune.errors import ModelError
from hwprune.inputs import InputSpec
from hwprune.transformer_groups import no_mha_fastpath

OPSET = 17


def to_onnx(model: nn.Module, input_shape: "Sequence[int] | InputSpec", path: Path, batch: int = 1) -> Path:
    """Export with fixed input shapes: latency is measured at exactly those. ``input_shape`` is the one image
    input's shape (batch included; the input is named ``input``) or an InputSpec (one named input each, at
    ``batch``; int64 token inputs stay int64)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(input_shape, InputSpec):
        example = input_shape.example(batch)
        names = list(input_shape.names)
    else:
        example, names = torch.randn(*input_shape), ["input"]
    model, example = positional(model, example)  # keyword convention: through an adapter, in the spec's order
    args = example if isinstance(example, tuple) else (example,)
    try:
        with warnings.catch_warnings(), torch.no_grad(), atomic_path(path) as tmp, no_mha_fastpath():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), args, str(tmp), input_names=names, output_names=["output"],
                opset_version=OPSET, dynamo=False,
            )
    except Exception as e:
        raise ModelError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return path


def save_torch(model: nn.Module, path: Path) -> Path:
    """The whole pruned module (its shapes differ from the original class's defaults, so a state_dict alone is
    not enough); load with ``torch.load(path, weights_only=False)``."""
    import copy

    from hwprune.structures.masks import strip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(strip(copy.deepcopy(model)), tmp)  # plain weights (the zeros are in them), no mask buffers
    return path
