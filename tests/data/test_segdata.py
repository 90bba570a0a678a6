"""Segmentation data: fashion-mnist-seg canvases, Cityscapes / ADE20K folders, SegMetrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import undiscard.data.classification as data
from conftest import assert_close_scaled
from undiscard.data.classification import IMAGENET_MEAN, IMAGENET_STD, load_fashion_mnist, split_indices
from undiscard.errors import DatasetNotFoundError, InputError, UndiscardError
from undiscard.data.segmentation import ADE20K_NUM_CLASSES, CITYSCAPES_CLASSES, IGNORE_INDEX, ITEM_SIZE, SEG_CLASSES, SEG_MEAN, SEG_NUM_CLASSES, SEG_SPLIT_SIZES, SEG_STD, SEG_THRESHOLD, CanvasLayout, CanvasSegmentation, FolderSegmentation, InMemorySegmentation, LazySegmentation, SegMetrics, ade20k, canvas_layout, canvas_seed, cityscapes, fashion_mnist_canvas, load_segmentation, open_segmentation, render_canvases

REAL = data.DEBIAN_FASHION_MNIST
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"{REAL} missing (apt-get install dataset-fashion-mnist)"
)


def reference_render(images, labels, layout: CanvasLayout, size: int, threshold: int = SEG_THRESHOLD):
    """Slow, obviously-correct pasting: per canvas, per item, slice assignment."""
    n = layout.source.shape[0]
    canvas = torch.zeros(n, size, size, dtype=torch.uint8)
    target = torch.zeros(n, size, size, dtype=torch.int64)
    for i in range(n):
        for j in range(int(layout.count[i])):
            src, s = int(layout.source[i, j]), int(layout.scale[i, j])
            t, l = int(layout.top[i, j]), int(layout.left[i, j])
            big = images[src].repeat_interleave(s, 0).repeat_interleave(s, 1)
            m = big > threshold
            canvas[i, t : t + ITEM_SIZE * s, l : l + ITEM_SIZE * s][m] = big[m]
            target[i, t : t + ITEM_SIZE * s, l : l + ITEM_SIZE * s][m] = int(labels[src]) + 1
    return canvas, target


def synthetic_items(m: int = 40, seed: int = 0):
    """Random uint8 items with blobs, a dark background and faint (sub-threshold) fringe."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, SEG_THRESHOLD + 1, (m, ITEM_SIZE, ITEM_SIZE), generator=g, dtype=torch.uint8)
    blob = torch.randint(SEG_THRESHOLD + 1, 256, (m, 14, 14), generator=g, dtype=torch.uint8)
    items[:, 7:21, 7:21] = blob
    items[:, 0, :] = 255  # a bright top row: makes the 2x nearest upscaling visible
    return items, torch.arange(m) % 10


# ------------------------------------------------------------------ canvas layout


def test_canvas_layout_is_per_index_deterministic_whatever_else_is_asked():
    a = canvas_layout("test", torch.arange(0, 30))
    b = canvas_layout("test", torch.arange(10, 20))
    c = canvas_layout("test", [25, 12])
    for fa, fb, fc in zip(a, b, c):
        assert torch.equal(fa[10:20], fb)
        assert torch.equal(fa[[25, 12]], fc)
    again = canvas_layout("test", torch.arange(0, 30))
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert canvas_seed("test", 5) == canvas_seed("test", 5) != canvas_seed("val", 5)


def test_canvas_layout_keeps_items_inside_the_canvas_and_uses_both_scales():
    for size in (28, 55, 56, 96):
        lay = canvas_layout("train", torch.arange(300), size=size)
        used = lay.source >= 0
        assert bool((lay.count >= 2).all() and (lay.count <= 4).all())
        assert torch.equal(used.sum(1), lay.count)
        assert bool((lay.top >= 0).all() and (lay.left >= 0).all())
        assert int((lay.top + ITEM_SIZE * lay.scale).max()) <= size
        assert int((lay.left + ITEM_SIZE * lay.scale).max()) <= size
        assert set(lay.scale[used].unique().tolist()) == ({1, 2} if size >= 56 else {1})
    assert set(canvas_layout("val", torch.arange(300), items=(1, 3)).count.unique().tolist()) == {1, 2, 3}


def test_splits_draw_disjoint_source_items_by_construction():
    """train / val canvases index their own split; mapped to the training file they never meet."""
    train_idx, val_idx = split_indices(60000)
    src = {s: canvas_layout(s, torch.arange(SEG_SPLIT_SIZES[s])).source for s in ("train", "val", "test")}
    for s, n in (("train", 55000), ("val", 5000), ("test", 10000)):
        assert int(src[s].max()) < n
    train_file = set(train_idx[src["train"][src["train"] >= 0]].tolist())
    val_file = set(val_idx[src["val"][src["val"] >= 0]].tolist())
    assert train_file.isdisjoint(val_file)
    assert len(val_file) > 3000  # with replacement, but most val items get used


def test_render_matches_slow_reference_and_label_area_is_thresholded_item_pixels():
    items, labels = synthetic_items()
    lay = canvas_layout("val", torch.arange(64), size=72, n_items=items.shape[0])
    canvas, target = render_canvases(items, labels, lay, size=72)
    ref_canvas, ref_target = reference_render(items, labels, lay, 72)
    assert torch.equal(canvas, ref_canvas) and torch.equal(target, ref_target)
    assert target.dtype == torch.int64 and int(target.min()) >= 0 and int(target.max()) <= 10
    assert torch.equal(target == 0, canvas == 0)  # background exactly where the image is black
    # one item per canvas: label area = thresholded item pixels x scale^2, with class + 1
    one = canvas_layout("test", torch.arange(40), size=64, items=(1, 1), n_items=items.shape[0])
    canvas, target = render_canvases(items, labels, one, size=64)
    src, sc = one.source[:, 0], one.scale[:, 0]
    expected_area = (items[src] > SEG_THRESHOLD).flatten(1).sum(1) * sc**2
    assert torch.equal((target > 0).flatten(1).sum(1), expected_area)
    present = target.flatten(1).max(1).values
    assert torch.equal(present, labels[src] + 1)


def test_later_items_occlude_earlier_ones_in_image_and_label():
    items = torch.zeros(2, ITEM_SIZE, ITEM_SIZE, dtype=torch.uint8)
    items[0] = 100
    items[1, 10:20, 10:20] = 200
    lay = CanvasLayout(
        count=torch.tensor([2]), source=torch.tensor([[0, 1]]), scale=torch.tensor([[1, 1]]),
        top=torch.tensor([[0, 5]]), left=torch.tensor([[0, 5]]),
    )
    canvas, target = render_canvases(items, torch.tensor([3, 7]), lay, size=40)
    assert int(canvas[0, 20, 20]) == 200 and int(target[0, 20, 20]) == 8  # item 2 on top
    assert int(canvas[0, 5, 5]) == 100 and int(target[0, 5, 5]) == 4  # item 2's dark pixels dropped
    assert int(target[0, 30, 30]) == 0 and int(canvas[0, 30, 30]) == 0


def test_canvas_arguments_are_checked_at_the_door():
    with pytest.raises(InputError, match="5000 canvases"):
        fashion_mnist_canvas("test", limit=10, start=4995, root=REAL)
    with pytest.raises(InputError, match="split"):
        fashion_mnist_canvas("holdout", limit=1)
    with pytest.raises(InputError, match=">= 28"):
        fashion_mnist_canvas("test", size=20, limit=1)
    with pytest.raises(InputError, match="items"):
        canvas_layout("test", [0], items=(3, 2))
    with pytest.raises(InputError, match="layout uses item"):
        render_canvases(*synthetic_items(5), canvas_layout("test", torch.arange(20)), size=96)


# ------------------------------------------------------------ canvases on real data


@needs_real
def test_real_canvases_are_deterministic_across_start_limit_and_calls():
    x, y = fashion_mnist_canvas("test", size=64, limit=12, root=REAL)
    x2, y2 = fashion_mnist_canvas("test", size=64, limit=5, start=4, root=REAL)
    assert x.shape == (12, 1, 64, 64) and x.dtype == torch.float32
    assert y.shape == (12, 64, 64) and y.dtype == torch.int64
    assert torch.equal(x[4:9], x2) and torch.equal(y[4:9], y2)
    x3, y3 = fashion_mnist_canvas("test", size=64, limit=12, root=REAL)
    assert torch.equal(x, x3) and torch.equal(y, y3)
    ds = CanvasSegmentation("test", 64, limit=12, root=REAL)
    assert len(ds) == 12 and ds.num_classes == SEG_NUM_CLASSES == len(SEG_CLASSES) == 11
    xi, yi = ds[7]
    assert torch.equal(xi, x[7]) and torch.equal(yi, y[7])


@needs_real
def test_real_canvases_paste_items_of_their_own_split_with_labels_on_foreground():
    images, labels = load_fashion_mnist(REAL, "val")
    raw, y = fashion_mnist_canvas("val", size=96, limit=20, root=REAL, normalize=False)
    lay = canvas_layout("val", torch.arange(20), size=96)
    ref_canvas, ref_target = reference_render(images, labels, lay, 96)
    assert torch.equal((raw[:, 0] * 255).round().to(torch.uint8), ref_canvas)
    assert torch.equal(y, ref_target)
    assert int(y.min()) == 0 and int(y.max()) <= 10
    assert torch.equal(y == 0, raw[:, 0] == 0)
    x, _ = fashion_mnist_canvas("val", size=96, limit=20, root=REAL)
    # the library folds /255 and /std into one product (x * 1/(255 std) - mean/std, constants rounded to
    # float32 too): up to 4 roundings, against the reference's 3 (/255 in raw, -mean, /std)
    assert_close_scaled(x, (raw - SEG_MEAN) / SEG_STD, ops=4)


@needs_real
def test_seg_mean_std_match_recomputed_train_canvas_statistics():
    raw, _ = fashion_mnist_canvas("train", size=96, limit=500, start=1000, root=REAL, normalize=False)
    assert abs(float(raw.double().mean()) - SEG_MEAN) < 0.01
    assert abs(float(raw.double().std()) - SEG_STD) < 0.01


@needs_real
def test_training_flip_moves_image_and_mask_together():
    plain = CanvasSegmentation("val", 56, limit=3, root=REAL)
    aug = CanvasSegmentation("val", 56, limit=3, train=True, root=REAL)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        x, y = plain[1]
        xa, ya = aug[1]
        if torch.equal(xa, x):
            assert torch.equal(ya, y)
            seen.add("same")
        else:
            assert torch.equal(xa, x.flip(-1)) and torch.equal(ya, y.flip(-1))
            seen.add("flipped")
    assert seen == {"same", "flipped"}


@needs_real
def test_load_segmentation_fashion_spec():
    x, y, name, k, ignore = load_segmentation("fashion-mnist-seg:val", 48, limit=3, start=2)
    assert x.shape == (3, 1, 48, 48) and y.shape == (3, 48, 48)
    assert (name, k, ignore) == ("fashion-mnist-seg:val", 11, 255)
    x2, _, name2, _, _ = load_segmentation("fashion-mnist-seg", None, limit=1)
    assert name2 == "fashion-mnist-seg:test" and x2.shape == (1, 1, 96, 96)


# ------------------------------------------------------------------ folder sets


def _png(path: Path, array, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.numpy(), mode).save(path)


def make_cityscapes(root: Path, split: str = "val") -> dict[str, torch.Tensor]:
    """Two cities of 8x16 images: aachen with labelIds only, bonn with labelTrainIds (+ labelIds)."""
    pytest.importorskip("PIL")
    label_ids = torch.tensor([0, 7, 8, 26, 33, 9, 1, 23], dtype=torch.uint8)[:, None].expand(8, 16).contiguous()
    train_ids = torch.tensor([0, 18, 19, 255, 5, 5, 10, 13], dtype=torch.uint8)[:, None].expand(8, 16).contiguous()
    rgb = torch.tensor([10, 128, 250], dtype=torch.uint8).expand(8, 16, 3).contiguous()
    for city, name in (("aachen", "aachen_000000_000019"), ("bonn", "bonn_000001_000019")):
        _png(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", rgb)
        _png(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label_ids)
    bonn_gt = root / "gtFine" / split / "bonn" / "bonn_000001_000019_gtFine_labelTrainIds.png"
    _png(bonn_gt, train_ids)
    return {"rgb": rgb, "label_ids": label_ids, "train_ids": train_ids}


def test_cityscapes_maps_label_ids_to_train_ids_and_prefers_train_id_files(tmp_path):
    make_cityscapes(tmp_path)
    ds = cityscapes(tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == len(CITYSCAPES_CLASSES) == 19 and ds.ignore_index == IGNORE_INDEX
    assert [p[0].parent.name for p in ds.pairs] == ["aachen", "bonn"]
    x, y = ds[0]  # aachen: labelIds 0, 7, 8, 26, 33, 9 (parking), 1 (ego), 23 (sky)
    assert x.shape == (3, 8, 16) and x.dtype == torch.float32 and y.shape == (8, 16) and y.dtype == torch.int64
    assert y[:, 0].tolist() == [255, 0, 1, 13, 18, 255, 255, 10]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert_close_scaled(x[:, 0, 0], (torch.tensor([10, 128, 250]) / 255 - mean) / std, ops=3)  # /255, -mean, /std
    _, y_bonn = ds[1]  # bonn: the labelTrainIds file wins; 19 is not a train id -> 255
    assert y_bonn[:, 0].tolist() == [0, 18, 255, 255, 5, 5, 10, 13]
    xs, ys = cityscapes(tmp_path, "val", size=(4, 8))[0]
    assert xs.shape == (3, 4, 8) and ys.shape == (4, 8)
    assert set(ys.unique().tolist()) <= {255, 0, 1, 13, 18, 10}


def test_cityscapes_missing_annotation_or_folder_names_the_layout(tmp_path):
    make_cityscapes(tmp_path)
    for f in (tmp_path / "gtFine" / "val" / "aachen").iterdir():
        f.unlink()
    with pytest.raises(DatasetNotFoundError, match="gtFine_labelTrainIds.png") as info:
        cityscapes(tmp_path, "val")
    assert "aachen_000000_000019" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="leftImg8bit/train/<city>"):
        cityscapes(tmp_path, "train")
    (tmp_path / "leftImg8bit" / "test").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no \\*_leftImg8bit.png"):
        cityscapes(tmp_path, "test")


def make_ade(root: Path, folder: str, sizes=((8, 16), (8, 16))) -> None:
    pytest.importorskip("PIL")
    for i, (h, w) in enumerate(sizes):
        stem = f"ADE_{folder[:3]}_{i + 1:08d}"
        _png(root / "images" / folder / f"{stem}.jpg", torch.full((h, w, 3), 90, dtype=torch.uint8))
        ann = torch.tensor([0, 1, 150, 75], dtype=torch.uint8).repeat(h * w // 4 + 1)[: h * w].view(h, w)
        _png(root / "annotations" / folder / f"{stem}.png", ann)


def test_ade20k_reduces_zero_label_and_accepts_both_split_names(tmp_path):
    make_ade(tmp_path, "validation")
    make_ade(tmp_path, "training", sizes=((8, 16),))
    val = ade20k(tmp_path, "val")
    assert len(val) == 2 and val.num_classes == ADE20K_NUM_CLASSES == 150
    assert [p[0] for p in val.pairs] == [p[0] for p in ade20k(tmp_path, "validation").pairs]
    assert len(ade20k(tmp_path, "train")) == len(ade20k(tmp_path, "training")) == 1
    x, y = val[0]
    assert x.shape == (3, 8, 16) and y.dtype == torch.int64
    assert y[0, :4].tolist() == [255, 0, 149, 74]
    with pytest.raises(InputError, match="split"):
        ade20k(tmp_path, "test")


def test_ade20k_image_without_annotation_is_an_error(tmp_path):
    make_ade(tmp_path, "validation")
    (tmp_path / "annotations" / "validation" / "ADE_val_00000002.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="annotations/validation/ADE_\\*.png"):
        ade20k(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="images/validation"):
        ade20k(tmp_path / "nowhere")


def test_load_segmentation_folder_specs_and_size_rules(tmp_path):
    make_cityscapes(tmp_path / "cs")
    x, y, name, k, ignore = load_segmentation(f"cityscapes:{tmp_path / 'cs'}", None, None)
    assert x.shape == (2, 3, 8, 16) and y.shape == (2, 8, 16)
    assert (name, k, ignore) == ("cityscapes:val", 19, 255)
    x, _, _, _, _ = load_segmentation(f"cityscapes:{tmp_path / 'cs'}:val", 6, limit=1, start=1)
    assert x.shape == (1, 3, 6, 6)
    make_ade(tmp_path / "ade", "validation", sizes=((8, 16), (12, 8)))
    with pytest.raises(InputError, match="pass a size: undiscard eval --size H\\[,W\\]"):
        load_segmentation(f"ade20k:{tmp_path / 'ade'}", None, None)
    x, y, name, k, _ = load_segmentation(f"ade20k:{tmp_path / 'ade'}:validation", (8, 8), None)
    assert x.shape == (2, 3, 8, 8) and (name, k) == ("ade20k:validation", 150)
    with pytest.raises(InputError, match="out of range"):
        load_segmentation(f"ade20k:{tmp_path / 'ade'}", 8, limit=3)
    for bad in ("imagenet", "cityscapes", "cityscapes:", "fashion-mnist-seg:holdout"):
        with pytest.raises(UndiscardError, match="accepted forms"):
            load_segmentation(bad, None, None)


def test_open_segmentation_reads_folder_sets_per_batch_only(tmp_path, monkeypatch):
    make_ade(tmp_path / "ade", "validation", sizes=((8, 16), (12, 8), (16, 16), (8, 8), (12, 12)))
    spec = f"ade20k:{tmp_path / 'ade'}"
    decoded: list[int] = []
    real = FolderSegmentation.__getitem__
    monkeypatch.setattr(FolderSegmentation, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))
    data, name, k, ignore = open_segmentation(spec, (8, 12), limit=4, start=1)
    assert isinstance(data, LazySegmentation) and (name, k, ignore) == ("ade20k:validation", 150, 255)
    assert len(data) == 4 and data.channels == 3 and data.image_size == (8, 12)
    assert decoded == [] and data.reads == 0  # nothing decoded until asked
    x, y = data.batch(1, 3)
    assert decoded == [2, 3] and data.reads == 2 and x.shape == (2, 3, 8, 12) and y.shape == (2, 8, 12)
    assert data.batch(3, 10)[0].shape[0] == 1 and data.batch(4, 6)[0].shape == (0, 3, 8, 12)  # clipped to the end
    decoded.clear()
    xa, ya, _, _, _ = load_segmentation(spec, (8, 12), limit=4, start=1)  # the eager form: the same tensors
    assert torch.equal(xa[1:3], x) and torch.equal(ya[1:3], y) and decoded == [1, 2, 3, 4]
    with pytest.raises(InputError, match="--size H"):
        open_segmentation(spec, None)
    # the canvases are rendered at once and held as tensors
    fake = torch.zeros(3, 1, 4, 4), torch.zeros(3, 4, 4, dtype=torch.int64)
    monkeypatch.setattr("undiscard.data.segmentation.fashion_mnist_canvas", lambda *a, **kw: fake)
    mem, name, _, _ = open_segmentation("fashion-mnist-seg:val")
    assert isinstance(mem, InMemorySegmentation) and name == "fashion-mnist-seg:val" and len(mem) == 3
    assert mem.batch(1, 5)[0].shape == (2, 1, 4, 4)


# ------------------------------------------------------------------------ metrics


def test_seg_metrics_match_hand_computed_confusion_with_ignored_pixels():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    m = SegMetrics(4).update(pred, target)
    # rows = target, cols = pred; the two ignored pixels are not counted; class 3 never occurs
    assert m.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou = m.per_class_iou()
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(float(iou[3]))
    assert m.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m.pixel_accuracy() == pytest.approx(4 / 6)
    assert math.isnan(SegMetrics(3).miou()) and math.isnan(SegMetrics(3).pixel_accuracy())


def test_seg_metrics_state_round_trips_and_merge_equals_one_update():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (4, 6, 7), generator=g)
    target = torch.randint(0, 6, (4, 6, 7), generator=g)
    target[target == 5] = 255
    whole = SegMetrics(5).update(pred, target)
    a, b = SegMetrics(5).update(pred[:2], target[:2]), SegMetrics(5).update(pred[2:], target[2:])
    assert torch.equal(a.merge(b).confusion, whole.confusion)
    back = SegMetrics.from_state(json.loads(json.dumps(whole.state())))
    assert torch.equal(back.confusion, whole.confusion) and back.miou() == whole.miou()
    assert (back.num_classes, back.ignore_index) == (5, 255)
    with pytest.raises(InputError, match="merge"):
        whole.merge(SegMetrics(6))
    with pytest.raises(InputError, match="state"):
        SegMetrics.from_state({"num_classes": 5})


def test_seg_metrics_reject_bad_inputs():
    m = SegMetrics(3)
    with pytest.raises(InputError, match="same shape"):
        m.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(InputError, match="target has values"):
        m.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 7]]))
    with pytest.raises(InputError, match="pred has values"):
        m.update(torch.tensor([[0, 3]]), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        m.update(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))
    assert int(m.confusion.sum()) == 0
