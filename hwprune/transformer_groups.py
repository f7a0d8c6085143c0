"""Transformer structures as search-space groups, next to the channel groups, with the same ratio syntax.

* ``heads:<attention module>``: whole attention heads removed (ratio = fraction of the heads, rounded to whole heads,
  at least one kept). The query, key and value rows of a removed head and the output projection's columns that read
  it go together; the module's head count is updated. Known attention modules: Hugging Face BERT-style self-attention
  (``query``/``key``/``value`` linears, ``num_attention_heads``, ``attention_head_size``, ``all_head_size``; the
  output projection is the parent's ``output.dense``) and ``nn.MultiheadAttention`` (torchvision ViT). PyTorch's
  ``nn.MultiheadAttention`` cannot hold fewer heads than ``embed_dim / head_dim`` (its inner width is its embedding
  width), so it is replaced by ``PrunedMultiheadAttention``: the same computation with separate q/k/v linears.
  torchvision Swin (V1/V2) and MaxViT window attention derive the head width from the embedding width in their
  forward, so a module that lost heads becomes a ``HeadPruned<class>`` subclass whose forward does not; its
  per-head position biases (table columns; V2: the continuous-bias MLP's rows and the logit scales) lose the same heads.
* ``mlp:<first linear>``: a transformer block's MLP hidden width: torch-pruning's dependency group of the first
  linear (its rows and the second linear's columns), pruned by the engine like any channel group.
* ``depth:<container>``: whole residual blocks of a list of transformer blocks dropped (ratio = fraction of the
  list's residual blocks, at least one kept), each replaced by ``SkippedBlock``, an identity that takes the block's
  call signature.

Heads and blocks are chosen by importance (below) and the choice is stored in the plan (``PruningPlan.removed``), so
a plan replays exactly. Channel groups are selected by patterns without a ``kind:`` prefix as before; these groups
only by patterns that name their kind (``heads:*``), so an existing space such as ``prunable: ["*"]`` is unchanged.

The hidden (embedding) width is not a group here: where the model's output is the hidden vector (a text
encoder's embedding) it must stay; where a classifier reads it, it is torch-pruning's channel group of the
residual stream (the channel groups).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hwprune.errors import ModelError

HEADS, MLP, DEPTH = "heads", "mlp", "depth"
KINDS = (HEADS, MLP, DEPTH)


def kind_of(group_name: str) -> Optional[str]:
    """``heads`` / ``mlp`` / ``depth`` for a transformer group's name, None for a channel group."""
    kind, sep, _ = group_name.partition(":")
    return kind if sep and kind in KINDS else None


def module_of(group_name: str) -> str:
    return group_name.partition(":")[2]


def count_removed(ratio: float, total: int) -> int:
    """Whole units (heads, blocks) a ratio removes: rounded half up, at least one unit kept."""
    return max(0, min(int(math.floor(ratio * total + 0.5)), total - 1))


def _call(model: nn.Module, example_input):
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _slice_linear(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear keeping ``keep`` rows (dim 0: outputs) or columns (dim 1: inputs)."""
    weight = linear.weight.detach().index_select(dim, keep)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, keep))
    return out.train(linear.training)


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Attention modules


@contextlib.contextmanager
def no_mha_fastpath():
    """nn.MultiheadAttention's inference fast path (one fused op) has no ONNX export and no MAC count in fvcore;
    its plain path (the same results) has both. Export and MAC counting run in this context."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)



class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (self- or cross-attention, packed or separate projections) with any number of
    heads of a fixed head width: q/k/v project ``embed_dim -> num_heads * head_dim``, the output projection back.
    Same call signature and results; attention weights are returned when asked for (``need_weights``)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, batch_first: bool, dropout: float = 0.0,
                 bias: bool = True, kdim: Optional[int] = None, vdim: Optional[int] = None):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "PrunedMultiheadAttention":
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ModelError("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported for head "
                             "pruning; leave its heads:* group out of the search space")
        e = mha.embed_dim
        new = cls(e, mha.num_heads, mha.head_dim, mha.batch_first, mha.dropout, mha.in_proj_bias is not None,
                  mha.kdim, mha.vdim)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.detach().split(e, 0)
            else:
                weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
            for proj, w, i in zip((new.q_proj, new.k_proj, new.v_proj), weights, range(3)):
                proj.weight.copy_(w)
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias.detach()[i * e:(i + 1) * e])
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        return new.to(mha.out_proj.weight.device).train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = _additive_mask(attn_mask, key_padding_mask, q.dtype, batch, self.num_heads, length, k.shape[2])
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(attn_mask, key_padding_mask, dtype, batch, num_heads, length, source_length):
    """nn.MultiheadAttention's two masks (boolean: True = not attended; or additive floats) as one additive mask."""

    def additive(m):
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(batch, num_heads, length, source_length) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(batch, 1, 1, source_length)
        mask = pad if mask is None else mask + pad
    return mask


class _Attention:
    """How to read and cut the heads of one known attention module."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name = model, name

    # subclasses: num_heads, head_dim, projections() -> (q, k, v, out) linears, members, remove(heads)


class _HFSelfAttention(_Attention):
    """Hugging Face BERT-style: ``query``/``key``/``value`` linears in ``<attn>.self``; the output projection is
    ``<attn>.output.dense``."""

    @staticmethod
    def matches(model: nn.Module, name: str, module: nn.Module) -> bool:
        if not all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")):
            return False
        if not all(isinstance(getattr(module, a, None), int) for a in ("num_attention_heads", "attention_head_size")):
            return False
        return _HFSelfAttention._output_name(model, name, module) is not None

    @staticmethod
    def _output_name(model: nn.Module, name: str, module: nn.Module) -> Optional[str]:
        parent = name.rpartition(".")[0]
        out_name = f"{parent}.output.dense" if parent else "output.dense"
        try:
            out = model.get_submodule(out_name)
        except AttributeError:
            return None
        inner = module.num_attention_heads * module.attention_head_size
        return out_name if isinstance(out, nn.Linear) and out.in_features == inner else None

    @property
    def module(self) -> nn.Module:
        return self.model.get_submodule(self.name)

    @property
    def num_heads(self) -> int:
        return self.module.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.module.attention_head_size

    @property
    def out_name(self) -> str:
        return self._output_name(self.model, self.name, self.module)

    @property
    def members(self) -> Tuple[str, ...]:
        return (self.name, *(f"{self.name}.{p}" for p in ("query", "key", "value")), self.out_name)

    def projections(self):
        m = self.module
        return m.query, m.key, m.value, self.model.get_submodule(self.out_name)

    def remove(self, heads: Sequence[int]) -> None:
        m, out_name = self.module, self.out_name
        keep = _head_rows([h for h in range(self.num_heads) if h not in set(heads)], self.head_dim)
        for p in ("query", "key", "value"):
            setattr(m, p, _slice_linear(getattr(m, p), keep, 0))
        _set_module(self.model, out_name, _slice_linear(self.model.get_submodule(out_name), keep, 1))
        m.num_attention_heads = self.num_heads - len(set(heads))
        m.all_head_size = m.num_attention_heads * m.attention_head_size  # the config is shared: left as it is


class _TorchMultiheadAttention(_Attention):
    """``nn.MultiheadAttention`` (made a ``PrunedMultiheadAttention`` when heads are removed) or one already made."""

    @staticmethod
    def matches(model: nn.Module, name: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention))

    @property
    def module(self) -> nn.Module:
        return self.model.get_submodule(self.name)

    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    @property
    def head_dim(self) -> int:
        return self.module.head_dim

    @property
    def members(self) -> Tuple[str, ...]:
        if isinstance(self.module, nn.MultiheadAttention):
            return (self.name, f"{self.name}.out_proj")
        return (self.name, *(f"{self.name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")))

    def _as_pruned(self) -> PrunedMultiheadAttention:
        if isinstance(self.module, nn.MultiheadAttention):
            _set_module(self.model, self.name, PrunedMultiheadAttention.from_torch(self.module))
        return self.module

    def projections(self):
        m = self.module
        if isinstance(m, nn.MultiheadAttention):
            m = PrunedMultiheadAttention.from_torch(m)
        return m.q_proj, m.k_proj, m.v_proj, m.out_proj

    def remove(self, heads: Sequence[int]) -> None:
        m = self._as_pruned()
        keep = _head_rows([h for h in range(m.num_heads) if h not in set(heads)], m.head_dim)
        for p in ("q_proj", "k_proj", "v_proj"):
            setattr(m, p, _slice_linear(getattr(m, p), keep, 0))
        m.out_proj = _slice_linear(m.out_proj, keep, 1)
        m.num_heads -= len(set(heads))


# --- torchvision Swin (V1, V2) and MaxViT window attention: their forwards derive the head width from the embedding
# width, so a module with fewer heads becomes a subclass whose forward uses ``num_heads * head_dim`` instead.


def _swin_classes():
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    return ShiftedWindowAttention, ShiftedWindowAttentionV2


def _window_mask(pad_h: int, pad_w: int, window, shift, device) -> torch.Tensor:
    """The shifted-window attention mask: -100 between tokens that came from different regions before the roll."""
    region = torch.zeros((pad_h, pad_w), device=device)
    count = 0
    for h in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    region = region.view(pad_h // window[0], window[0], pad_w // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _shifted_window_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's shifted window attention (V1, or V2 with ``logit_scale``) with ``module.num_heads`` heads of
    ``module.head_dim`` features, independent of the embedding width."""
    batch, height, width, channels = x.shape
    window, shift = module.window_size, list(module.shift_size)
    pad_right, pad_bottom = (window[1] - width % window[1]) % window[1], (window[0] - height % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
    _, pad_h, pad_w, _ = x.shape
    shift = [0 if window[i] >= (pad_h, pad_w)[i] else shift[i] for i in range(2)]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window[0] * window[1], channels)
    heads, head_dim = module.num_heads, module.head_dim
    logit_scale = getattr(module, "logit_scale", None)
    qkv_bias = module.qkv.bias
    if logit_scale is not None and qkv_bias is not None:  # V2 has no key bias
        inner = heads * head_dim
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner:2 * inner]), qkv_bias[2 * inner:]])
    qkv = F.linear(x, module.qkv.weight, qkv_bias).reshape(x.size(0), x.size(1), 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + module.get_relative_position_bias()
    if sum(shift) > 0:
        mask = _window_mask(pad_h, pad_w, window, shift, x.device)
        attn = attn.view(x.size(0) // windows, windows, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.dropout(attn.softmax(-1), p=module.attention_dropout, training=module.training)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), x.size(1), heads * head_dim)
    x = F.dropout(module.proj(x), p=module.dropout, training=module.training)
    x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def _maxvit_attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision MaxViT's relative positional attention with ``module.n_heads`` heads of ``module.head_dim``."""
    b, g, p, _ = x.shape
    heads, head_dim = module.n_heads, module.head_dim
    q, k, v = (t.reshape(b, g, p, heads, head_dim).permute(0, 1, 3, 2, 4)
               for t in torch.chunk(module.to_qkv(x), 3, dim=-1))
    attn = (q @ (k * module.scale_factor).transpose(-2, -1) + module.get_relative_positional_bias()).softmax(-1)
    return module.merge((attn @ v).permute(0, 1, 3, 2, 4).reshape(b, g, p, heads * head_dim))


_PRUNED_CLASSES: Dict[str, type] = {}


def _window_attention_bases() -> Dict[str, Tuple[type, object]]:
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    v1, v2 = _swin_classes()
    return {"HeadPrunedShiftedWindowAttention": (v1, _shifted_window_attention),
            "HeadPrunedShiftedWindowAttentionV2": (v2, _shifted_window_attention),
            "HeadPrunedRelativePositionalMultiHeadAttention": (RelativePositionalMultiHeadAttention, _maxvit_attention)}


def __getattr__(name: str) -> type:
    """The head-pruned window-attention classes, built on first use (also when a saved model is unpickled)."""
    if name not in _PRUNED_CLASSES:
        bases = _window_attention_bases()
        if name not in bases:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        base, forward = bases[name]
        _PRUNED_CLASSES[name] = type(name, (base,), {"forward": lambda self, x: forward(self, x),
                                                     "__module__": __name__, "__qualname__": name})
    return _PRUNED_CLASSES[name]


def _head_pruned_class(module: nn.Module) -> type:
    if type(module).__name__.startswith("HeadPruned"):
        return type(module)
    return __getattr__(f"HeadPruned{type(module).__name__}")


class _WindowAttention(_Attention):
    """torchvision Swin ``ShiftedWindowAttention`` (V1/V2) and MaxViT ``RelativePositionalMultiHeadAttention``: one
    packed q/k/v linear, an output linear, and per-head position biases (V1, MaxViT: a table column per head; V2: the
    continuous-bias MLP's output row per head and a per-head logit scale)."""

    @staticmethod
    def _kind(module: nn.Module) -> Optional[str]:
        try:
            from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
        except ImportError:  # pragma: no cover
            return None
        if isinstance(module, _swin_classes()):
            return "swin"
        if isinstance(module, RelativePositionalMultiHeadAttention):
            return "maxvit"
        return None

    @staticmethod
    def matches(model: nn.Module, name: str, module: nn.Module) -> bool:
        return _WindowAttention._kind(module) is not None

    @property
    def module(self) -> nn.Module:
        return self.model.get_submodule(self.name)

    @property
    def _swin(self) -> bool:
        return self._kind(self.module) == "swin"

    @property
    def num_heads(self) -> int:
        return self.module.num_heads if self._swin else self.module.n_heads

    @property
    def head_dim(self) -> int:
        m = self.module
        return getattr(m, "head_dim", None) or m.proj.in_features // m.num_heads

    @property
    def _linears(self) -> Tuple[str, str]:
        return ("qkv", "proj") if self._swin else ("to_qkv", "merge")

    @property
    def members(self) -> Tuple[str, ...]:
        return (self.name, *(f"{self.name}.{p}" for p in self._linears))

    def projections(self):
        packed, out = (getattr(self.module, p) for p in self._linears)
        q, k, v = (_slice_linear(packed, torch.arange(i * out.in_features, (i + 1) * out.in_features), 0)
                   for i in range(3))
        return q, k, v, out

    def remove(self, heads: Sequence[int]) -> None:
        m, n, d = self.module, self.num_heads, self.head_dim
        kept = [h for h in range(n) if h not in set(heads)]
        rows = _head_rows(kept, d)
        packed, out = self._linears
        setattr(m, packed, _slice_linear(getattr(m, packed), torch.cat([rows + i * n * d for i in range(3)]), 0))
        setattr(m, out, _slice_linear(getattr(m, out), rows, 1))
        keep_heads = torch.tensor(kept, dtype=torch.long)
        with torch.no_grad():
            if isinstance(getattr(m, "cpb_mlp", None), nn.Sequential):  # Swin V2
                m.cpb_mlp[-1] = _slice_linear(m.cpb_mlp[-1], keep_heads, 0)
                m.logit_scale = nn.Parameter(m.logit_scale.detach().index_select(0, keep_heads))
            else:
                m.relative_position_bias_table = nn.Parameter(
                    m.relative_position_bias_table.detach().index_select(1, keep_heads))
        if self._swin:
            m.head_dim, m.num_heads = d, len(kept)
            m.__class__ = _head_pruned_class(m)
        else:
            m.n_heads = len(kept)
            m.__class__ = _head_pruned_class(m)


_ATTENTION_KINDS = (_HFSelfAttention, _TorchMultiheadAttention, _WindowAttention)


def find_attention(model: nn.Module) -> Dict[str, _Attention]:
    """Every known attention module with at least two heads, by name, in model order."""
    found = {}
    for name, module in model.named_modules():
        for kind in _ATTENTION_KINDS:
            if name and kind.matches(model, name, module):
                attention = kind(model, name)
                if attention.num_heads >= 2:
                    found[name] = attention
                break
    return found


def head_importance(attention: _Attention, criterion: str = "l1") -> torch.Tensor:
    """One score per head: the magnitude (L1, or L2 for ``criterion='l2'``) of everything the head owns (its q, k, v
    rows and biases, the output projection's columns). The same magnitude rule the channel groups use by default;
    deterministic from the weights, so the same model always loses the same heads."""
    p = 2 if criterion == "l2" else 1
    q, k, v, out = attention.projections()
    h, d = attention.num_heads, attention.head_dim
    score = torch.zeros(h)
    with torch.no_grad():
        for proj in (q, k, v):
            rows = proj.weight.detach().reshape(h, d, -1).abs().pow(p).sum((1, 2))
            if proj.bias is not None:
                rows = rows + proj.bias.detach().reshape(h, d).abs().pow(p).sum(1)
            score += rows.cpu()
        score += out.weight.detach().reshape(out.weight.shape[0], h, d).abs().pow(p).sum((0, 2)).cpu()
    return score.pow(1.0 / p)


# ---------------------------------------------------------------------------------------------------------------
# Depth


class SkippedBlock(nn.Module):
    """A dropped residual block: returns its first input (in a 1-tuple where the block returned a tuple), whatever
    else it is called with (attention masks, caches, keyword options)."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states

    def extra_repr(self) -> str:
        return "returns_tuple=True" if self.returns_tuple else ""


def _block_io(model: nn.Module, example_input, blocks: Dict[str, nn.Module]) -> Dict[str, Tuple[torch.Tensor, object]]:
    """Each block's first input and its output on the example input (one forward pass)."""
    seen: Dict[str, Tuple[torch.Tensor, object]] = {}

    def hook(name):
        def record(module, args, kwargs, output):
            first = args[0] if args else next(iter(kwargs.values()), None)
            seen.setdefault(name, (first, output))
        return record

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in blocks.items()]
    try:
        with torch.no_grad():
            _call(model.eval(), example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def find_block_lists(model: nn.Module, attention: Iterable[str], example_input) -> Dict[str, List[str]]:
    """Containers (ModuleList / Sequential) holding at least two residual blocks (a child that holds a known
    attention module and returns a tensor of its input's shape), with those blocks: the blocks that may be dropped.
    A container's other children (a stage's first, downsampling block; a stage, itself a list) stay; a container
    inside a block of another such container is left to it (dropping the outer block drops it)."""
    attention = list(attention)
    candidates: Dict[str, List[str]] = {}
    lists = (nn.ModuleList, nn.Sequential)
    for name, module in model.named_modules():
        if isinstance(module, lists):
            holding = [f"{name}.{c}" if name else c for c, child in module.named_children()
                       if not isinstance(child, lists)]  # a stage (a list itself) is not a block
            holding = [c for c in holding if any(a.startswith(c + ".") for a in attention)]
            if len(holding) >= 2:
                candidates[name] = holding
    if not candidates:
        return {}
    table = dict(model.named_modules())
    io = _block_io(model, example_input, {c: table[c] for cs in candidates.values() for c in cs})

    def residual(child):
        if child not in io:
            return False
        first, out = io[child]
        out = out[0] if isinstance(out, tuple) else out
        return isinstance(first, torch.Tensor) and isinstance(out, torch.Tensor) and first.shape == out.shape

    lists = {n: [c for c in cs if residual(c)] for n, cs in candidates.items()}
    lists = {n: cs for n, cs in lists.items() if len(cs) >= 2}
    blocks = [c for cs in lists.values() for c in cs]
    return {n: cs for n, cs in lists.items() if not any(n.startswith(b + ".") for b in blocks)}


def block_importance(model: nn.Module, children: Sequence[str], example_input) -> Tuple[torch.Tensor, List[bool]]:
    """Per block: the norm of its residual update relative to its input, ||block(x) - x|| / ||x||, on the example
    input (a block that barely changes its input is the one whose removal changes the model least; LayerDrop and
    ShortGPT-style block pruning rank blocks the same way), and whether it returns a tuple."""
    table = dict(model.named_modules())
    io = _block_io(model, example_input, {c: table[c] for c in children})
    scores, tuples = [], []
    for c in children:
        first, out = io[c]
        tuples.append(isinstance(out, tuple))
        out = out[0] if isinstance(out, tuple) else out
        scores.append(float((out - first).norm() / first.norm().clamp_min(1e-12)))
    return torch.tensor(scores), tuples


# ---------------------------------------------------------------------------------------------------------------
# Groups: discovery, selection, application


def list_groups(model: nn.Module, example_input, channel_groups: Sequence = ()) -> list:
    """The transformer groups of a model (empty for a model without known attention modules), as
    ``graph.PrunableGroup`` (name, units: heads / MLP channels / blocks, member modules). ``channel_groups``:
    torch-pruning's channel groups of the model, from which the MLP groups are read."""
    from hwprune.graph import PrunableGroup

    attention = find_attention(model)
    if not attention:
        return []
    groups = [PrunableGroup(f"{HEADS}:{n}", a.num_heads, a.members) for n, a in attention.items()]
    table = dict(model.named_modules())
    ancestors = {p for a in attention for p in _prefixes(a)}
    attention_members = {m for a in attention.values() for m in a.members}
    for g in channel_groups:
        linears = [m for m in g.members if isinstance(table.get(m), nn.Linear)]
        # an MLP: the root linear and the one linear that reads it, inside a module that also holds attention
        if (isinstance(table.get(g.name), nn.Linear) and len(linears) == 2 and len(g.members) == 2
                and not set(g.members) & attention_members and set(_prefixes(g.name)) & ancestors):
            groups.append(PrunableGroup(f"{MLP}:{g.name}", g.channels, g.members))
    for container, children in find_block_lists(model, attention, example_input).items():
        groups.append(PrunableGroup(f"{DEPTH}:{container}", len(children), tuple(children)))
    return groups


def _prefixes(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def selects(patterns: Sequence[str], group_name: str) -> bool:
    """Whether glob patterns pick a transformer group: only patterns naming a kind (``heads:*``) do."""
    return any(":" in p and fnmatch.fnmatchcase(group_name, p) for p in patterns)


def needs_channel_groups(prunable: Sequence[str]) -> bool:
    """Whether torch-pruning's channel groups are needed: for channel patterns and for ``mlp:`` groups (read from
    them), not for a space of heads and blocks only (so a model torch-pruning cannot trace can still lose those)."""
    return not all(p.startswith((f"{HEADS}:", f"{DEPTH}:")) for p in prunable)


def select(space, channel_groups: Sequence, structure_groups: Sequence) -> list:
    """The groups a search space prunes: its channel groups, minus any rooted at a layer a selected heads/MLP group
    cuts (one set of channels takes one ratio: q/k/v's own channel group, the MLP's first linear), plus its
    transformer groups. The hidden-width group stays selectable beside heads: it cuts the projections' other side."""
    chosen = [g for g in structure_groups if selects(space.prunable, g.name) and not selects(space.ignore, g.name)]
    taken = {m for g in chosen if kind_of(g.name) != DEPTH for m in g.members}
    channels = [g for g in channel_groups if space.matches(g.name) and g.name not in taken]
    return channels + chosen


def _check_removed(group: str, removed: Sequence[int], total: int, what: str) -> None:
    if len(set(removed)) != len(removed) or not all(isinstance(i, int) and 0 <= i < total for i in removed) \
            or len(removed) >= total:
        raise ModelError(f"plan removes {what} {list(removed)} of {group!r}, which has {total} {what}: give distinct "
                         f"positions 0..{total - 1}, at least one kept (was the plan made for another model?)")


def apply(model: nn.Module, ratios: Dict[str, float], example_input, criterion: str = "l1",
          removed: Optional[Dict[str, List[int]]] = None, scores: Optional[Dict[str, torch.Tensor]] = None
          ) -> Tuple[nn.Module, Dict[str, float], Dict[str, List[int]]]:
    """Drop blocks, then remove heads, on a copy of ``model``. ``removed``: the heads / block positions to remove
    per group (a plan's record: replayed as is); otherwise chosen by importance at each group's ratio: ``scores``
    per ``heads:`` group where given (``hwprune.fisher``: data-driven), else the weights' magnitude. Returns the
    model, the channel ratios left for torch-pruning (channel groups, plus ``mlp:`` groups as the ratio of their
    root linear, except those inside dropped blocks), and what was removed."""
    wanted = {n: float(r) for n, r in ratios.items() if kind_of(n) and r > 0}
    channel = {n: float(r) for n, r in ratios.items() if not kind_of(n)}
    if not wanted and not removed:
        return model, channel, {}
    model = copy.deepcopy(model).eval()
    table = dict(model.named_modules())
    record = dict(removed or {})
    dropped: List[str] = []

    def groups_of(kind: str) -> List[str]:
        return [n for n in (wanted if removed is None else record) if kind_of(n) == kind]

    for name in groups_of(DEPTH):
        container = module_of(name)
        if container not in table:
            raise ModelError(f"plan names a block list the model does not have: {container!r}")
        if any(container.startswith(d + ".") for d in dropped):
            record.pop(name, None)
            continue
        # positions are among all the container's children; only its residual blocks are candidates
        children = [f"{container}.{c}" if container else c for c, _ in table[container].named_children()]
        if removed is None:
            blocks = find_block_lists(model, find_attention(model), example_input).get(container, [])
            block_scores, _ = block_importance(model, blocks, example_input)
            order = sorted(range(len(blocks)), key=lambda i: (float(block_scores[i]), i))
            record[name] = sorted(children.index(blocks[i]) for i in order[:count_removed(wanted[name], len(blocks))])
        _check_removed(name, record[name], len(children), "blocks")
        if not record[name]:
            continue
        _, tuples = block_importance(model, [children[i] for i in record[name]], example_input)
        for i, returns_tuple in zip(record[name], tuples):
            _set_module(model, children[i], SkippedBlock(returns_tuple))
            dropped.append(children[i])
    attention = find_attention(model)
    for name in groups_of(HEADS):
        target = module_of(name)
        if any(target.startswith(d + ".") for d in dropped):
            record.pop(name, None)
            continue
        if target not in attention:
            raise ModelError(f"plan names an attention module the model does not have: {target!r}")
        a = attention[target]
        if removed is None:
            given = (scores or {}).get(name)
            score = given if given is not None and len(given) == a.num_heads else head_importance(a, criterion)
            order = sorted(range(a.num_heads), key=lambda i: (float(score[i]), i))
            record[name] = sorted(order[:count_removed(wanted[name], a.num_heads)])
        _check_removed(name, record[name], a.num_heads, "heads")
        if record[name]:
            a.remove(record[name])
    for name, r in ratios.items():
        if kind_of(name) == MLP and r > 0:
            channel[module_of(name)] = float(r)
    # a channel group rooted inside a dropped block went with it (its root, which names it, is gone)
    channel = {n: r for n, r in channel.items() if not any(n.startswith(d + ".") for d in dropped)}
    return model, channel, {n: v for n, v in record.items() if v}
