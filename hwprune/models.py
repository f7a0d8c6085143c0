"""Model references and the built-in demo model.

References accepted by ``--model``:
  demo                         a small residual CNN for digits, trained once on the demo data, cached in the run dir
  torchvision:NAME             a torchvision classification model (random init; ``--weights FILE`` loads a state_dict)
  path/to/model.pt             a whole model saved with ``torch.save(model)``
  package.module:factory       a callable returning an nn.Module (``--weights`` applies here too)
  hf:DIR                       a Hugging Face model saved in DIR (config.json + weights; see hwprune/hf_models.py)
  hf-package:PKG               the Hugging Face model directory shipped inside the installed Python package PKG
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune.atomic import atomic_path
from hwprune.errors import ModelError

MODEL_CHOICES = ("demo, torchvision:NAME, FILE.pt (torch.save of a whole model), package.module:factory, hf:DIR, "
                 "hf-package:PKG")


class DemoBlock(nn.Module):
    """A ResNet basic block: two 3x3 convs with a shortcut (1x1 conv where the shape changes)."""

    hwprune_residual = "resnet"  # torchvision BasicBlock's form: depth pruning may replace it by its shortcut

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class DemoNet(nn.Module):
    """Residual CNN for 1-channel digit images (any size >= 8x8): ~180 M MACs at 28x28, so that ONNX Runtime
    latency at batch 1 is a clearly measurable millisecond or so, and pruning has something to win."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: Sequence[int] = (48, 96, 192)):
        super().__init__()
        w0, w1, w2 = widths
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
        self.layer1 = nn.Sequential(DemoBlock(w0, w0), DemoBlock(w0, w0))
        self.layer2 = nn.Sequential(DemoBlock(w0, w1, 2), DemoBlock(w1, w1))
        self.layer3 = nn.Sequential(DemoBlock(w1, w2, 2), DemoBlock(w2, w2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _load_failure(e: Exception) -> str:
    """One line on why torch.load failed: torch's weights-only errors are many lines of advice around the cause."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        cause = " ".join(text.split(marker, 1)[1].split("\n\n")[:2]).split(". Please")[0]
        text = " ".join(cause.split())
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _load_state_dict(model: nn.Module, weights: str) -> None:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {weights!r} does not exist; give the path of a saved state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        reason = _load_failure(e)
        if "Unsupported global" in reason:
            raise ModelError(
                f"weights file {weights!r} holds pickled Python objects, not a plain state_dict ({reason}); "
                f"a whole model saved with torch.save(model) is passed as --model FILE.pt instead"
            ) from e
        raise ModelError(f"weights file {weights!r} is not a readable state_dict ({reason})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {weights!r} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ModelError(f"weights file {weights!r} does not fit the model: {detail}") from e


def _torchvision_model(name: str, num_classes: Optional[int]) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [a for a in available if name.lower()[:4] in a][:8]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown torchvision classification model {name!r}{hint}")
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return torchvision.models.get_model(name, **kwargs)


def _factory_model(ref: str) -> nn.Module:
    module_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"model factory {ref!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise ModelError(f"model factory {ref!r}: module {module_name!r} has no callable {attr!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelError(f"model factory {ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


TRUST_FLAG = "--trust-pickle"


def _file_model(ref: str, trust_pickle: bool = False) -> nn.Module:
    """A whole module saved with torch.save(model). Unpickling it runs whatever code the file names, so it is
    read as plain data first and unpickled only with the user's explicit ``trust_pickle``."""
    path = Path(ref).expanduser()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = _load_failure(e)
        if "Unsupported global" not in reason:
            raise ModelError(f"model file {ref!r} is not readable with torch.load ({reason})") from e
        if not trust_pickle:
            raise ModelError(
                f"model file {ref!r} is a pickled Python object: loading it runs code named in the file; pass "
                f"{TRUST_FLAG} if you trust where it came from, or give the architecture as package.module:factory "
                f"or torchvision:NAME with --weights STATE_DICT (read as plain data)"
            ) from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ModelError(f"model file {ref!r} is not readable with torch.load ({_load_failure(e2)})") from e2
    if isinstance(obj, dict):
        raise ModelError(
            f"model file {ref!r} holds a state_dict, not a whole model; pass the architecture as --model "
            f"(torchvision:NAME or package.module:factory) and this file as --weights"
        )
    if not isinstance(obj, nn.Module):
        raise ModelError(f"model file {ref!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def load_model(
    ref: str, weights: Optional[str] = None, num_classes: Optional[int] = None, in_channels: int = 1,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the model a ``--model`` reference names (the demo is returned untrained; see ``prepare_demo``).
    A pickled model file is unpickled only with ``trust_pickle`` (``--trust-pickle``); weights are plain data."""
    from hwprune.hf_models import is_hf_ref, load_hf_model

    if is_hf_ref(ref):
        if weights:
            raise ModelError("--weights applies to torchvision:NAME and package.module:factory; an hf: model "
                             "directory holds its own weights")
        return load_hf_model(ref)
    if ref == "demo":
        model = DemoNet(in_channels=in_channels, num_classes=num_classes or 10)
    elif ref.startswith("torchvision:"):
        model = _torchvision_model(ref.split(":", 1)[1], num_classes)
    elif ref.endswith((".pt", ".pth", ".pkl")) or os.sep in ref or Path(ref).is_file():
        if not Path(ref).expanduser().is_file():
            raise ModelError(f"model file {ref!r} does not exist")
        if weights:
            raise ModelError("--weights applies to torchvision:NAME and package.module:factory, not to a model file")
        model = _file_model(ref, trust_pickle)
    elif ":" in ref:
        model = _factory_model(ref)
    else:
        raise ModelError(f"unknown model {ref!r}; choose one of: {MODEL_CHOICES}")
    if weights:
        _load_state_dict(model, weights)
    return model.eval()


def check_input(model: nn.Module, inputs: "InputSpec | Sequence[int]", what: str):
    """Run one example (batch 1) through the model; an input that does not fit gets a one-line ModelError.
    The output must be one tensor [batch, N]: classifier logits, or an encoder's embedding. Returns the example."""
    from hwprune.inputs import InputSpec, call_model

    spec = inputs if isinstance(inputs, InputSpec) else InputSpec.image(inputs)
    x = spec.example(1)
    described = tuple(x.shape) if spec.is_image else spec.describe(1)
    fix = "pass --input-shape C,H,W that fits the model, or data that does" if spec.is_image else \
        "pass --inputs that fit the model (names, dtypes, sequence length)"
    try:
        with torch.no_grad():
            y = call_model(model.eval(), x)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"the model does not accept input of shape {described} from {what} ({msg}); {fix}") from e
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ModelError(
            f"the model's output for input {described} is {type(y).__name__} "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else ''}; hwprune expects one tensor [batch, N]: "
            f"classifier logits or an embedding"
        )
    return x


def output_layer_names(model: nn.Module, num_outputs: int) -> Tuple[str, ...]:
    """The classifier layer(s) whose outputs are the model's outputs: never pruned on the output side."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == num_outputs:
            last = name
        elif isinstance(m, nn.Conv2d) and m.out_channels == num_outputs:
            last = name
    return (last,) if last is not None else ()


def load_or_train_demo(cache_path: Path, data, epochs: int = 3, seed: int = 0, log=print) -> nn.Module:
    """The demo model trained once on ``data``'s training split and cached at ``cache_path``.

    The cache is keyed by the data name and written atomically, so parallel search workers share one copy.
    """
    from hwprune.recover import evaluate, train

    torch.manual_seed(seed)
    model = DemoNet(in_channels=data.input_shape[0], num_classes=data.num_classes)
    cache_path = Path(cache_path)
    if cache_path.is_file():
        blob = torch.load(cache_path, map_location="cpu", weights_only=True)
        if blob.get("data") == data.name:
            model.load_state_dict(blob["state_dict"])
            return model.eval()
    steps_per_epoch = math.ceil(len(data.train) / 64)
    log(f"training the demo model on {data.name} ({epochs} epochs, {steps_per_epoch * epochs} steps); cached for later runs")
    train(model, data, steps=steps_per_epoch * epochs, lr=0.05, batch_size=64, seed=seed)
    acc = evaluate(model, data)
    log(f"demo model: validation accuracy {acc:.4f}")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_path) as tmp:
        torch.save({"data": data.name, "state_dict": model.state_dict(), "val_accuracy": acc, "epochs": epochs}, tmp)
    return model.eval()
