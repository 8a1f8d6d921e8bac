"""Patch sampling and crops (bagssl_core.crops), per-patch augmentation (bagssl_core.augment) and the
training pipeline (bagssl_core.patches), on small real tensors."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from bagssl_core import augment as A
from bagssl_core import crops as C
from bagssl_core import patches as P
from bagssl_core.config import AugConfig, TrainConfig

NO_AUG = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coord_images(b: int = 3, h: int = 12, w: int = 12) -> torch.Tensor:
    """uint8 (B, 3, H, W) whose pixels say where they are: channel 0 = row, 1 = column, 2 = image index."""
    rows = torch.arange(h).view(h, 1).expand(h, w)
    cols = torch.arange(w).view(1, w).expand(h, w)
    return torch.stack([torch.stack([rows, cols, torch.full((h, w), i)]) for i in range(b)]).to(torch.uint8)


def rand_images(b: int = 4, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, side, side), generator=gen(seed), dtype=torch.uint8)


def only(**kw: float) -> AugConfig:
    return AugConfig(**{**NO_AUG, **kw})


# --- positions and crops ---------------------------------------------------------------------------


def test_patch_is_exact_slice_at_its_sampled_position() -> None:
    images = coord_images(b=3, h=12, w=10)
    boxes = C.sample_boxes(3, 7, (12, 10), 5, gen(1))
    patches = C.sample_patches(images, 7, 5, 5, gen(1))  # same seed -> same positions
    assert patches.shape == (3, 7, 3, 5, 5)
    for b in range(3):
        for n in range(7):
            top, left = boxes[b, n].tolist()
            expected = images[b, :, top : top + 5, left : left + 5].float() / 255
            assert torch.equal(patches[b, n], expected)
            # The coordinate encoding makes a wrong offset or image visible, not just a wrong value.
            assert patches[b, n, 0, 0, 0] * 255 == top and patches[b, n, 1, 0, 0] * 255 == left
            assert patches[b, n, 2].mul(255).eq(b).all()


def test_positions_cover_the_valid_range_and_stay_inside() -> None:
    boxes = C.sample_boxes(64, 64, (12, 9), 5, gen(0))
    assert boxes.shape == (64, 64, 2) and boxes.dtype == torch.long
    assert set(boxes[..., 0].unique().tolist()) == set(range(12 - 5 + 1))
    assert set(boxes[..., 1].unique().tolist()) == set(range(9 - 5 + 1))


def test_full_size_patch_is_the_image_and_too_large_patch_is_rejected() -> None:
    images = rand_images(b=2, side=8)
    assert torch.equal(C.sample_patches(images, 3, 8, 8, gen())[:, 0], images.float() / 255)
    with pytest.raises(ValueError, match="does not fit"):
        C.sample_boxes(2, 3, (8, 8), 9, gen())


@pytest.mark.parametrize("out_size", [6, 14])
def test_resized_patches_shape_range_and_constant_image(out_size: int) -> None:
    images = rand_images(b=2, side=12)
    x = C.sample_patches(images, 5, 8, out_size, gen())
    assert x.shape == (2, 5, 3, out_size, out_size) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    flat = torch.full((1, 3, 12, 12), 77, dtype=torch.uint8)
    assert torch.allclose(C.sample_patches(flat, 4, 8, out_size, gen()), torch.tensor(77 / 255))


def test_sample_patches_is_seeded() -> None:
    images = rand_images()
    a = C.sample_patches(images, 4, 8, 16, gen(3))
    assert torch.equal(a, C.sample_patches(images, 4, 8, 16, gen(3)))
    assert not torch.equal(a, C.sample_patches(images, 4, 8, 16, gen(4)))


# --- two views --------------------------------------------------------------------------------------


def test_view_boxes_fit_and_follow_the_scale_and_ratio() -> None:
    scale = (0.2, 0.6)
    boxes = C.sample_view_boxes(200, 2, (32, 32), scale, gen())
    assert boxes.shape == (200, 2, 4)
    top, left, h, w = boxes.unbind(-1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 32**2
    # Rounding the side to whole pixels moves the area a little outside the drawn range.
    assert area.min() > scale[0] * 0.8 and area.max() < scale[1] * 1.2
    ratio = w.float() / h.float()
    assert ratio.min() > 0.75 * 0.85 and ratio.max() < 4 / 3 / 0.85
    assert len(set(zip(h.flatten().tolist(), w.flatten().tolist(), strict=True))) > 10


def test_crop_resize_boxes_is_exact_for_unscaled_boxes() -> None:
    images = coord_images(b=2, h=12, w=12)
    boxes = torch.tensor([[[0, 0, 12, 12], [3, 5, 6, 6]], [[0, 0, 12, 12], [6, 6, 6, 6]]])
    x = C.crop_resize_boxes(images, boxes, 12)
    assert x.shape == (2, 2, 3, 12, 12)
    assert torch.allclose(x[:, 0], images.float() / 255, atol=1e-6)
    crops = C.crop_resize_boxes(images, boxes[:, 1:], 6)
    assert torch.allclose(crops[0, 0], images[0, :, 3:9, 5:11].float() / 255, atol=1e-6)
    assert torch.allclose(crops[1, 0], images[1, :, 6:12, 6:12].float() / 255, atol=1e-6)


def test_two_views_shape_range_and_seed() -> None:
    images = rand_images(b=3, side=16)
    cfg = small_cfg(loss__name="vicreg", patch__num=2, patch__aug={"normalize": False})
    v = P.train_batch(images, cfg, gen(5))
    assert v.shape == (3, 2, 3, 12, 12) and v.min() >= 0 and v.max() <= 1
    assert torch.equal(v, P.train_batch(images, cfg, gen(5)))
    assert not torch.equal(v, P.train_batch(images, cfg, gen(6)))


# --- evaluation grid, centre, whole -----------------------------------------------------------------


def test_grid_boxes_cover_the_image_with_a_flush_last_row() -> None:
    boxes = C.grid_boxes(28, 16, 8)
    assert sorted(set(boxes[:, 0].tolist())) == [0, 8, 12]  # 12 = 28 - 16, flush with the border
    assert boxes.shape == (9, 2)
    assert C.grid_boxes(28, 14, 7).shape == (9, 2)  # stride lands on the border: nothing added
    assert C.grid_boxes(10, 10, 3).tolist() == [[0, 0]]
    covered = torch.zeros(28, 28, dtype=torch.bool)
    for top, left in C.grid_boxes((28, 20), 9, 6).tolist():
        assert top + 9 <= 28 and left + 9 <= 20
        covered[top : top + 9, left : left + 9] = True
    assert covered[:, :20].all()


def test_grid_patches_are_the_grid_slices_and_deterministic() -> None:
    images = coord_images(b=2, h=10, w=10)
    x = C.grid_patches(images, 4, 3, 4)
    boxes = C.grid_boxes(10, 4, 3)
    assert x.shape == (2, len(boxes), 3, 4, 4)
    for g, (top, left) in enumerate(boxes.tolist()):
        assert torch.equal(x[:, g], images[:, :, top : top + 4, left : left + 4].float() / 255)
    assert torch.equal(x, C.grid_patches(images, 4, 3, 4))
    assert C.grid_patches(images, 4, 3, 8).shape == (2, len(boxes), 3, 8, 8)


def test_centre_patch_is_centred_and_whole_image_resizes() -> None:
    images = coord_images(b=2, h=12, w=12)
    c = C.centre_patch(images, 6, 6)
    assert c.shape == (2, 1, 3, 6, 6)
    assert torch.equal(c[:, 0], images[:, :, 3:9, 3:9].float() / 255)
    odd = C.centre_patch(images, 5, 5)  # margin 7: 3 before, 4 after
    assert odd[0, 0, 0, 0, 0] * 255 == 3 and odd[0, 0, 1, 0, 0] * 255 == 3
    assert C.centre_patch(images, 6, 9).shape == (2, 1, 3, 9, 9)
    assert torch.equal(C.whole_image(images, 12)[:, 0], images.float() / 255)
    w = C.whole_image(images, 5)
    assert w.shape == (2, 1, 3, 5, 5) and w.min() >= 0 and w.max() <= 1


# --- augmentation ------------------------------------------------------------------------------------


def rand_float(m: int = 8, c: int = 3, side: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(m, c, side, side, generator=gen(seed))


def test_probability_zero_is_identity() -> None:
    x = rand_float()
    assert torch.equal(A.augment(x, only(), gen()), x)


def test_flip_p1_is_torch_flip() -> None:
    x = rand_float()
    assert torch.equal(A.augment(x, only(flip_p=1.0), gen()), torch.flip(x, dims=[-1]))


def test_solarize_p1_is_the_formula() -> None:
    x = rand_float()
    assert torch.equal(A.augment(x, only(solarize_p=1.0), gen()), torch.where(x >= 0.5, 1 - x, x))


def test_grayscale_p1_gives_equal_channels_of_luma() -> None:
    x = rand_float()
    y = A.augment(x, only(grayscale_p=1.0), gen())
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert torch.allclose(y, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6)


def test_jitter_with_zero_strength_is_identity() -> None:
    x = rand_float()
    cfg = only(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert torch.equal(A.augment(x, cfg, gen()), x)
    ones = torch.ones(len(x))
    assert torch.equal(A.color_jitter(x, ones, ones, ones), x)
    assert torch.allclose(A.color_jitter(x, hue=torch.zeros(len(x))), x, atol=1e-6)


def test_color_jitter_matches_torchvision_per_sample() -> None:
    x = rand_float(m=6)
    g = gen(2)
    b, c, s = (torch.rand(6, generator=g) * 1.6 + 0.2 for _ in range(3))
    h = torch.rand(6, generator=g) - 0.5
    y = A.color_jitter(x, b, c, s, h)
    for i in range(6):
        ref = TF.adjust_brightness(x[i], float(b[i]))
        ref = TF.adjust_contrast(ref, float(c[i]))
        ref = TF.adjust_saturation(ref, float(s[i]))
        ref = TF.adjust_hue(ref, float(h[i]))
        assert torch.allclose(y[i], ref, atol=1e-5)


def test_jitter_p1_changes_every_sample_and_p0_none() -> None:
    x = rand_float(m=16)
    y = A.augment(x, only(jitter_p=1.0), gen())
    assert all(not torch.allclose(y[i], x[i]) for i in range(16))
    assert y.min() >= 0 and y.max() <= 1


def test_gaussian_blur_matches_torchvision_and_blur_p1_smooths_noise() -> None:
    x = rand_float(m=4, side=16)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    y = A.gaussian_blur(x, sigma, 5)
    for i in range(4):
        assert torch.allclose(y[i], TF.gaussian_blur(x[i], [5, 5], [float(sigma[i])] * 2), atol=1e-6)
    z = A.augment(x, only(blur_p=1.0, blur_sigma=(1.0, 2.0)), gen())
    assert (z.var(dim=(1, 2, 3)) < 0.5 * x.var(dim=(1, 2, 3))).all()
    assert A.blur_kernel_size(28) == 3 and A.blur_kernel_size(96) == 9 and A.blur_kernel_size(224) == 23


def test_augmentation_is_independent_per_sample() -> None:
    x = rand_float(m=64)
    y = A.augment(x, only(flip_p=0.5), gen())
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(64)])
    assert (flipped | kept).all() and 10 < flipped.sum() < 54
    y = A.augment(x, only(solarize_p=0.5, grayscale_p=0.5), gen())
    changed = torch.tensor([not torch.equal(y[i], x[i]) for i in range(64)])
    assert 0 < changed.sum() < 64


def test_full_augmentation_stays_in_unit_range_and_is_seeded() -> None:
    x = rand_float(m=32)
    strong = AugConfig(flip_p=1, jitter_p=1, brightness=2.0, contrast=2.0, saturation=2.0, hue=0.5,
                       grayscale_p=0.5, blur_p=1, solarize_p=0.5)  # fmt: skip
    y = A.augment(x, strong, gen(7))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, A.augment(x, strong, gen(7)))
    assert not torch.equal(y, A.augment(x, strong, gen(8)))


def test_single_channel_augmentation() -> None:
    x = rand_float(m=8, c=1)
    all_on = AugConfig(flip_p=1, jitter_p=1, grayscale_p=1, blur_p=1, solarize_p=1)
    y = A.augment(x, all_on, gen())
    assert y.shape == (8, 1, 12, 12) and y.min() >= 0 and y.max() <= 1
    assert torch.equal(A.augment(x, only(grayscale_p=1.0), gen()), x)


# --- normalisation and the training pipeline ----------------------------------------------------------


def test_channel_stats_and_normalize() -> None:
    assert P.channel_stats("fashion_mnist", 1) == ((0.2860,), (0.3530,))
    assert P.channel_stats("imagefolder", 3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match="3 channels"):
        P.channel_stats("cifar10", 1)
    x = torch.rand(2, 5, 3, 4, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    y = P.normalize(x, mean, std)
    assert torch.allclose(y[:, :, 1], (x[:, :, 1] - 0.2) / 0.25)


def small_cfg(**over: object) -> TrainConfig:
    tree: dict = {
        "data": {"name": "synthetic", "image_size": 16},
        "patch": {"size": 8, "num": 4, "input_size": 12},
    }
    for key, value in over.items():
        section, field = key.split("__")
        tree.setdefault(section, {})[field] = value
    return TrainConfig.model_validate(tree)


def test_train_batch_bag_and_vicreg() -> None:
    images = rand_images(b=3, side=16)
    cfg = small_cfg()
    x = P.train_batch(images, cfg, gen(1))
    assert x.shape == (3, 4, 3, 12, 12)
    assert torch.equal(x, P.train_batch(images, cfg, gen(1)))
    assert not torch.equal(x, P.train_batch(images, cfg, gen(2)))
    # Normalised with the synthetic stats: [0, 1] maps to [-2, 2].
    assert x.min() >= -2 - 1e-6 and x.max() <= 2 + 1e-6
    raw = P.train_batch(images, small_cfg(patch__aug={"normalize": False}), gen(1))
    assert torch.allclose(P.normalize(raw, (0.5,) * 3, (0.25,) * 3), x, atol=1e-6)
    views = P.train_batch(images, small_cfg(loss__name="vicreg", patch__num=2), gen(1))
    assert views.shape == (3, 2, 3, 12, 12)
    with pytest.raises(ValueError, match=r"cfg\.image_size"):
        P.train_batch(rand_images(b=3, side=20), cfg, gen())


def test_train_batch_single_channel_fashion_mnist() -> None:
    cfg = TrainConfig.model_validate({"data": {"to_rgb": False}, "patch": {"size": 14, "num": 3}})
    x = P.train_batch(rand_images(b=2, c=1, side=28), cfg, gen())
    assert x.shape == (2, 3, 1, 28, 28)


def test_cpu_index_path_equals_the_where_path_across_blocks() -> None:
    # 300 samples cross the 256-sample CPU block boundary.
    x = rand_float(m=300, side=8)
    strong = AugConfig(flip_p=0.5, jitter_p=0.5, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    by_index = A.augment(x, strong, gen(9), by_index=True)
    by_where = A.augment(x, strong, gen(9), by_index=False)
    assert torch.allclose(by_index, by_where, atol=1e-6)
    assert torch.equal(by_index, A.augment(x, strong, gen(9)))


@pytest.mark.parametrize(("side", "out_size"), [(16, 28), (28, 16), (12, 12)])
def test_resize_matches_interpolate(side: int, out_size: int) -> None:
    x = rand_float(m=3, side=side)
    ref = torch.nn.functional.interpolate(
        x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=out_size < side
    )
    assert torch.allclose(C._resize(x, out_size), ref.clamp(0, 1), atol=1e-6)


def test_train_batch_in_blocks_equals_the_unblocked_pipeline() -> None:
    # 20 images x 16 patches = 320 samples: CPU blocks of 256 patches split the batch.
    images = rand_images(b=20, side=16)
    cfg = small_cfg(patch__num=16, patch__aug={"blur_p": 0.5, "solarize_p": 0.5})
    g = gen(4)
    patches = C.sample_patches(images, 16, 8, 12, g).view(320, 3, 12, 12)
    expected = P.normalize(A.augment(patches, cfg.patch.aug, g, by_index=False), (0.5,) * 3, (0.25,) * 3)
    assert torch.allclose(P.train_batch(images, cfg, gen(4)), expected.view(20, 16, 3, 12, 12), atol=1e-5)
