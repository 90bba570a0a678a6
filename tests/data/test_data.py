"""Data loading: IDX parsing, the fixed Fashion-MNIST split, datasets, image folders."""

from __future__ import annotations

import gzip
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

import undiscard.data.classification as data
from conftest import assert_close_scaled
from undiscard.data.classification import FASHION_MNIST_CLASSES, VAL_SIZE, DatasetNotFoundError, TensorImageDataset, fashion_mnist_tensors, image_folder, load_fashion_mnist, read_idx, split_indices
from undiscard.errors import InputError, UndiscardError

_CODES = {torch.uint8: 0x08, torch.int8: 0x09, torch.int16: 0x0B, torch.int32: 0x0C,
          torch.float32: 0x0D, torch.float64: 0x0E}


def idx_bytes(t: torch.Tensor) -> bytes:
    """The IDX encoding of ``t`` (big-endian header and items), written independently of read_idx."""
    t = t.contiguous()
    header = struct.pack(">HBB", 0, _CODES[t.dtype], t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
    raw = t.view(torch.uint8).reshape(-1, t.element_size())
    if sys.byteorder == "little":
        raw = raw.flip(-1)  # IDX items are big-endian
    payload = bytes(raw.contiguous().flatten().tolist())
    return header + bytes(payload)


def write_idx(path: Path, t: torch.Tensor) -> Path:
    raw = idx_bytes(t)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def fake_fashion_mnist(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True) -> dict:
    """Tiny Fashion-MNIST-shaped IDX files; image i is filled with value i (so rows are traceable)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, 28, 28).contiguous()
        labels = (torch.arange(n) % 10).to(torch.uint8)
        write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", labels)
        out[stem] = (images, labels)
    return out


# ------------------------------------------------------------------ IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", list(_CODES))
def test_read_idx_round_trips_every_type_plain_and_gzipped(tmp_path, dtype, suffix):
    torch.manual_seed(0)
    if dtype.is_floating_point:
        t = torch.randn(3, 4, 5, dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (3, 4, 5), dtype=torch.int64).to(dtype)
    got = read_idx(write_idx(tmp_path / f"x-idx3{suffix}", t))
    assert got.dtype == dtype and got.shape == (3, 4, 5)
    assert torch.equal(got, t)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    t = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    path = tmp_path / "labels-idx2-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(t)))
    assert torch.equal(read_idx(path), t)


def test_read_idx_reads_one_dimensional_labels(tmp_path):
    t = torch.tensor([9, 0, 3], dtype=torch.uint8)
    assert torch.equal(read_idx(write_idx(tmp_path / "l-idx1-ubyte", t)), t)


def test_bad_magic_number_raises_input_error_naming_the_file(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x89PNG" + bytes(100))
    with pytest.raises(InputError, match=r"not-idx.*bad IDX magic number 0x89504e47.*expected"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x07\x01" + bytes(8))  # unknown type code 0x07
    with pytest.raises(InputError, match="bad IDX magic"):
        read_idx(path)


def test_truncated_idx_file_raises_input_error_with_expected_size(tmp_path):
    raw = idx_bytes(torch.zeros(4, 28, 28, dtype=torch.uint8))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(raw[:-10])
    with pytest.raises(InputError, match=rf"short-idx3-ubyte.*truncated.*expected {len(raw)}"):
        read_idx(path)
    path.write_bytes(raw[:6])  # inside the dimension sizes
    with pytest.raises(InputError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(raw + b"\x00")
    with pytest.raises(InputError, match="trailing bytes"):
        read_idx(path)


def test_truncated_gzip_raises_input_error(tmp_path):
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(torch.zeros(50, 28, 28, dtype=torch.uint8)))[:40])
    with pytest.raises(InputError, match=r"cut-idx3-ubyte\.gz.*truncated gzip"):
        read_idx(path)


def test_read_idx_of_missing_file_is_a_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------ split


def test_val_split_is_deterministic_disjoint_and_covers_60000_once():
    train, val = split_indices(60000)
    train2, val2 = split_indices(60000)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert val.numel() == VAL_SIZE == 5000 and train.numel() == 55000
    assert train.dtype == val.dtype == torch.int64
    assert bool((train.diff() > 0).all()) and bool((val.diff() > 0).all())  # sorted, no repeats
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60000))


def test_val_split_is_pinned_to_seed_20241001():
    # a fingerprint of the published split: fails if torch's randperm ever changes
    assert data.VAL_SEED == 20241001
    _, val = split_indices(60000)
    assert val[:8].tolist() == [1, 23, 30, 47, 59, 66, 72, 83]
    assert int(val.sum()) == 150092637
    _, other = split_indices(60000, seed=1)
    assert not torch.equal(other, val)


def test_split_indices_rejects_impossible_sizes():
    with pytest.raises(InputError, match="val_size"):
        split_indices(10, 10)


def test_load_splits_from_a_small_fake_train_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "VAL_SIZE", 5)
    fake = fake_fashion_mnist(tmp_path, n_train=20, n_test=10)
    xt, yt = load_fashion_mnist(tmp_path, "train")
    xv, yv = load_fashion_mnist(tmp_path, "val")
    xs, ys = load_fashion_mnist(tmp_path, "test")
    assert xt.shape == (15, 28, 28) and xv.shape == (5, 28, 28) and xs.shape == (10, 28, 28)
    assert xt.dtype == torch.uint8 and yt.dtype == yv.dtype == ys.dtype == torch.int64
    train_idx, val_idx = split_indices(20, 5, data.VAL_SEED)
    # image i is filled with value i: the rows are exactly the split's indices, labels aligned
    assert torch.equal(xv[:, 0, 0].long(), val_idx) and torch.equal(xt[:, 0, 0].long(), train_idx)
    assert torch.equal(yv, val_idx % 10) and torch.equal(yt, train_idx % 10)
    assert torch.equal(xs, fake["t10k"][0]) and torch.equal(ys, fake["t10k"][1].long())
    # deterministic across calls
    assert torch.equal(load_fashion_mnist(tmp_path, "val")[0], xv)


def test_torchvision_raw_layout_and_plain_files_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "VAL_SIZE", 5)
    fake_fashion_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    x, y = load_fashion_mnist(tmp_path, "test")
    assert x.shape == (10, 28, 28) and y.shape == (10,)


def test_env_var_sets_the_default_root(tmp_path, monkeypatch):
    fake_fashion_mnist(tmp_path)
    monkeypatch.setenv(data.ENV_FASHION_MNIST, str(tmp_path))
    assert load_fashion_mnist(split="test")[0].shape == (10, 28, 28)


def test_missing_files_error_says_where_it_looked_and_mentions_apt_get_and_download(tmp_path):
    with pytest.raises(UndiscardError) as info:
        load_fashion_mnist(tmp_path / "empty", "test")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg and "--download" in msg
    assert str(tmp_path / "empty") in msg and "t10k-images-idx3-ubyte" in msg


def test_bad_split_name_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="'train', 'val' or 'test'"):
        load_fashion_mnist(tmp_path, "validation")


def test_download_uses_torchvision_and_reads_its_raw_files(tmp_path, monkeypatch):
    import undiscard.compat as compat

    assert compat.ensure_torchvision()
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            fake_fashion_mnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    x, y = load_fashion_mnist(tmp_path / "dl", "test", download=True)
    assert calls == [(str(tmp_path / "dl"), True)]
    assert x.shape == (10, 28, 28) and y.dtype == torch.int64
    load_fashion_mnist(tmp_path / "dl", "test", download=True)  # files now there: no second download
    assert len(calls) == 1


def test_classes_are_the_ten_fashion_mnist_names():
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"


# ------------------------------------------------------------------ tensors


def _gray(n=6, h=28, w=28):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, h, w), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_dataset_yields_resized_repeated_normalised_float_images():
    images, labels = _gray()
    ds = TensorImageDataset(images, labels, size=32, in_chans=3)
    assert len(ds) == 6
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 2 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    ref = torch.nn.functional.interpolate(images[2][None, None].float() / 255, size=32, mode="bilinear")
    # float32 both: /255, a bilinear resize (4-term weighted sums), a subtraction and a division
    assert_close_scaled(x[0], (ref[0, 0] - 0.2860) / 0.3530, ops=8)


def test_dataset_at_native_size_is_exact_normalisation_with_per_channel_stats():
    images, labels = _gray()
    ds = TensorImageDataset(images, labels, in_chans=2, mean=(0.5, 0.25), std=(0.5, 2.0))
    x, _ = ds[0]
    p = images[0].float() / 255
    assert x.shape == (2, 28, 28)
    assert_close_scaled(x[0], (p - 0.5) / 0.5, ops=3)  # /255, a subtraction, a division
    assert_close_scaled(x[1], (p - 0.25) / 2.0, ops=3)
    # constant images normalise to the expected constants
    ds = TensorImageDataset(torch.full((1, 28, 28), 255, dtype=torch.uint8), torch.zeros(1), size=14)
    assert_close_scaled(ds[0][0], torch.full((1, 14, 14), (1 - 0.2860) / 0.3530), ops=8)  # as above, resized


@pytest.mark.parametrize("use_torchvision", [True, False])
def test_training_augmentation_keeps_shape_and_varies(monkeypatch, use_torchvision):
    images, labels = _gray(2)
    if not use_torchvision:
        monkeypatch.setattr(TensorImageDataset, "_build_augment", lambda self: None)
    ds = TensorImageDataset(images, labels, size=40, in_chans=3, train=True)
    assert (ds._augment is not None) == use_torchvision
    torch.manual_seed(0)
    xs = [ds[0][0] for _ in range(4)]
    for x in xs:
        assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert torch.equal(x[0], x[2])
    assert any(not torch.equal(xs[0], x) for x in xs[1:])


def test_dataset_rejects_bad_inputs():
    images, labels = _gray()
    with pytest.raises(InputError, match="uint8"):
        TensorImageDataset(images.float(), labels)
    with pytest.raises(InputError, match="labels"):
        TensorImageDataset(images, labels[:3])
    with pytest.raises(InputError, match="mean"):
        TensorImageDataset(images, labels, in_chans=3, mean=(0.1, 0.2))


def test_batched_tensors_match_the_dataset_item_by_item(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "VAL_SIZE", 5)
    fake_fashion_mnist(tmp_path, n_test=10)
    x, y = fashion_mnist_tensors("test", 20, 3, root=tmp_path, chunk=3)
    assert x.shape == (10, 3, 20, 20) and x.dtype == torch.float32 and y.shape == (10,)
    ds = TensorImageDataset(*load_fashion_mnist(tmp_path, "test"), size=20, in_chans=3)
    for i in range(10):
        xi, yi = ds[i]
        assert_close_scaled(x[i], xi, ops=8)  # batched vs one image: as above
        assert int(y[i]) == yi
    xv, _ = fashion_mnist_tensors("val", 28, 2, root=tmp_path, mean=(0.1, 0.2), std=(1.0, 2.0))
    assert xv.shape == (5, 2, 28, 28) and xv.is_contiguous()


# ------------------------------------------------------------------ image folders


def _png_folder(root: Path) -> Path:
    from PIL import Image

    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for name, color in colors.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (30, 50)]):
            Image.new("RGB", size, color).save(root / name / f"{i}.png")
    return root


def test_image_folder_yields_normalised_tensors_and_class_indices(tmp_path):
    pytest.importorskip("PIL")
    ds = image_folder(_png_folder(tmp_path / "imgs"), input_size=(3, 32, 32))
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    expected_red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    ops = 3 + math.sqrt(32 * 32)  # a constant image: /255, normalised (2 steps), then a mean over 32x32 pixels
    assert_close_scaled(x.mean((1, 2)), expected_red, ops=ops)
    x, y = ds[3]
    assert y == 1
    assert_close_scaled(x.mean((1, 2)), (torch.tensor([0.0, 0.0, 1.0]) - mean) / std, ops=ops)


def test_image_folder_grayscale_and_rectangular_sizes(tmp_path):
    pytest.importorskip("PIL")
    ds = image_folder(_png_folder(tmp_path / "imgs"), input_size=(1, 24, 16), mean=(0.5,), std=(0.5,))
    x, _ = ds[1]
    assert x.shape == (1, 24, 16)


def test_image_folder_without_timm_uses_the_same_eval_transform(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (45, 60, 3), generator=g, dtype=torch.uint8)
    Image.frombytes("RGB", (60, 45), bytes(pixels.flatten().tolist())).save(root / "a" / "noise.png")
    with_timm = image_folder(root, input_size=(3, 32, 32))
    monkeypatch.setitem(sys.modules, "timm.data", None)  # "from timm.data import ..." now raises ImportError
    without = image_folder(root, input_size=(3, 32, 32))
    assert with_timm[0][0].std() > 0.5  # a textured image, so the comparison means something
    for i in range(len(with_timm)):
        assert_close_scaled(without[i][0], with_timm[i][0], ops=3)  # the same resize; /255 and normalise, 3 steps


def test_image_folder_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(InputError, match="no class sub-folders"):
        image_folder(tmp_path / "flat")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(InputError, match="noimg"):
        image_folder(tmp_path / "noimg")


# ------------------------------------------------------------------ the real data


@pytest.mark.skipif(
    not data.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{data.DEBIAN_FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split_has_1000_of_each_class():
    x, y = load_fashion_mnist(data.DEBIAN_FASHION_MNIST, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    xv, yv = load_fashion_mnist(data.DEBIAN_FASHION_MNIST, "val")
    assert xv.shape == (5000, 28, 28) and yv.shape == (5000,)
