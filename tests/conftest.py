"""Shared fixtures for the core tests: a tiny residual CNN, tiny digit data, a fast search space and a fast CPU
profile. Everything here is small enough that a test using it runs in well under a second or two."""
from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from hwprune.models import DemoNet

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine extra threads spin and wait
# (training the tiny net took 19 s with 2 threads under load, 0.5 s with one).
# Subprocesses the tests start (the hwprune console script) inherit one thread through the environment.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_WIDTHS = (8, 16, 16)
DIGITS_SHAPE = (1, 8, 8)


def make_tiny_net(seed: int = 0) -> DemoNet:
    """DemoNet with 8/16/16 channels and BN statistics that are not the identity (so BN matters in checks)."""
    torch.manual_seed(seed)
    net = DemoNet(in_channels=1, num_classes=10, widths=TINY_WIDTHS)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return net.eval()


@pytest.fixture
def tiny_net() -> DemoNet:
    return make_tiny_net()


@pytest.fixture
def example_input() -> torch.Tensor:
    return torch.randn(1, *DIGITS_SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits with the default 20% stratified validation split (1,797 images in all)."""
    from hwprune.data import load_dataset

    return load_dataset("digits", val_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def tiny_digits(digits):
    """A DataBundle of 200 training and 100 validation digits: training a few steps takes milliseconds."""
    from torch.utils.data import Subset

    from hwprune.data import DataBundle

    return DataBundle("digits-tiny", Subset(digits.train, range(200)), Subset(digits.val, range(100)),
                      digits.input_shape, digits.num_classes)


FAST_SPACE_YAML = """\
description: a fast test space
prunable: ["*"]
ignore: []
ratios: [0.0, 0.5]
round_to: 4
importance: l1
recovery:
  bn_recalibration_batches: 1
  finetune_steps: 2
  batch_size: 32
  lr: 0.01
  optimizer: sgd
"""

FAST_PROFILE_YAML = """\
description: ONNX Runtime CPU, one thread, very short measurements (tests only)
backend: onnxruntime
batch_size: 1
options:
  provider: CPUExecutionProvider
  threads: 1
  inter_op_threads: 1
  graph_optimization_level: all
measure:
  warmup: 1
  min_repeats: 3
  max_repeats: 5
  target_rel_ci: 0.5
  time_cap_s: 0.5
accelerates: [filter, channel]
"""


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    p = tmp_path / "fast-space.yaml"
    p.write_text(FAST_SPACE_YAML)
    return p


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    p = tmp_path / "fast-cpu.yaml"
    p.write_text(FAST_PROFILE_YAML)
    return p


TINY_FACTORY_SOURCE = '''
import torch.nn as nn


def tiny():
    """A small CNN for 1x8x8 inputs and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


def not_a_model():
    return 42


VALUE = 3
'''


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch):
    """The name of a fresh importable module (in tmp_path, on sys.path) with ``tiny()``, ``not_a_model()``."""
    name = f"hwprune_test_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TINY_FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
