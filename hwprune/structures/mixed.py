"""``mixed``: several structures on one layer; the element mask is the AND of the parts' masks.

``params = {"parts": "kernel+strided", "strided.s": 2, ...}``: part names joined by ``+``; part parameters are
prefixed with the part name. Every part is scored on the original weight and meets the mask contract at the spec's
ratio (so mixed is nested and ratio 0 is the identity). A conv whose parts include ``strided`` is realized as a
``GatherConv2d`` over the im2col rows still used (physical); otherwise masked dense.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from hwprune.errors import ConfigError
from hwprune.structures.base import LayerReport, Structure, bytes_csr, bytes_dense, dense_macs, gemm_shape, masked_copy, module_bias_numel, positions
from hwprune.structures.strided import GatherConv2d, gather_supported, kept_rows

MIXABLE = ("kernel", "kernel_row", "kernel_column", "connection", "strided", "block", "nm")


class MixedStructure(Structure):
    name = "mixed"
    description = "AND of several structures' masks on one layer (each at the spec's ratio)"
    param_choices = {"parts": ("kernel+strided", "kernel_row+kernel_column", "block+connection")}
    default_params = {"parts": "kernel+strided"}

    def parts(self, params) -> List[str]:
        names = [p for p in str(params["parts"]).split("+") if p]
        bad = [n for n in names if n not in MIXABLE]
        if len(names) < 2 or bad:
            raise ConfigError(
                f"mixed parts {params['parts']!r} must join at least two of {', '.join(MIXABLE)} with '+'; e.g. 'kernel+strided'"
            )
        return names

    def check_params(self, params):
        p = dict(self.default_params)
        p.update(params or {})
        names = self.parts(p)
        for key in p:
            if key not in ("parts", "removed") and key.split(".", 1)[0] not in names:
                raise ConfigError(f"mixed param {key!r} names no part of {p['parts']!r}; prefix part params as '<part>.<name>'")
        return p

    def _part_params(self, params, part) -> Dict:
        return {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(part + ".")}

    def applies_to(self, module):
        from hwprune.structures.registry import get_structure

        return all(get_structure(n).applies_to(module) for n in self.parts(self.default_params))

    def applies_with(self, module, params) -> bool:
        from hwprune.structures.registry import get_structure

        return all(get_structure(n).applies_to(module) for n in self.parts(params))

    def element_keep(self, weight, ratio, params, criterion="l1"):
        from hwprune.structures.registry import get_structure

        p = self.check_params(params)
        emask = torch.ones(weight.shape, dtype=torch.bool)
        for name in self.parts(p):
            st = get_structure(name)
            emask &= st.element_keep(weight, ratio, self._part_params(p, name), criterion)
        return emask

    def reattach(self, module, weight, spec):
        from hwprune.structures.masks import DENSE, attach

        crit = spec.get("criterion", "l1")
        emask = self.element_keep(weight.detach().cpu(), spec["ratio"], spec["params"],
                                  crit if crit in ("l1", "l2", "block_mean") else "l1")
        attach(module, emask, spec=spec, dense=module._buffers.get(DENSE))

    def _hold(self, module, new, emask, gather, spec):
        """The AND mask holds through training; on a gathered conv, the mask of the gathered (kept) rows."""
        from hwprune.structures.masks import attach

        if gather:  # the gathered layout of the mask: gather a conv whose weights are the mask itself
            probe = masked_copy(module, emask)
            with torch.no_grad():
                probe.weight.copy_(emask.to(probe.weight.dtype))
            attach(new, GatherConv2d(probe, kept_rows(emask)).weight.detach() != 0)  # no dense restart: shape differs
        else:
            attach(new, emask, spec=spec, dense=module.weight.detach())

    def apply(self, module, ratio, params=None, criterion="l1", grad=None, in_shape=None, bn=None, removed=None):
        from hwprune.structures.registry import get_structure

        p = self.check_params(params)
        if not self.applies_with(module, p):
            raise ConfigError(f"mixed parts {p['parts']!r} do not all apply to a {type(module).__name__}")
        w = module.weight.detach()
        emask = torch.ones(w.shape, dtype=torch.bool)
        groups = removed_groups = 0
        for name in self.parts(p):
            st = get_structure(name)
            pp = st.check_params(self._part_params(p, name))
            keep = st.mask(st.scores(w, criterion, pp, grad=grad, module=module, bn=bn), ratio)
            emask &= st.element_mask(w, keep, pp)
            groups += keep.numel()
            removed_groups += int((~keep).sum())
        gather = "strided" in self.parts(p) and gather_supported(module)
        masked = masked_copy(module, emask)
        new = GatherConv2d(masked, kept_rows(emask)) if gather else masked
        self._hold(module, new, emask, gather, {"structure": self.name, "ratio": float(ratio), "params": dict(p),
                                                "criterion": criterion})
        dm = dense_macs(module, in_shape)
        pos = positions(module, in_shape)
        nb = module_bias_numel(module)
        nnz = int(emask.sum())
        rows, _ = gemm_shape(w)
        if gather:
            eff = None if pos is None else w.shape[0] * new.kept_rows * pos
            dep, fmt = bytes_dense(w.shape[0] * new.kept_rows + nb), "dense"
        else:
            eff = dm
            dep = min(bytes_csr(nnz, rows) + bytes_dense(nb), bytes_dense(w.numel() + nb))
            fmt = "csr" if dep < bytes_dense(w.numel() + nb) else "dense"
        rep = LayerReport(
            structure=self.name, ratio=float(ratio), params=p, groups=groups, groups_removed=removed_groups,
            weights=int(w.numel()), weights_kept=nnz, executed="gather" if gather else "dense-masked", format=fmt,
            macs_dense=dm, macs_effective=eff, macs_onnx=eff, bytes_dense=bytes_dense(w.numel() + nb), bytes_deployed=dep,
            extra={"kept_rows": new.kept_rows} if gather else {},
        )
        return new, rep
