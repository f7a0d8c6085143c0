"""``strided``: Anwar et al.'s intra-kernel strided sparsity with the im2col constraint, realized physically.

Flatten kernel positions p = i*kw + j. A strided input channel c keeps only positions with (p - phi_c) mod s == 0,
the same pattern for every filter o (the constraint), so the im2col rows (c, p) it drops vanish for all outputs.
Groups are input channels; the ratio is the fraction of channels made strided, ranked by the saliency they would
lose with their best offset phi_c (ties -> smallest phi). ``s`` is a layer parameter; phi_c is chosen per channel.

Realization: ``GatherConv2d`` computes the conv from the kept (c, p) rows only: for every kernel position it takes
the shifted (strided/dilated) view of the padded input, gathers the channels kept at that position and either
concatenates all of them into one 1x1 conv (``mode="concat"``: one GEMM with K = kept rows) or sums per-position
1x1 convs (``mode="sum"``). Both export to ONNX (Pad, Slice, Gather, Concat, Conv). Any mask works: rows that are
zero for every filter are dropped, so ``mixed`` with strided parts reuses it.
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from hwprune.errors import ConfigError
from hwprune.structures.base import (
    LayerReport, Structure, bytes_dense, dense_macs, is_conv2d, keep_mask, module_bias_numel, positions,
)


class GatherConv2d(nn.Module):
    """A Conv2d (groups=1, zero padding) evaluated only over the kept im2col rows ``rows[c, i, j]``."""

    def __init__(self, conv: nn.Conv2d, rows: torch.Tensor, mode: str = "concat"):
        super().__init__()
        if mode not in ("concat", "sum"):
            raise ConfigError(f"GatherConv2d mode {mode!r} is not one of concat, sum")
        o, c, kh, kw = conv.weight.shape
        self.mode = mode
        self.in_channels, self.out_channels = c, o
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding = tuple(conv.padding)
        self.positions: List[tuple] = []
        ws = []
        w = conv.weight.detach()
        for i in range(kh):
            for j in range(kw):
                idx = torch.nonzero(rows[:, i, j]).reshape(-1)
                if idx.numel() == 0:
                    continue
                self.register_buffer(f"idx_{i}_{j}", idx, persistent=True)
                self.positions.append((i, j))
                ws.append(w[:, idx, i, j])
        self.kept_rows = int(sum(x.shape[1] for x in ws))
        if mode == "concat":
            full = torch.cat(ws, 1) if ws else w.new_zeros(o, 0)
            self.weight = nn.Parameter(full.reshape(o, -1, 1, 1).clone())
        else:
            self.weights = nn.ParameterList([nn.Parameter(x.reshape(o, -1, 1, 1).clone()) for x in ws])
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        h, w = x.shape[-2], x.shape[-1]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
        if not self.positions:
            y = x.new_zeros(x.shape[0], self.out_channels, ho, wo)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
        parts = []
        for i, j in self.positions:
            v = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            parts.append(v.index_select(1, getattr(self, f"idx_{i}_{j}")))
        if self.mode == "concat":
            return F.conv2d(torch.cat(parts, 1) if len(parts) > 1 else parts[0], self.weight, self.bias)
        y = None
        for p, wt in zip(parts, self.weights):
            t = F.conv2d(p, wt)
            y = t if y is None else y + t
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, kept_rows={self.kept_rows}, mode={self.mode}"


def gather_supported(module: nn.Module) -> bool:
    return (
        is_conv2d(module) and module.groups == 1 and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def kept_rows(emask: torch.Tensor) -> torch.Tensor:
    """im2col rows (c, i, j) that at least one filter still uses."""
    return emask.reshape(emask.shape).any(dim=0)


class StridedStructure(Structure):
    name = "strided"
    physical = True
    description = "per input channel keep kernel positions p = phi_c mod s (shared by all filters); gathered im2col"
    param_choices = {"s": (2, 3)}
    default_params = {"s": 2, "mode": "concat"}

    def check_params(self, params):
        p = super().check_params(params)
        if not isinstance(p["s"], int) or p["s"] < 2:
            raise ConfigError(f"strided stride s={p['s']!r} is not an integer >= 2; use 2 or 3")
        if p["mode"] not in ("concat", "sum"):
            raise ConfigError(f"strided mode {p['mode']!r} is not one of concat, sum")
        return p

    def applies_to(self, module):
        return gather_supported(module) and module.weight.shape[2] * module.weight.shape[3] > 1

    def group_index(self, weight, params):
        c = weight.shape[1]
        return torch.arange(c).reshape(1, c, 1, 1).expand_as(weight), c

    @staticmethod
    def _col(weight, criterion="l1", grad=None):
        from hwprune.importance import saliency

        crit = criterion if criterion in ("l1", "l2", "taylor") else "l1"
        sal = saliency(weight, crit, grad)
        if crit == "taylor":
            sal = sal.abs()
        return sal.sum(0).reshape(weight.shape[1], -1)  # [C, kh*kw] saliency of every im2col row

    def _offsets(self, weight, s):
        """phi_c maximising the kept L1 mass of channel c (ties -> smallest phi); independent of the criterion."""
        col = self._col(weight, "l1")
        p = torch.arange(col.shape[1])
        kept = torch.stack([col[:, (p - phi) % s == 0].sum(1) for phi in range(s)], 1)  # [C, s]
        return torch.argmax(kept, 1)

    def scores(self, weight, criterion="l1", params=None, grad=None, module=None, bn=None):
        p = self.check_params(params)
        s = p["s"]
        phi = self._offsets(weight, s)
        col = self._col(weight, criterion, grad)
        pos = torch.arange(col.shape[1]).view(1, -1)
        off = (pos - phi.view(-1, 1)) % s != 0
        return (col * off).sum(1)  # saliency lost by striding the channel

    def element_mask(self, weight, keep, params):
        s = params["s"]
        phi = self._offsets(weight, s)
        o, c, kh, kw = weight.shape
        p = torch.arange(kh * kw).view(1, -1)
        on = ((p - phi.view(-1, 1)) % s == 0).reshape(c, kh, kw)
        rows = torch.where(keep.view(c, 1, 1), torch.ones_like(on), on)
        return rows.unsqueeze(0).expand(o, c, kh, kw)

    def realize(self, module, emask, params, keep):
        return GatherConv2d(module, kept_rows(emask), params["mode"])

    def report(self, module, new, emask, keep, ratio, params, in_shape):
        pos = positions(module, in_shape)
        dm = dense_macs(module, in_shape)
        o = module.weight.shape[0]
        eff = None if pos is None else o * new.kept_rows * pos
        nb = module_bias_numel(module)
        phi = self._offsets(module.weight.detach(), params["s"])
        return LayerReport(
            structure=self.name, ratio=float(ratio), params=dict(params), groups=int(keep.numel()),
            groups_removed=int((~keep).sum()), weights=int(module.weight.numel()), weights_kept=o * new.kept_rows,
            executed="gather", format="dense", macs_dense=dm, macs_effective=eff, macs_onnx=eff,
            bytes_dense=bytes_dense(module.weight.numel() + nb), bytes_deployed=bytes_dense(o * new.kept_rows + nb),
            extra={"kept_rows": new.kept_rows, "rows": int(module.weight[0].numel()),
                   "offsets": [int(v) for v in phi[~keep.reshape(-1)]]},
        )
