"""Baselines on real Fashion-MNIST images: raw pixels scored by the very probe a model is scored by (checked
against `knn_classify` on the flattened, normalised images), and the random-init baseline equal to
`eval --random-init` on the same config, through the `baselines` command."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from bagssl_core.baselines import (
    PIXEL_SIDE,
    PIXELS,
    RANDOM_INIT,
    RAW_PIXELS,
    pixel_features,
    pixel_size,
    score_raw_pixels,
)
from bagssl_core.config import load_config
from bagssl_core.data import FASHION_MNIST_SYSTEM_DIR
from bagssl_core.metrics import ProbeKey, baseline_name, parse_baseline, probe_keys
from bagssl_core.patches import CHANNEL_STATS
from bagssl_core.probes import knn_classify
from bagssl_core.train import load_splits

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_SYSTEM_DIR}",
)
# 300 training images (40 of them validation) and 60 test images; the centre patch, resized to 8 px, keeps
# the random-init ResNet's forward passes few and small.
SMALL = [
    "data.train_subset=300", "data.test_subset=60", "data.batch_size=64", "data.val_size=40",
    "patch.size=14", "patch.input_size=8", "model.projector=[16,16]", "eval.aggregation=[centre]",
    "eval.probes=[knn, linear]", "eval.linear_epochs=2", "run.threads=1",
]  # fmt: skip


def test_raw_pixel_knn_is_knn_on_the_flattened_normalised_images() -> None:
    cfg = load_config(None, SMALL)
    train, evals = splits = load_splits(cfg)
    found = score_raw_pixels(cfg, splits)
    mean, std = CHANNEL_STATS["fashion_mnist"]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def flat(data: object) -> torch.Tensor:
        return ((data.images.float() / 255 - m) / s).flatten(1)  # type: ignore[attr-defined]

    for split, data in evals.items():
        direct = knn_classify(flat(train), train.labels, flat(data), data.labels, 10, 20, 0.07)
        for stat in ("top1", "top5"):
            assert found[ProbeKey(split, "knn", stat, PIXELS)] == pytest.approx(direct[stat], abs=1e-9)
    assert set(found) == set(probe_keys("val", ["knn", "linear"], [PIXELS])) | set(
        probe_keys("test", ["knn", "linear"], [PIXELS])
    )
    assert 40 < found[ProbeKey("val", "linear", "top1", PIXELS)] <= 100


def test_pixel_features_follow_the_normalise_switch() -> None:
    cfg = load_config(None, [*SMALL, "patch.aug.normalize=false"])
    train, _ = load_splits(cfg)
    feats, labels = pixel_features(train, cfg)
    assert feats.shape == (260, 3 * 28 * 28) and torch.equal(labels, train.labels)
    torch.testing.assert_close(feats, train.images.float().flatten(1) / 255)  # type: ignore[attr-defined]


def test_pixel_features_of_large_images_are_averaged_down_to_32_px() -> None:
    """Fashion-MNIST upsampled to 96 px: the features are the 96-px images area-averaged to 32 px, so the
    feature matrix stays N x 3 x 32 x 32 floats whatever the side; the images' own size only with side=None."""
    cfg = load_config(None, [*SMALL, "data.image_size=96", "data.train_subset=100", "data.val_size=10"])
    train, _ = load_splits(cfg)
    feats, labels = pixel_features(train, cfg)
    assert PIXEL_SIDE == 32 and feats.shape == (90, 3 * 32 * 32) and torch.equal(labels, train.labels)
    mean, std = CHANNEL_STATS["fashion_mnist"]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    images = train.images.float() / 255  # type: ignore[attr-defined]
    expected = ((F.avg_pool2d(images, 3) - m) / s).flatten(1)  # 96 -> 32 px is 3x3 blocks averaged
    torch.testing.assert_close(feats, expected)
    full, _ = pixel_features(train, cfg, side=None)
    torch.testing.assert_close(full, ((images - m) / s).flatten(1))


@pytest.mark.parametrize(
    ("size", "side", "expected"),
    [((28, 28), 32, (28, 28)), ((224, 224), 32, (32, 32)), ((96, 64), 32, (32, 21)), ((64, 96), 32, (21, 32)),
     ((224, 224), None, (224, 224)), ((500, 1), 32, (32, 1))],
)  # fmt: skip
def test_pixel_size_keeps_the_aspect_and_never_grows(
    size: tuple[int, int], side: int | None, expected: tuple[int, int]
) -> None:
    assert pixel_size(*size, side) == expected


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bagssl_core", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_baselines_command_matches_eval_random_init(tmp_path: Path) -> None:
    """Both baselines under their metric names; the random-init one is `eval --random-init` exactly."""
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(load_config(None, SMALL).model_dump(mode="json")))
    commands = {
        "baselines": ["baselines", "--config", "small.yaml", "--out", "baselines.json"],
        "random": ["eval", "--random-init", "--config", "small.yaml", "--out", "random.json"],
        "bad": ["baselines", "--config", "small.yaml", "patch.sise=3"],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(commands, pool.map(lambda a: cli(a, tmp_path), commands.values()), strict=True))
    for name in ("baselines", "random"):
        assert procs[name].returncode == 0, procs[name].stderr
    found = json.loads((tmp_path / "baselines.json").read_text())
    random = json.loads((tmp_path / "random.json").read_text())
    keys = [
        *probe_keys("val", ["knn", "linear"], ["centre"]),
        *probe_keys("test", ["knn", "linear"], ["centre"]),
    ]
    assert {baseline_name(RANDOM_INIT, k): random[str(k)] for k in keys} == {
        n: v for n, v in found.items() if parse_baseline(n) and parse_baseline(n)[0] == RANDOM_INIT
    }
    assert {parse_baseline(n)[0] for n in found} == {RAW_PIXELS, RANDOM_INIT}  # type: ignore[index]
    assert baseline_name(RAW_PIXELS, ProbeKey("val", "knn", "top1", PIXELS)) in found
    out = procs["baselines"].stdout
    assert "raw_pixels:" in out and "random_init:" in out and "val (n=40)" in out and "test (n=60)" in out
    bad = procs["bad"]
    assert bad.returncode == 2 and bad.stderr.strip() == "error: overrides: patch.sise: unknown key", (
        bad.stderr
    )
