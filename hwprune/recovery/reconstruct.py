"""``reconstruct``: layer-wise least-squares reconstruction, then the budget's (distillation) fine-tuning.

After heads or MLP channels are removed, the layer that consumes them (an attention output projection, an MLP's
output dense) still has the weights that were fitted to the full input. Kwon et al. 2022 ("A Fast Post-Training
Pruning Framework for Transformers") show that refitting such a layer by linear least squares, so that its output
on the pruned model's own activations matches the dense model's output on calibration inputs, recovers most of the
loss without any training. Layers are refitted in forward order, each on inputs that already pass through the
refitted layers before it, so errors do not accumulate. The refit needs only forward passes; the optimizer steps
of the budget are then spent as ``finetune`` spends them.

Refitted: every plain ``nn.Linear`` whose input width is smaller than the dense model's same-named layer and whose
output width is unchanged; and every masked ``nn.Linear`` / ``nn.Conv2d`` (mask-only structures: kernel-wise,
unstructured, N:M, block, strided) whose output width is unchanged. A masked layer is refitted under its mask: each
output row's kept weights (and its bias) are the ridge least-squares fit over those weights only (the layer-wise
problem of Frantar & Alistarh's OBC/SparseGPT with the mask held fixed), so the zeros stay zeros. And every plain
``nn.Conv2d`` that channel pruning narrowed (inputs, outputs or both; He et al. 2017 / ThiNet's reconstruction): its
kept channels are found by exact matching against the dense weights (pruning copies slices, nothing is trained
before the refit), and its output is fitted to the dense output of the channels it kept. Grouped convs and
weight-tied (unified) layers are left to fine-tuning.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.recover import recalibrate_bn, train_budget
from hwprune.recovery.base import RecoveryMethod
from hwprune.structures.masks import KEEP, TIE


def refittable_layers(model: nn.Module, teacher: nn.Module) -> List[str]:
    """Names of the Linear layers whose input the plan narrowed and whose output it kept, in forward order."""
    dense = dict(teacher.named_modules())
    out = []
    for name, m in model.named_modules():
        d = dense.get(name)
        if (isinstance(m, nn.Linear) and isinstance(d, nn.Linear) and KEEP not in m._buffers
                and m.in_features < d.in_features and m.out_features == d.out_features):
            out.append(name)
    return out


def refittable_masked_layers(model: nn.Module, teacher: nn.Module) -> List[str]:
    """Names of the masked Linear/Conv2d layers a refit under the mask can serve, in forward order: same output
    width as the dense layer; plain convs only (groups 1, numeric padding, zero padding); no tied weights."""
    dense = dict(teacher.named_modules())
    out = []
    for name, m in model.named_modules():
        d = dense.get(name)
        if KEEP not in getattr(m, "_buffers", {}) or TIE in m._buffers or type(d) is not type(m):
            continue
        if isinstance(m, nn.Linear) and m.out_features == d.out_features:
            out.append(name)
        elif _plain_conv(m) and m.out_channels == d.out_channels:
            out.append(name)
    return out


def _plain_conv(m: nn.Module) -> bool:
    """A conv the im2col refit can express: groups 1, numeric zero padding."""
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str)
            and m.padding_mode == "zeros")


def slice_indices(weight: torch.Tensor, dense: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(kept output rows, kept input channels) with ``weight == dense[rows][:, channels]`` exactly, or None when the
    weight is not such a slice (trained since pruning, or not pruned from this dense layer). Candidates are narrowed
    by one value before whole rows are compared, so memory stays linear in the layer's size."""
    if weight.dim() != dense.dim() or weight.shape[2:] != dense.shape[2:] or weight.numel() == 0:
        return None
    kernels = dense.flatten(2)  # [out, in, k*k]
    if weight.shape[1] == dense.shape[1]:
        channels = torch.arange(dense.shape[1])
    else:  # the first kept row is some dense row restricted to the kept channels: find both
        channels = None
        first = weight[0].flatten(1)  # [kept in, k*k]
        for r in (kernels == first[0, 0]).flatten(1).any(1).nonzero().flatten().tolist():
            hits = (kernels[r].unsqueeze(0) == first.unsqueeze(1)).all(-1)  # [kept in, dense in]
            if bool(hits.any(1).all()):
                channels = hits.float().argmax(1)
                break
        if channels is None:
            return None
    sub, rows_of = dense[:, channels].flatten(1), weight.flatten(1)
    rows = []
    for row in rows_of:
        match = next((int(c) for c in (sub[:, 0] == row[0]).nonzero().flatten() if torch.equal(sub[c], row)), None)
        if match is None:
            return None
        rows.append(match)
    return torch.tensor(rows), channels


def narrowed_convs(model: nn.Module, teacher: nn.Module) -> Dict[str, torch.Tensor]:
    """{name: kept output rows} of the unmasked plain convs that channel pruning narrowed, whose weights are still
    exact slices of the dense ones (in forward order)."""
    dense = dict(teacher.named_modules())
    out = {}
    for name, m in model.named_modules():
        d = dense.get(name)
        if (_plain_conv(m) and isinstance(d, nn.Conv2d) and KEEP not in m._buffers
                and (m.in_channels, m.out_channels) != (d.in_channels, d.out_channels)):
            found = slice_indices(m.weight.detach(), d.weight.detach())
            if found is not None:
                out[name] = found[0]
    return out


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the features one output value sees (im2col for a conv)."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _outputs(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as rows matching ``_columns``: one row per position, one column per output channel."""
    if isinstance(layer, nn.Conv2d):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


@torch.no_grad()
def refit_rows(layer: nn.Module, gram: torch.Tensor, cross: torch.Tensor, target_sq: torch.Tensor,
               ridge: float) -> float:
    """Refit ``layer`` (under its mask, if it has one) from the accumulated statistics of its augmented input
    ``[x, 1]``: ``gram`` = sum x^T x, ``cross`` = sum x^T y, ``target_sq`` = sum y^2 per output. Each output row
    solves its own ridge problem over its kept weights (plus the bias, not shrunk); returns the relative residual
    over all outputs."""
    w = layer.weight.reshape(layer.weight.shape[0], -1)
    has_bias = layer.bias is not None
    reg = ridge * gram.diagonal()[:-1].mean().clamp_min(1e-12)
    if KEEP not in layer._buffers:  # every row sees every column: one solve with all rows as right-hand sides
        cols = torch.arange(gram.shape[0] if has_bias else gram.shape[0] - 1)
        g = gram[cols][:, cols]
        h = g + torch.diag(torch.full((len(cols),), float(reg), dtype=torch.float64))
        if has_bias:
            h[-1, -1] -= reg
        c = cross[cols]
        sol = torch.linalg.lstsq(h, c).solution if ridge == 0.0 else torch.linalg.solve(h, c)  # [cols, outputs]
        residual_sq = float(((sol * (g @ sol)).sum(0) - 2 * (sol * c).sum(0) + target_sq).clamp_min(0).sum())
        if has_bias:
            layer.bias.copy_(sol[-1].to(layer.bias.dtype))
            sol = sol[:-1]
        layer.weight.copy_(sol.T.reshape(layer.weight.shape).to(layer.weight.dtype))
        return (residual_sq / max(float(target_sq.sum()), 1e-12)) ** 0.5
    keep = layer._buffers[KEEP].reshape(w.shape)
    new_w = torch.zeros_like(w, dtype=torch.float64)
    new_b = torch.zeros(w.shape[0], dtype=torch.float64)
    residual_sq = 0.0
    for row in range(w.shape[0]):
        idx = keep[row].nonzero().flatten()
        if has_bias:
            idx = torch.cat([idx, torch.tensor([gram.shape[0] - 1])])
        if idx.numel() == 0:
            residual_sq += float(target_sq[row])
            continue
        h = gram[idx][:, idx].clone()
        shrink = torch.full((idx.numel(),), float(reg), dtype=torch.float64)
        if has_bias:
            shrink[-1] = 0.0
        h += torch.diag(shrink)
        c = cross[idx, row]
        sol = torch.linalg.lstsq(h, c.unsqueeze(1)).solution.squeeze(1) if ridge == 0.0 else torch.linalg.solve(h, c)
        # ||x_S w - y||^2 = w^T G_SS w - 2 w^T c + y^T y (G without the ridge term)
        residual_sq += float(sol @ gram[idx][:, idx] @ sol - 2 * sol @ c + target_sq[row])
        if has_bias:
            new_b[row] = sol[-1]
            sol = sol[:-1]
        new_w[row, keep[row]] = sol
    layer.weight.copy_(new_w.reshape(layer.weight.shape).to(layer.weight.dtype))
    if has_bias:
        layer.bias.copy_(new_b.to(layer.bias.dtype))
    return (max(residual_sq, 0.0) / max(float(target_sq.sum()), 1e-12)) ** 0.5


def _bn_producers(model: nn.Module, x) -> Dict[str, str]:
    """{BatchNorm name: name of the conv whose output it normalises}, traced on one forward pass."""
    made: Dict[int, tuple] = {}  # id of a conv's output -> (the conv, a weak reference to that very tensor)
    fed: Dict[str, Optional[str]] = {}

    def producer(t):  # ids of freed tensors are reused: trust an id only if it is still the same tensor
        conv, ref = made.get(id(t), (None, lambda: None))
        return conv if ref() is t else None

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda _m, _a, out, n=name: made.__setitem__(id(out), (n, weakref.ref(out)))))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            hooks.append(m.register_forward_hook(lambda _m, a, _o, n=name: fed.__setitem__(n, producer(a[0]))))
    _forward_with(model, x, hooks)
    return {bn: conv for bn, conv in fed.items() if conv is not None}


@torch.no_grad()
def _dense_bn_statistics(model: nn.Module, teacher: nn.Module, kept_rows: Dict[str, torch.Tensor], x) -> None:
    """Give every BatchNorm of ``model`` the dense running statistics of the channels it kept (all of them where the
    shapes match; those its producing conv kept where channel pruning narrowed it): the refit makes each layer's
    output reproduce the dense layer's, so the dense normalisation is the one its successors must see while they
    are refitted (statistics recalibrated on the damaged model would mis-scale them)."""
    dense = dict(teacher.named_modules())
    producers = _bn_producers(model, x) if kept_rows else {}
    for name, m in model.named_modules():
        d = dense.get(name)
        if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(d, nn.modules.batchnorm._BatchNorm)
                and m.running_mean is not None and d.running_mean is not None):
            continue
        if m.running_mean.shape == d.running_mean.shape:
            rows = slice(None)
        elif producers.get(name) in kept_rows and len(kept_rows[producers[name]]) == m.running_mean.numel():
            rows = kept_rows[producers[name]]
        else:
            continue
        m.running_mean.copy_(d.running_mean[rows])
        m.running_var.copy_(d.running_var[rows])


class _Reached(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _forward_until(model: nn.Module, x, layer: nn.Module, store: Dict[str, torch.Tensor], key: str, what: str) -> None:
    """Run ``model`` on ``x`` only as far as ``layer`` and keep its input or output (half the cost of a full pass
    on average: the refit visits every layer)."""
    def hook(_m, args, output):
        store[key] = (args[0] if what == "input" else output).detach()
        raise _Reached

    try:
        _forward_with(model, x, [layer.register_forward_hook(hook)])
    except _Reached:
        pass
    if key not in store:
        raise RuntimeError("reconstruct: the layer to refit was not called in the forward pass")


TARGET_CACHE_BYTES = 512 * 2 ** 20  # streamed layers' dense outputs kept from one teacher pass up to this size


def _outputs_of(model: nn.Module, x, names: List[str]) -> Dict[str, torch.Tensor]:
    """{layer: its output} for the named layers of ``model``, from one forward pass on ``x``."""
    modules = dict(model.named_modules())
    store: Dict[str, torch.Tensor] = {}
    _forward_with(model, x, [_capture(modules[n], store, n, "output") for n in names])
    return store


def _forward_with(model: nn.Module, x, hooks: list) -> None:
    """One forward pass without gradients; the hooks are removed afterwards, whatever happens."""
    from hwprune.fidelity import forward

    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in hooks:
            h.remove()


def _refit_layer(name: str, model: nn.Module, teacher: nn.Module, batches: list, ridge: float,
                 rows: Optional[torch.Tensor] = None, targets: Optional[list] = None) -> float:
    """Accumulate the layer's input statistics on the pruned model (refitted layers before it included) against the
    dense layer's output on the same inputs (its kept ``rows`` only, if narrowed; from ``targets`` when given), one
    batch at a time, then refit it (under its mask, if it has one)."""
    layer, dense = dict(model.named_modules())[name], dict(teacher.named_modules())[name]
    gram = cross = target_sq = None
    for i, x in enumerate(batches):
        got: Dict[str, torch.Tensor] = {}
        _forward_until(model, x, layer, got, "x", "input")
        if targets is not None:
            got["y"] = targets[i]
        else:
            _forward_until(teacher, x, dense, got, "y", "output")
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        if isinstance(layer, nn.Linear):
            cols, y = _rows(got["x"], mask).float(), _rows(got["y"], mask).float()
        else:
            cols, y = _columns(layer, got["x"]).float(), _outputs(layer, got["y"]).float()
        if rows is not None:
            y = y[:, rows]
        cols = torch.cat([cols, torch.ones(cols.shape[0], 1)], dim=1)
        # products of one batch in float32 (a conv's im2col has batch x positions rows), summed in float64
        g, c, t = (cols.T @ cols).double(), (cols.T @ y).double(), (y.double() ** 2).sum(0)
        if gram is None:
            gram, cross, target_sq = g, c, t
        else:
            gram += g
            cross += c
            target_sq += t
    return refit_rows(layer, gram, cross, target_sq, ridge)


def _rows(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Activations as rows of features; for token activations [B, L, D] only the positions the mask keeps."""
    if t.dim() == 3 and mask is not None and mask.shape == t.shape[:2]:
        return t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


def _capture(module: nn.Module, store: Dict[str, torch.Tensor], key: str, what: str):
    def hook(_m, args, output):
        store[key] = (args[0] if what == "input" else output).detach()
    return module.register_forward_hook(hook)


def refit_linear(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, ridge: float) -> float:
    """Set ``layer`` to the ridge least-squares fit of ``y`` from ``x`` (bias included); returns the relative
    residual ||xW + b - y|| / ||y|| after the fit."""
    x64 = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y64 = y.double()
    gram = x64.T @ x64
    reg = ridge * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    eye[-1, -1] = 0.0  # the bias is not shrunk
    solution = torch.linalg.solve(gram + reg * eye, x64.T @ y64)
    with torch.no_grad():
        layer.weight.copy_(solution[:-1].T.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(solution[-1].to(layer.bias.dtype))
        else:  # no bias to take the intercept: refit without it
            solution = torch.linalg.solve(x64[:, :-1].T @ x64[:, :-1] + reg * eye[:-1, :-1], x64[:, :-1].T @ y64)
            layer.weight.copy_(solution.T.to(layer.weight.dtype))
    with torch.no_grad():
        fitted = layer(x.to(layer.weight.dtype))
    return float((fitted - y).norm() / y.norm().clamp_min(1e-12))


def reconstruct(model: nn.Module, teacher: nn.Module, batches: list, ridge: float = 1e-3,
                log=None) -> Dict[str, float]:
    """Refit every refittable layer of ``model`` in forward order against ``teacher``; {layer: relative residual}."""
    names = refittable_layers(model, teacher)
    masked = set(refittable_masked_layers(model, teacher))
    convs = narrowed_convs(model, teacher)
    if not names and not masked and not convs:
        return {}
    order = [n for n, _ in model.named_modules() if n in masked or n in names or n in convs]
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    teacher.eval()
    if masked or convs:
        _dense_bn_statistics(model, teacher, convs, batches[0])
    masks = [x.get("attention_mask") if isinstance(x, dict) else None for x in batches]
    # the dense targets of every layer, from one teacher pass per batch; those of the streamed layers (masked,
    # narrowed convs) only while they fit in TARGET_CACHE_BYTES, else each such layer runs the teacher as far as
    # itself (slower, bounded memory)
    streamed = [n for n in order if n in masked or n in convs]
    targets: Dict[str, list] = {n: [] for n in names}
    cached: Optional[Dict[str, list]] = {n: [] for n in streamed}
    for i, (x, mask) in enumerate(zip(batches, masks)):
        store = _outputs_of(teacher, x, names + (streamed if cached is not None else []))
        for n in names:
            targets[n].append(_rows(store[n], mask))
        if cached is not None and i == 0 and \
                sum(store[n].numel() * store[n].element_size() for n in streamed) * len(batches) > TARGET_CACHE_BYTES:
            cached = None
        if cached is not None:
            for n in streamed:
                cached[n].append(store[n])
    residuals = {}
    for name in order:  # in forward order: each layer sees the refitted layers before it
        if name in masked or name in convs:
            residuals[name] = _refit_layer(name, model, teacher, batches, ridge, convs.get(name),
                                           cached.pop(name) if cached is not None else None)
            continue
        xs = []
        for x, mask in zip(batches, masks):
            store = {}
            _forward_with(model, x, [_capture(modules[name], store, "x", "input")])
            xs.append(_rows(store["x"], mask))
        residuals[name] = refit_linear(modules[name], torch.cat(xs), torch.cat(targets.pop(name)), ridge)
    model.train(was_training)
    if log:
        worst = max(residuals.values())
        log(f"reconstruct: {len(residuals)} layers refitted by least squares ({len(masked)} under their masks, "
            f"{len(convs)} convs narrowed by channel pruning; worst relative residual {worst:.3f})")
    return residuals


class Reconstruct(RecoveryMethod):
    name = "reconstruct"
    description = ("least-squares refit against the dense model of the layers consuming pruned heads/channels "
                   "(Kwon et al. 2022), of convs narrowed by channel pruning (ThiNet) and of masked layers under "
                   "their masks (OBC/SparseGPT's layer-wise problem), then fine-tuning")
    # calibration batches (of the budget's batch size) from the training split; ridge relative to the mean diagonal
    param_types = {"calibration_batches": (int, 1, 1000, 16), "ridge": (float, 0.0, 1.0, 1e-3)}

    def run(self, model, data, budget, teacher=None, seed=0, log=None):
        if teacher is not None:
            p = self.params(budget)
            loader = data.loader("train", budget.batch_size, shuffle=True, seed=seed)
            batches = []
            for x, _ in loader:
                batches.append(x)
                if len(batches) >= p["calibration_batches"]:
                    break
            if reconstruct(model, teacher, batches, p["ridge"], log):
                # the refitted outputs follow the dense distribution now: re-estimate what BN normalises by
                recalibrate_bn(model, data, budget.bn_recalibration_batches, budget.batch_size, seed)
        elif log:
            log("reconstruct: no dense model was given, so no refit; fine-tuning only")
        return train_budget(model, data, budget, budget.finetune_steps, teacher, seed)
