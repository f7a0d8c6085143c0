"""Label-free quality: how closely a pruned model reproduces the dense model on held-out inputs.

Objectives a search can maximise (``objective:`` in a search space, ``--objective`` on the command line):
  accuracy    top-1 accuracy on the labelled validation split (needs labels)
  agreement   fraction of held-out inputs whose top-1 class equals the dense model's (classifier logits)
  cosine      mean cosine similarity of the outputs to the dense model's (embeddings; any output)
  kl          KL(dense || pruned) of the softmax (T = 1) of the logits, averaged over inputs; lower is better.
              The search maximises ``exp_neg_kl`` = exp(-kl), a monotone map of it into (0, 1] (the Pareto front
              is the same as minimising kl); both columns are reported.

Every figure is computed on the held-out split only. The dense model is the reference, so by definition the
untouched dense model scores agreement 1.0, cosine 1.0 and kl 0 (exp_neg_kl 1.0); the dense *trial* still gets the
same recovery budget as every candidate (the fairness rule) and reports what it measures after it.

The dense model's outputs are computed once per (model, held-out split) and kept in memory; with a run directory
they are also written there (``dense_outputs.pt``, when under ``DISK_CACHE_BYTES``) so resumes and later commands
reuse them. Outputs of shape [batch, tokens, dim] (token embeddings) are mean-pooled over the tokens the attention
mask keeps (sentence-transformers' pooling) into one embedding per input before any comparison.
"""
from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune.errors import ConfigError, DataError
from hwprune.inputs import call_model

OBJECTIVES = ("accuracy", "agreement", "cosine", "kl")
FIDELITY_OBJECTIVES = OBJECTIVES[1:]
# The column each objective is optimised (maximised) as, and the worst value it can take (given to trials that are
# never trained: over the latency budget). exp(-kl) is 0 at kl = infinity.
OBJECTIVE_COLUMN = {"accuracy": "accuracy", "agreement": "agreement", "cosine": "cosine", "kl": "exp_neg_kl"}
WORST = {"accuracy": 0.0, "agreement": 0.0, "cosine": -1.0, "exp_neg_kl": 0.0}
QUALITY_COLUMNS = ("accuracy", "agreement", "cosine", "kl", "exp_neg_kl")
LABELS = {"accuracy": "validation accuracy", "agreement": "top-1 agreement with dense (held-out)",
          "cosine": "cosine similarity to dense (held-out)", "exp_neg_kl": "exp(-KL(dense || pruned)) (held-out)"}
DISK_CACHE_BYTES = 256 * 2**20
EVAL_BATCH = 256
# token batches are cut to their own longest text (data.trimmed_collate): smaller batches cut more padding
# (MiniLM on 600 docstring sentences: 15.5 s at 256, 8.4 s at 16; 24.8 s at 256 before cutting)
EVAL_BATCH_TOKENS = 16


# ------------------------------------------------------------------------------------------ calling a model

# The model on one batch: a tensor, a dict of named inputs (token models: input_ids, attention_mask) or a tuple
forward = call_model


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: the tensor itself, ``logits``, or ``last_hidden_state`` /
    ``pooler_output`` / the first element of a Hugging Face output or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "sentence_embedding", "last_hidden_state", "pooler_output"):
        value = out.get(key) if isinstance(out, dict) or hasattr(out, "get") else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"cannot compare model outputs of type {type(out).__name__}; the model should return a tensor, "
                    f"logits or last_hidden_state")


def attention_mask(x: Any) -> Optional[torch.Tensor]:
    return x.get("attention_mask") if isinstance(x, dict) else None


def pooled(out: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[batch, tokens, dim] -> [batch, dim] by the mean over kept tokens; [batch, ...] -> [batch, features]."""
    if out.dim() == 3:
        if mask is None:
            return out.mean(1)
        m = mask.to(out.dtype).unsqueeze(-1)
        return (out * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return out.reshape(out.shape[0], -1)


def comparable(out: Any, x: Any) -> torch.Tensor:
    """One vector per input, as compared with the dense model's."""
    return pooled(primary_output(out), attention_mask(x)).float()


# ------------------------------------------------------------------------------------------ the metrics

def top1_agreement(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the dense model's."""
    return (dense_logits.argmax(1) == logits.argmax(1)).float().mean().item()


def mean_cosine(dense: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of each row to the dense model's."""
    return F.cosine_similarity(out.float(), dense.float(), dim=1, eps=1e-8).mean().item()


def kl_divergence(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(dense) || softmax(pruned)) at temperature 1, in nats."""
    return F.kl_div(F.log_softmax(logits.float(), 1), F.log_softmax(dense_logits.float(), 1), log_target=True,
                    reduction="batchmean").clamp_min(0.0).item()


def fidelity_figures(dense: torch.Tensor, out: torch.Tensor, classifier: bool) -> Dict[str, float]:
    """Every fidelity figure that applies: cosine always; agreement, kl and exp_neg_kl for classifier logits."""
    figs = {"cosine": mean_cosine(dense, out)}
    if classifier:
        kl = kl_divergence(dense, out)
        figs.update(agreement=top1_agreement(dense, out), kl=kl, exp_neg_kl=math.exp(-kl))
    return figs


# ------------------------------------------------------------------------------------------ the dense reference

@dataclass
class DenseOutputs:
    outputs: torch.Tensor  # one comparable vector per held-out input, in loader order
    key: str


_MEMORY: "weakref.WeakKeyDictionary[nn.Module, Dict[str, DenseOutputs]]" = weakref.WeakKeyDictionary()
_KEYS: "weakref.WeakKeyDictionary[nn.Module, Dict[int, tuple]]" = weakref.WeakKeyDictionary()


def _heldout_key(model: nn.Module, data) -> str:
    """Identifies the dense model's weights and the held-out split (name, size, first and last inputs)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(f"{data.name}|{len(data.val)}".encode())
    for i in {0, len(data.val) - 1}:
        x = data.val[i][0]
        for t in (x.values() if isinstance(x, dict) else [x]):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def outputs_on_heldout(model: nn.Module, data, batch_size: Optional[int] = None) -> torch.Tensor:
    model.eval()
    if batch_size is None:
        batch_size = EVAL_BATCH_TOKENS if len(data.val) and isinstance(data.val[0][0], dict) else EVAL_BATCH
    return torch.cat([comparable(forward(model, x), x) for x, _ in data.loader("val", batch_size)])


def dense_outputs(dense: nn.Module, data, cache_dir: Optional[Path] = None) -> DenseOutputs:
    """The dense model's held-out outputs: from memory, else the run directory's ``dense_outputs.pt`` when its
    key matches, else computed (and written there when small enough)."""
    known = _KEYS.setdefault(dense, {})
    if id(data.val) not in known:  # hashing the weights once per (model, split), not once per trial
        known[id(data.val)] = (data.val, _heldout_key(dense, data))  # the split is held so its id stays its own
    key = known[id(data.val)][1]
    per_model = _MEMORY.setdefault(dense, {})
    if key in per_model:
        return per_model[key]
    path = Path(cache_dir) / "dense_outputs.pt" if cache_dir is not None else None
    ref = None
    if path is not None and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("key") == key:
            ref = DenseOutputs(stored["outputs"], key)
    if ref is None:
        ref = DenseOutputs(outputs_on_heldout(dense, data), key)
        if path is not None and ref.outputs.numel() * ref.outputs.element_size() <= DISK_CACHE_BYTES:
            from hwprune.atomic import atomic_path

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"key": key, "outputs": ref.outputs}, tmp)
    per_model[key] = ref
    return ref


def is_classifier(objective: str) -> bool:
    """Whether the workload's outputs are judged as classifier logits (agreement and KL apply)."""
    return objective != "cosine"


def quality(model: nn.Module, dense: nn.Module, data, objective: str, cache_dir: Optional[Path] = None
            ) -> Dict[str, float]:
    """The quality figures of ``model`` on the held-out split: {"accuracy": ...} for the accuracy objective, else
    every fidelity figure that applies (see ``fidelity_figures``)."""
    if objective == "accuracy":
        from hwprune.recover import evaluate

        return {"accuracy": evaluate(model, data)}
    ref = dense_outputs(dense, data, cache_dir)
    return fidelity_figures(ref.outputs, outputs_on_heldout(model, data), is_classifier(objective))


# ------------------------------------------------------------------------------------------ choosing it

def resolve_objective(requested: Optional[str], labeled: Optional[bool], output_shape: Optional[tuple]) -> str:
    """The objective a workload is scored by. ``requested`` None: accuracy with labels, else agreement for
    classifier logits ([batch, classes]) and cosine for other outputs. ``labeled`` None: no data at all."""
    if requested is not None and requested not in OBJECTIVES:
        raise ConfigError(f"objective {requested!r} is not valid; choose one of: {', '.join(OBJECTIVES)}")
    if labeled is None:  # latency-only work: nothing is scored
        return requested or "accuracy"
    logits = output_shape is not None and len(output_shape) == 2
    if requested is None:
        return "accuracy" if labeled else ("agreement" if logits else "cosine")
    if requested == "accuracy" and not labeled:
        raise ConfigError("objective 'accuracy' needs labelled data and this data has no labels; use --objective "
                          "agreement, cosine or kl (fidelity to the dense model)")
    if requested in ("agreement", "kl") and not logits:
        raise ConfigError(f"objective {requested!r} compares classifier logits [batch, classes], but the model "
                          f"outputs shape {list(output_shape or [])}; use --objective cosine")
    return requested


# ------------------------------------------------------------------------------------------ distillation

DISTILL_LOSSES = ("kl", "cosine")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """KL at ``temperature`` (scaled by T^2, Hinton et al.) on logits, or 1 - cosine (+ the MSE of the
    embeddings, which also keeps their scale) on comparable vectors."""
    if kind == "kl":
        return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                        log_target=True, reduction="batchmean") * temperature**2
    cos = F.cosine_similarity(student, teacher, dim=1, eps=1e-8).mean()
    return (1.0 - cos) + F.mse_loss(student, teacher)


