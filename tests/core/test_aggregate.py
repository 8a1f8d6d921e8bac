"""Aggregation schemes on a real (random-init) ResNet-18 and real images: shapes, each scheme against the
embeddings computed patch by patch, chunked extraction against the whole-batch one, each distinct patch
embedded once, deterministic random evaluation patches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bagssl_core import crops as C
from bagssl_core import patches as P
from bagssl_core.aggregate import SCHEMES, embed_views, extract_features, patches_per_image, view_patches
from bagssl_core.config import NATIVE_IMAGE_SIZE, TrainConfig, load_config, validate_config
from bagssl_core.data import FASHION_MNIST_SYSTEM_DIR, load_split
from bagssl_core.models import BagSSLModel, FrozenGraph, build_model, inference_graph

ALL = list(SCHEMES)
BAG_SCHEMES = [s for s in ALL if SCHEMES[s].view == "bag"]
CPU = torch.device("cpu")
TOL = {"rtol": 1e-4, "atol": 1e-5}  # the same patches in batches of another size: float32 reassociation


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            "fashion_mnist",
            marks=pytest.mark.skipif(
                not (FASHION_MNIST_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                reason=f"Fashion-MNIST not installed in {FASHION_MNIST_SYSTEM_DIR}",
            ),
        ),
        "synthetic",
    ],
)
def cfg(request: pytest.FixtureRequest) -> TrainConfig:
    # 12-px patches with a 6-px stride: the grid gets a last row flush with the border on both image
    # sizes (28 and 32), and every patch is resized to 16 px.
    return load_config(
        None,
        [
            f"data.name={request.param}",
            "data.test_subset=8",
            *(["data.synthetic_test=8"] if request.param == "synthetic" else []),
            "patch.size=12",
            "patch.input_size=16",
            "model.projector=[16, 16]",
            f"eval.aggregation={ALL}",
            "eval.multiscale_sizes=[0.5, 1.0]",
        ],
    )


@pytest.fixture(scope="module")
def model() -> BagSSLModel:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.projector=[16, 16]"])
    return build_model(cfg.model, cfg.in_channels).eval()


@pytest.fixture(scope="module")
def batches(cfg: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of 4 real uint8 test images (3 channels) with their labels."""
    data = load_split(cfg.data, "test", cfg.run.seed)
    assert len(data) == 8 and data.image_size == NATIVE_IMAGE_SIZE[cfg.data.name]
    return [data.__getitems__(range(0, 4)), data.__getitems__(range(4, 8))]


def images_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([x for x, _ in batches])


def features(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig, schemes: list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return extract_features(model, batches, cfg, schemes, CPU, P.channel_stats(cfg.data.name, 3))


@torch.no_grad()
def embed_one_by_one(
    model: BagSSLModel, patches: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) of shape (B, G, D) for patches (B, G, C, S, S), one patch position at a time."""
    mean, std = P.channel_stats(cfg.data.name, 3)
    hs, zs = zip(
        *(model(P.normalize(patches[:, g], mean, std)) for g in range(patches.shape[1])), strict=True
    )
    return torch.stack(hs, dim=1), torch.stack(zs, dim=1)


def test_every_scheme_gives_one_row_per_image(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    model.train()
    try:
        feats, labels = features(model, batches, cfg, ALL)
        assert model.training  # probed in eval mode, handed back in the mode it came in
    finally:
        model.eval()
    assert set(feats) == set(ALL)
    for scheme, f in feats.items():
        dim = model.proj_dim if scheme == "mean_proj" else model.embed_dim
        assert f.shape == (8, dim) and f.dtype == torch.float32, scheme
        assert torch.isfinite(f).all(), scheme
    assert (model.embed_dim, model.proj_dim) == (512, 16)
    assert torch.equal(labels, torch.cat([y for _, y in batches]))


def test_bag_schemes_reduce_the_grid_patch_embeddings(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    feats, _ = features(model, batches, cfg, BAG_SCHEMES)
    grid = C.grid_patches(images_of(batches), cfg.eval_patch_px, cfg.eval_stride, cfg.input_size)
    side = NATIVE_IMAGE_SIZE[cfg.data.name]
    # starts 0, 6, 12, ... plus one flush with the border: 4 per side on 28 px, 5 on 32 px
    assert grid.shape == (8, {28: 16, 32: 25}[side], 3, 16, 16)
    h, z = embed_one_by_one(model, grid, cfg)
    torch.testing.assert_close(feats["mean_emb"], h.mean(1), **TOL)
    torch.testing.assert_close(feats["max_emb"], h.amax(1), **TOL)
    torch.testing.assert_close(feats["mean_proj"], z.mean(1), **TOL)


def test_single_patch_and_multiscale_schemes(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    feats, _ = features(model, batches, cfg, ["centre", "whole", "multiscale"])
    images = images_of(batches)
    centre = C.centre_patch(images, cfg.eval_patch_px, cfg.input_size)
    torch.testing.assert_close(feats["centre"], embed_one_by_one(model, centre, cfg)[0][:, 0], **TOL)
    whole = C.whole_image(images, cfg.input_size)
    torch.testing.assert_close(feats["whole"], embed_one_by_one(model, whole, cfg)[0][:, 0], **TOL)
    half = cfg.image_size // 2
    bag = torch.cat(
        [C.grid_patches(images, half, half // 2, cfg.input_size), whole], dim=1
    )  # sizes 0.5 (a 3x3 grid) and 1.0 (the whole image)
    assert bag.shape[1] == 10
    torch.testing.assert_close(feats["multiscale"], embed_one_by_one(model, bag, cfg)[0].mean(1), **TOL)


def test_each_distinct_patch_is_embedded_once(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        features(model, batches, cfg, BAG_SCHEMES)
        grid = len(C.grid_boxes(cfg.image_size, cfg.eval_patch_px, cfg.eval_stride))
        assert sizes == [4 * grid, 4 * grid]  # one pass per batch for mean_emb, mean_proj and max_emb
        sizes.clear()
        features(model, batches, cfg, ALL)
        # The multiscale bag (sizes 0.5 and 1.0) shares its 1.0 scale with the whole image; the centre
        # patch (at 8 on 28 px, 10 on 32 px) is off the grid (starts 0, 6, 12, 16 or 0, 6, 12, 18, 20).
        assert patches_per_image(cfg, ALL) == grid + 1 + 1 + 10 - 1
        assert sum(sizes) == 8 * patches_per_image(cfg, ALL)
    finally:
        hook.remove()


def test_the_cpu_graph_extracts_the_eager_models_features(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    """eval.cpu_graph's frozen graph (BatchNorm folded into the convolutions) gives every scheme's features
    of the eager model, in chunks of every size the extraction forwards, the last one smaller."""
    graph = inference_graph(model, cfg.in_channels, cfg.input_size)
    assert isinstance(graph, FrozenGraph)  # built, not the eager fallback
    ccfg = validate_config({"eval": {"patch_chunk": 7}}, defaults=cfg.model_dump())
    eager, labels = features(model, batches, ccfg, ALL)
    frozen, graph_labels = features(graph, batches, ccfg, ALL)
    assert torch.equal(labels, graph_labels)
    for s in ALL:
        torch.testing.assert_close(frozen[s], eager[s], **TOL, msg=s)


@torch.no_grad()
def unchunked_features(
    model: BagSSLModel, images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """Extraction as it was before chunking: every patch of a view at once, one forward per view."""
    mean, std = P.channel_stats(cfg.data.name, 3)
    out = {}
    for view in dict.fromkeys(SCHEMES[s].view for s in ALL):
        x = view_patches(images, view, cfg, gen)
        h, z = model(P.normalize(x.flatten(0, 1), mean, std))
        for s in ALL:
            if SCHEMES[s].view == view:
                out[s] = SCHEMES[s].reduce(h.view(*x.shape[:2], -1), z.view(*x.shape[:2], -1))
    return out


@pytest.mark.parametrize(("patches", "chunk"), [("grid", 1), ("grid", 7), ("random", 5)])
def test_chunked_extraction_equals_the_whole_batch_at_once(
    model: BagSSLModel,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    chunk: int,
    patches: str,
) -> None:
    """Whatever eval.patch_chunk, every scheme's features are those of the unchunked extraction, and no
    forward (hence no cut-out batch of patches) is larger than the chunk. One batch of 4 images."""
    batches = batches[:1]
    update = {"eval": {"patch_chunk": chunk, "patches": patches, "multiscale_sizes": [0.5, 1.0, 12]}}
    ccfg = validate_config(update, defaults=cfg.model_dump())
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        feats, _ = features(model, batches, ccfg, ALL)
    finally:
        hook.remove()
    assert max(sizes) <= chunk
    gen = torch.Generator().manual_seed(ccfg.run.seed + 7919) if patches == "random" else None
    expected = [unchunked_features(model, x, ccfg, gen) for x, _ in batches]
    for s in ALL:
        torch.testing.assert_close(feats[s], torch.cat([e[s] for e in expected]), **TOL, msg=s)


def test_embed_views_gives_every_patch_in_view_order(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    images = batches[0][0]
    mean_std = P.channel_stats(cfg.data.name, 3)
    h, z = embed_views(model, images, cfg, ["multiscale"], mean_std, chunk=3)["multiscale"]
    bag = view_patches(images, "multiscale", cfg, None)
    h1, z1 = embed_one_by_one(model, bag, cfg)
    torch.testing.assert_close(h, h1, **TOL)
    torch.testing.assert_close(z, z1, **TOL)


def test_six_schemes_read_the_quick_presets_patches_once() -> None:
    """The quick preset (14-px patches, stride 7, on 28 px): the multiscale bag holds most of the patches
    (its 7-px scale alone is an 8x8 grid); its 14-px scale is the grid and the centre patch lies on it."""
    cfg = load_config(None, [f"eval.aggregation={ALL}"], preset="quick")
    alone = {s: patches_per_image(cfg, [s]) for s in ALL}
    assert alone == {"mean_emb": 9, "mean_proj": 9, "max_emb": 9, "centre": 1, "whole": 1, "multiscale": 77}
    assert patches_per_image(cfg, ALL) == 9 + 1 + 64 + 4  # grid (with centre), whole, 7 px and 21 px


def test_random_eval_patches_are_deterministic(
    model: BagSSLModel, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig
) -> None:
    rnd = validate_config({"eval": {"patches": "random", "num_patches": 5}}, defaults=cfg.model_dump())
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        first, _ = features(model, batches, rnd, BAG_SCHEMES)
    finally:
        hook.remove()
    assert sizes == [4 * 5, 4 * 5]
    again, _ = features(model, batches, rnd, BAG_SCHEMES)
    for scheme in BAG_SCHEMES:
        assert torch.equal(first[scheme], again[scheme]), scheme
    other_seed = TrainConfig.model_validate({**rnd.model_dump(), "run": {**rnd.run.model_dump(), "seed": 1}})
    moved, _ = features(model, batches, other_seed, ["mean_emb"])
    assert not torch.allclose(moved["mean_emb"], first["mean_emb"])  # the seed, not chance, fixes them
