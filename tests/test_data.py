"""Datasets and their deterministic, stratified train/validation split. Nothing downloads."""
import numpy as np
import pytest
import torch

from hwprune.data import DATA_CHOICES, load_dataset, stratified_split
from hwprune.errors import DataError


def _labels(ds):
    return np.array([int(ds[i][1]) for i in range(len(ds))])


def test_stratified_split_fractions_per_class_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(labels)))
    for c, n in zip(range(4), [10, 20, 30, 40]):
        assert (labels[va] == c).sum() == round(0.2 * n)
        assert (labels[tr] == c).sum() == n - round(0.2 * n)


def test_stratified_split_is_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(3), 50)
    a = stratified_split(labels, 0.3, seed=7)
    b = stratified_split(labels, 0.3, seed=7)
    c = stratified_split(labels, 0.3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


def test_digits_bundle(digits):
    assert digits.name == "digits"
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train) + len(digits.val) == 1797
    assert abs(len(digits.val) - 0.2 * 1797) <= 10  # rounding per class
    x, y = digits.train[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 8, 8) and y.dtype == torch.int64
    # every class is in both splits, in the same proportion
    tr, va = np.bincount(_labels(digits.train), minlength=10), np.bincount(_labels(digits.val), minlength=10)
    assert (va > 0).all() and np.allclose(va / (tr + va), 0.2, atol=0.02)


def test_digits_split_no_overlap_and_same_twice(digits):
    from sklearn.datasets import load_digits

    again = load_dataset("digits", val_fraction=0.2, seed=0)
    # the same split twice: identical tensors in the same order
    assert torch.equal(again.val.tensors[0], digits.val.tensors[0])
    assert torch.equal(again.train.tensors[1], digits.train.tensors[1])
    # no sample is in both splits (by index: digits holds a few exact duplicate images, so not by content)
    target = load_digits().target
    tr, va = stratified_split(target, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(target)
    assert len(tr) == len(digits.train) and len(va) == len(digits.val)
    assert np.array_equal(target[va], digits.val.tensors[1].numpy())
    # another seed is another split
    other = load_dataset("digits", val_fraction=0.2, seed=1)
    assert not torch.equal(other.val.tensors[0], digits.val.tensors[0])


def test_loader_shuffle_is_seeded(digits):
    a = next(iter(digits.loader("train", 16, shuffle=True, seed=3)))[1]
    b = next(iter(digits.loader("train", 16, shuffle=True, seed=3)))[1]
    c = next(iter(digits.loader("train", 16, shuffle=True, seed=4)))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    v = next(iter(digits.loader("val", 10)))[1]
    assert torch.equal(v, digits.val.tensors[1][:10])


def _make_image_folder(root, classes=("cat", "dog", "emu"), per_class=5, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_imagefolder(tmp_path):
    root = _make_image_folder(tmp_path / "imgs")
    b = load_dataset(f"imagefolder:{root}", val_fraction=0.4, seed=0, image_size=8)
    assert b.input_shape == (3, 8, 8) and b.num_classes == 3
    assert len(b.train) == 9 and len(b.val) == 6  # 2 of each class's 5 in validation
    assert sorted(_labels(b.val).tolist()) == [0, 0, 1, 1, 2, 2]
    assert not set(b.train.indices) & set(b.val.indices)
    again = load_dataset(f"imagefolder:{root}", val_fraction=0.4, seed=0, image_size=8)
    assert again.val.indices == b.val.indices
    x, _ = b.val[0]
    assert tuple(x.shape) == (3, 8, 8) and x.dtype == torch.float32


def test_imagefolder_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not an image folder"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")


def test_torchvision_missing_root_is_a_data_error(tmp_path):
    missing = tmp_path / "no-mnist-here"
    with pytest.raises(DataError) as e:
        load_dataset(f"torchvision:MNIST:{missing}")
    assert str(missing) in str(e.value) and "never downloads" in str(e.value)
    assert not missing.exists()  # and it did not create (download into) it


def test_torchvision_root_without_files_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="never downloads"):
        load_dataset(f"torchvision:MNIST:{tmp_path}")
    assert list(tmp_path.rglob("*")) == []  # nothing was downloaded or created


def test_torchvision_unknown_class_and_bad_form(tmp_path):
    with pytest.raises(DataError, match="no dataset class 'NoSuchSet'"):
        load_dataset(f"torchvision:NoSuchSet:{tmp_path}")
    with pytest.raises(DataError, match="torchvision:CLASS:ROOT"):
        load_dataset("torchvision:MNIST")


def test_unknown_reference_lists_choices():
    with pytest.raises(DataError) as e:
        load_dataset("cifar11")
    assert "'cifar11'" in str(e.value) and DATA_CHOICES in str(e.value)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.2, 1.5])
def test_bad_validation_fraction(frac):
    with pytest.raises(DataError, match="validation fraction"):
        load_dataset("digits", val_fraction=frac)


def test_none_means_no_data():
    assert load_dataset("none") is None
