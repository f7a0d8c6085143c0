"""Closed-form checks of cost accounting (MACs as executed, bytes in the deployed format)."""
import math

import torch
from torch import nn

from hwprune.structures import bytes_bsr, bytes_csr, bytes_nm, bytes_unified, get_structure


def test_format_formulas():
    assert bytes_csr(10, 4) == 10 * 8 + 5 * 4
    assert bytes_bsr(3, 4, 4, 2) == 3 * (64 + 4) + 3 * 4
    assert bytes_nm(8, 4) == 8 * 4 + 2  # 2 metadata bits per kept value
    assert bytes_unified(2, 1, 16, 2) == 2 * (4 + 2) + 1 * 64 + 3 * 4 + 1 + 3 * 4


def test_block_linear_bsr_costs():
    lin = nn.Linear(16, 8, bias=False)
    new, rep = get_structure("block").apply(lin, 0.75, {"b": 4}, in_shape=(5, 16))  # 8 tiles, 6 removed
    assert rep.groups == 8 and rep.groups_removed == 6
    assert rep.macs_dense == 16 * 8 * 5 and rep.macs_effective == 2 * 16 * 5 and rep.macs_onnx == 16 * 8 * 5
    assert rep.bytes_deployed == bytes_bsr(2, 4, 4, 2) and rep.bytes_dense == 16 * 8 * 4


def test_block_conv_counts_dense():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    _, rep = get_structure("block").apply(conv, 0.5, {"b": 4}, in_shape=(1, 4, 5, 5))
    assert rep.macs_effective == rep.macs_dense == 8 * 4 * 9 * 25


def test_masked_structures_count_dense_and_csr():
    conv = nn.Conv2d(4, 8, 3, bias=False)
    _, rep = get_structure("kernel").apply(conv, 0.75, in_shape=(2, 4, 6, 6))
    assert rep.macs_effective == rep.macs_dense == 8 * 4 * 9 * 2 * 4 * 4
    assert rep.weights_kept == 8 * 9 and rep.bytes_deployed == bytes_csr(72, 8) and rep.format == "csr"


def test_strided_macs_closed_form():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    _, rep = get_structure("strided").apply(conv, 1.0, {"s": 3}, in_shape=(1, 4, 7, 7))
    # every channel keeps the 3 positions p = phi mod 3 of 9 -> K = 4 * 3 = 12 rows
    assert rep.extra["kept_rows"] == 12 and rep.macs_effective == 6 * 12 * 49 and rep.macs_dense == 6 * 36 * 49
    assert rep.bytes_deployed == 6 * 12 * 4


def test_nm_counts_and_metadata():
    lin = nn.Linear(8, 2, bias=False)
    _, rep = get_structure("nm").apply(lin, 1.0, {"nm": "2:4"}, in_shape=(1, 8))
    assert rep.weights_kept == 8 and rep.macs_effective == 16 and rep.bytes_deployed == bytes_nm(8, 4)


def test_unify_mults_and_bits():
    lin = nn.Linear(8, 4, bias=False)  # tiles 2 x 2 grid of 4x4 (b=4) -> 1 row of tiles... 4 rows -> 1 x 2 tiles
    _, rep = get_structure("unify").apply(lin, 1.0, {"b": 4, "prune_share": 0.5}, in_shape=(3, 8))
    assert rep.extra["tiles_unified"] == 1 and rep.extra["tiles_pruned"] == 1
    assert rep.extra["mults_per_position"] == 4  # one multiply per row of the unified tile, none for the pruned
    assert rep.extra["mults_saved"] == (32 - 4) * 3
    assert rep.bytes_deployed == bytes_unified(1, 0, 16, 1)


def test_depth_and_physical_macs():
    from torchvision.models.resnet import BasicBlock

    _, rep = get_structure("depth").apply(BasicBlock(8, 8), 1.0, in_shape=(1, 8, 4, 4))
    assert rep.macs_dense == 2 * 8 * 8 * 9 * 16 and rep.macs_effective == 0 and rep.weights_kept == 0
