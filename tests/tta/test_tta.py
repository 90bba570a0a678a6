"""Image-space TTA transforms: inverses, masks, names, policies, errors (undiscard.tta.transforms)."""

from __future__ import annotations

import math

import pytest
import torch

from undiscard.tta import transforms as tta
from undiscard.errors import InputError, UndiscardError

SIZE = (16, 20)
MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN1, STD1 = (0.286,), (0.353,)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny images: intra-op threads only add barrier waits (seconds on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(c: int = 3, size=SIZE, n: int = 2, seed: int = 0) -> torch.Tensor:
    """A normalised batch of a [0, 1] image with structure (so every op changes it)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    u = (0.5 * (yy + xx) * 0.6 + 0.2 * torch.rand(n, c, h, w, generator=g) + 0.1).clamp(0, 1)
    mean, std = (MEAN3, STD3) if c == 3 else (MEAN1, STD1)
    return (u - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def _all_dense_exact() -> list[tta.ImageTransform]:
    pool = tta.augmentation_pool(SIZE, MEAN3, STD3, n=45)
    extra = [
        tta.VFlip(),
        tta.Crop(3, 5, 7, 9),
        tta.Translate(-3, 7),
        tta.Chain(tta.Crop.at("br", 0.75, SIZE), tta.HFlip()),
        tta.Chain(tta.Translate(2, -1), tta.VFlip(), tta.Crop(1, 1, 10, 10)),
    ]
    return [t for t in pool + extra if t.dense and t.exact]


@pytest.mark.parametrize("t", _all_dense_exact(), ids=lambda t: t.name)
def test_exact_dense_transforms_round_trip_bitwise_on_the_mask(t):
    d = torch.randn(2, 5, *SIZE, dtype=torch.float64)
    back, mask = t.deaugment(t.augment_dense(d), SIZE)
    assert back.shape == d.shape and mask.dtype == torch.bool and mask.shape == (1, 1, *SIZE)
    m = mask.expand_as(d)
    assert torch.equal(back[m], d[m])
    assert (back[~m] == 0).all()
    assert mask.any()


@pytest.mark.parametrize("t", [tta.Identity(), tta.HFlip(), tta.VFlip(), tta.Brightness(0.3, MEAN3, STD3)],
                         ids=lambda t: t.name)
def test_full_view_transforms_mask_covers_the_whole_image(t):
    _, mask = t.deaugment(t.augment_dense(torch.randn(1, 2, *SIZE)), SIZE)
    assert mask.all()


def test_crop_mask_is_exactly_the_crop_window():
    t = tta.Crop(3, 5, 7, 9)
    _, mask = t.deaugment(t.augment_dense(torch.randn(1, 1, *SIZE)), SIZE)
    want = torch.zeros(SIZE, dtype=torch.bool)
    want[3:10, 5:14] = True
    assert torch.equal(mask[0, 0], want)


@pytest.mark.parametrize("pos,top,left", [("tl", 0, 0), ("tr", 0, 3), ("bl", 2, 0), ("br", 2, 3), ("c", 1, 1)])
def test_named_crops_sit_where_their_name_says(pos, top, left):
    t = tta.Crop.at(pos, 0.875, SIZE)  # 16x20 -> 14x17
    assert (t.h, t.w, t.top, t.left) == (14, 17, top, left)
    assert t.name == f"crop:{pos}:0.875"


def test_translate_mask_drops_the_rows_and_columns_shifted_out():
    t = tta.Translate(2, -3)
    x = torch.arange(16 * 20, dtype=torch.float32).view(1, 1, *SIZE)
    v = t.augment(x)
    assert torch.equal(v[0, 0, 2:, :17], x[0, 0, :14, 3:])  # content moved 2 down, 3 left
    assert (v[0, 0, :2] == 0).all() and (v[0, 0, :, 17:] == 0).all()  # filled with the mean (0)
    _, mask = t.deaugment(v, SIZE)
    want = torch.zeros(SIZE, dtype=torch.bool)
    want[:14, 3:] = True
    assert torch.equal(mask[0, 0], want)


@pytest.mark.parametrize("factor", [0.75, 1.25, 2.0])
def test_scale_round_trip_is_within_tolerance_on_a_smooth_map(factor):
    t = tta.Scale(factor)
    assert t.dense and not t.exact
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(40.0), indexing="ij")
    d = (torch.sin(yy / 6) + torch.cos(xx / 7)).view(1, 1, 32, 40).double()  # range ~4
    v = t.augment_dense(d)
    assert v.shape[-2:] == (math.floor(32 * factor + 0.5), math.floor(40 * factor + 0.5))
    back, mask = t.deaugment(v, (32, 40))
    assert mask.all()
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (back - d)[inner].abs().max() < 0.02  # 0.5% of the range away from the border
    assert (back - d).abs().max() < 0.1


def test_chain_with_scale_renormalises_coverage():
    t = tta.Chain(tta.Scale(1.25), tta.Crop(2, 2, 16, 16))
    d = torch.full((1, 1, 16, 16), 3.0, dtype=torch.float64)
    back, mask = t.deaugment(t.augment_dense(d), (16, 16))
    assert not t.exact and mask.any() and not mask.all()
    assert torch.allclose(back[mask.expand_as(back)], torch.tensor(3.0, dtype=torch.float64), atol=1e-9)


def test_hflip_twice_is_identity():
    x = _image()
    f = tta.HFlip()
    assert torch.equal(f.augment(f.augment(x)), x)
    assert torch.equal(tta.Chain(f, f).augment(x), x)


def test_chain_of_crop_and_hflip_is_the_mirrored_crop():
    x = _image()
    tl, tr = tta.Crop.at("tl", 0.875, SIZE), tta.Crop.at("tr", 0.875, SIZE)
    c = tta.Chain(tl, tta.HFlip())
    assert c.name == "crop:tl:0.875>hflip" and c.dense and c.exact
    assert torch.equal(c.augment(x), tr.augment(tta.HFlip().augment(x)))


PHOTOMETRIC = [
    tta.Brightness(0.5, MEAN3, STD3),
    tta.Brightness(-0.5, MEAN3, STD3),
    tta.Contrast(0.5, MEAN3, STD3),
    tta.Contrast(-0.5, MEAN3, STD3),
    tta.Sharpness(0.9, MEAN3, STD3),
    tta.Solarize(0.5, MEAN3, STD3),
    tta.Posterize(3, MEAN3, STD3),
    tta.AutoContrast(MEAN3, STD3),
    tta.Equalize(MEAN3, STD3),
    tta.Rotate(15),
    tta.ShearX(0.2),
    tta.ShearY(-0.2),
    tta.Translate(0, 4),
]


@pytest.mark.parametrize("t", PHOTOMETRIC, ids=lambda t: t.name)
def test_ops_keep_shape_and_dtype_and_change_the_image(t):
    for dtype in (torch.float32, torch.float64):
        x = _image().to(dtype)
        out = t.augment(x)
        assert out.shape == x.shape and out.dtype == dtype
        assert (out - x).abs().max() > 0.05


@pytest.mark.parametrize("op", [o for o in tta.RANDAUGMENT_OPS if o not in ("autocontrast", "equalize")])
def test_randaugment_op_at_magnitude_zero_is_identity(op):
    x = _image()
    for sign in (1, -1):
        t = tta.randaugment_op(op, 0, SIZE, MEAN3, STD3, sign)
        assert torch.equal(t.augment(x), x), t.name


@pytest.mark.parametrize("op", tta.RANDAUGMENT_OPS)
def test_randaugment_op_at_positive_magnitude_changes_a_grey_image(op):
    x = _image(c=1)
    t = tta.randaugment_op(op, 5, SIZE, MEAN1, STD1)
    out = t.augment(x)
    assert out.shape == x.shape and (out - x).abs().max() > 0.01, t.name


def test_photometric_op_on_wrong_channel_count_is_an_input_error():
    with pytest.raises(InputError, match="3-channel"):
        tta.Brightness(0.3, MEAN3, STD3).augment(_image(c=1))
    with pytest.raises(InputError, match="1 or 3"):
        tta.Contrast(0.3, (0.5, 0.5), (0.2, 0.2)).augment(torch.zeros(1, 2, 8, 8))


def test_non_dense_transform_refuses_dense_calls():
    t = tta.Rotate(10)
    assert not t.dense
    with pytest.raises(UndiscardError, match="not a dense"):
        t.augment_dense(torch.zeros(1, 1, *SIZE))
    with pytest.raises(UndiscardError, match="needs dense transforms.*rotate"):
        tta.deaugment_mean([torch.zeros(1, 1, *SIZE)], [t], SIZE)


def _policies():
    return {
        "flips": tta.flips(),
        "five_crops": tta.five_crops(SIZE),
        "ten_crops": tta.ten_crops(SIZE),
        "scales": tta.scales(),
        "pool": tta.augmentation_pool(SIZE, MEAN3, STD3, n=45),
        "pool_grey": tta.augmentation_pool(SIZE, MEAN1, STD1, n=45),
        "pool_seed": tta.augmentation_pool(SIZE, MEAN3, STD3, n=45, seed=3),
        "pool_tiny": tta.augmentation_pool((8, 8), MEAN1, STD1, n=30),
    }


@pytest.mark.parametrize("name", list(_policies()))
def test_policy_names_are_unique_and_identity_is_first(name):
    pol = _policies()[name]
    names = [t.name for t in pol]
    assert names[0] == "identity"
    assert len(set(names)) == len(names)


def test_policy_sizes_and_pool_order():
    assert [len(tta.policy_by_name(n, SIZE, MEAN3, STD3)) for n in tta.POLICIES] == [2, 6, 12, 6, 20]
    pool = tta.augmentation_pool(SIZE, MEAN3, STD3, n=45)
    assert [t.name for t in pool[:7]] == ["identity", "hflip"] + [f"crop:{p}:0.875" for p in tta.CROP_POSITIONS]
    assert [t.name for t in tta.augmentation_pool(SIZE, MEAN3, STD3, n=12)] == [t.name for t in pool[:12]]
    assert [t.name for t in tta.augmentation_pool(SIZE, MEAN3, STD3, n=20, seed=0)] == [t.name for t in pool[:20]]
    seeded = tta.augmentation_pool(SIZE, MEAN3, STD3, n=45, seed=3)
    assert sorted(t.name for t in seeded) == sorted(t.name for t in pool) and seeded[:7] == pool[:7]
    assert [t.name for t in seeded] == [t.name for t in tta.augmentation_pool(SIZE, MEAN3, STD3, n=45, seed=3)]
    with pytest.raises(InputError, match="45 candidates"):
        tta.augmentation_pool(SIZE, MEAN3, STD3, n=46)
    with pytest.raises(InputError, match="unknown TTA policy"):
        tta.policy_by_name("sevencrops", SIZE, MEAN3, STD3)


@pytest.mark.parametrize("name", list(_policies()))
def test_transforms_by_names_round_trips(name):
    size = (8, 8) if name == "pool_tiny" else SIZE
    mean, std = (MEAN1, STD1) if name in ("pool_grey", "pool_tiny") else (MEAN3, STD3)
    pol = _policies()[name]
    rebuilt = tta.transforms_by_names([t.name for t in pol], size, mean, std)
    assert rebuilt == pol
    x = _image(c=len(mean), size=size)
    for a, b in zip(pol, rebuilt):
        assert torch.equal(a.augment(x), b.augment(x)), a.name


def test_transforms_by_names_unknown_or_noncanonical_name_is_an_input_error():
    with pytest.raises(InputError, match=r"unknown augmentation name 'twirl'.*valid names: identity, hflip"):
        tta.transforms_by_names(["identity", "twirl"], SIZE, MEAN3, STD3)
    with pytest.raises(InputError, match="canonical"):
        tta.transforms_by_names(["scale:1.250"], SIZE, MEAN3, STD3)
    assert tta.transforms_by_names(["crop:1,2:5x6>hflip"], SIZE, MEAN3, STD3)[0] == tta.Chain(
        tta.Crop(1, 2, 5, 6), tta.HFlip()
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: tta.Crop(-1, 0, 4, 4),
        lambda: tta.Crop(0, 0, 0, 4),
        lambda: tta.Crop(0, 0, 4.5, 4),
        lambda: tta.Crop(10, 0, 8, 4).augment(torch.zeros(1, 1, *SIZE)),  # rows 10..17 of 16
        lambda: tta.Crop(0, 15, 4, 6).deaugment(torch.zeros(1, 1, 4, 6), SIZE),  # columns 15..20 of 20
        lambda: tta.Crop.at("tl", 1.5, SIZE),
        lambda: tta.Crop.at("middle", 0.5, SIZE),
        lambda: tta.Crop.at("tl", 0.875, SIZE).augment(torch.zeros(1, 1, 20, 20)),  # built for 16x20
        lambda: tta.Translate(1.5, 0),
        lambda: tta.Translate(0, 20).augment(torch.zeros(1, 1, *SIZE)),  # everything out of view
        lambda: tta.Scale(0),
        lambda: tta.HFlip().augment(torch.zeros(3, 8, 8)),
        lambda: tta.HFlip().deaugment(torch.zeros(1, 1, 8, 8), SIZE),
    ],
)
def test_bad_transform_arguments_are_input_errors(build):
    with pytest.raises(InputError):
        build()


def test_deaugment_mean_averages_only_the_views_covering_each_pixel():
    d = torch.randn(2, 3, *SIZE, dtype=torch.float64)
    ts = [tta.Identity(), tta.HFlip(), tta.Crop(0, 0, 8, 8), tta.Translate(0, 5)]
    views = [t.augment_dense(d) + i for i, t in enumerate(ts)]  # view i is off by +i
    out = tta.deaugment_mean(views, ts, SIZE)
    want = torch.full(SIZE, 1 / 2, dtype=torch.float64)  # (0 + 1) / 2 with identity, hflip
    want[:, :15] = (0 + 1 + 3) / 3  # translate:+0,+5 covers columns 0..14 of the input
    want[:8, :8] = (0 + 1 + 2 + 3) / 4
    assert torch.allclose(out - d, want.expand_as(d))
    with pytest.raises(InputError, match="one view per transform"):
        tta.deaugment_mean(views[:2], ts, SIZE)
