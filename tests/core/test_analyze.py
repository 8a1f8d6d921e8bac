"""BagSSL's analyses on real Fashion-MNIST images, checked where the answer is known.

- Whole ≈ mean: a backbone whose whole-image embedding is by construction the mean of its tile embeddings
  (a per-pixel linear map, then global average pooling; tiles that cut the image without overlap, resized
  by integer factors, which keeps each tile's mean) gives cosine 1, while another image's tiles do not.
- Bag curve: on embeddings built as class prototype + independent noise per patch, averaging more patches
  only removes noise, so the curve rises; on a real CNN, its last point (every grid patch) is `mean_emb`.
- Locality: when the query images are the searched images, each query's nearest patch is itself.
- The `analyze` command and `train` with eval.analyses (one tiny real run) agree, and bad input is one line.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

from bagssl_core.aggregate import extract_features
from bagssl_core.analyses import ANALYSES, run_analyses
from bagssl_core.analyses.bag_curve import bag_curve, knn_curve, nested_means
from bagssl_core.analyses.common import AnalysisInputs, derangement, seeded_subset
from bagssl_core.analyses.locality import locality
from bagssl_core.analyses.whole_vs_mean import whole_vs_mean
from bagssl_core.config import TrainConfig, load_config, patch_pixels
from bagssl_core.crops import grid_boxes
from bagssl_core.data import FASHION_MNIST_SYSTEM_DIR, ImageData, load_split
from bagssl_core.metrics import AnalysisKey, analysis_keys, bag_curve_key, bag_sizes, expected_metrics
from bagssl_core.models import BagSSLModel, Projector
from bagssl_core.patches import channel_stats
from bagssl_core.probes import knn_classify
from bagssl_core.train import eval_loader

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_SYSTEM_DIR}",
)
CPU = torch.device("cpu")
# 300 training images (60 of them validation), 14-px grid patches at stride 7: 9 per image.
SMALL = [
    "data.train_subset=300",
    "data.batch_size=64",
    "data.val_size=60",
    "patch.size=14",
    "eval.grid_stride=7",
]


def small_cfg(*overrides: str) -> TrainConfig:
    return load_config(None, [*SMALL, *overrides])


def splits(cfg: TrainConfig) -> tuple[ImageData, ImageData]:
    return load_split(cfg.data, "train", cfg.run.seed), load_split(cfg.data, "val", cfg.run.seed)


def inputs_of(model: nn.Module, cfg: TrainConfig, train: ImageData, val: ImageData) -> AnalysisInputs:
    return AnalysisInputs(model.eval(), cfg, train, val, CPU, channel_stats(cfg.data.name, train.channels))


def pixel_linear_model() -> BagSSLModel:
    """h = mean over pixels of (x_pixel · w + b) with w averaging the (replicated) channels into the first
    dimension and a constant 0.2 in the second: the whole image's h is the mean of its equal tiles' h."""
    conv = nn.Conv2d(3, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, :, 0, 0] = 1 / 3
        conv.bias.copy_(torch.tensor([0.0, 0.2]))
    return BagSSLModel(nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 2, Projector(2, [2]))


def small_cnn() -> BagSSLModel:
    """A real (random-init, seeded) convolutional backbone, small enough for a test."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return BagSSLModel(net, 32, Projector(32, [8]))


# --- whole ≈ mean ----------------------------------------------------------------------------------


def test_whole_is_the_mean_of_its_tiles_by_construction() -> None:
    # input size 28 = the image: the whole image is not resized, 7- and 14-px tiles are upsampled x4, x2
    cfg = small_cfg("patch.input_size=28", "eval.analyses=[whole_vs_mean]", "eval.analysis.scales=[0.25, 14]")
    train, val = splits(cfg)
    result = whole_vs_mean(inputs_of(pixel_linear_model(), cfg, train, val))
    assert result.scales_px == [7, 14] and result.tiles == {7: 16, 14: 4}
    m = result.metrics()
    for px in (7, 14):
        assert result.matched[px].min() > 1 - 1e-5
        assert m[AnalysisKey("whole_vs_mean", "cos_matched", f"{px}px")] == pytest.approx(1, abs=1e-5)
        # another image's tiles: the same family of embeddings, yet clearly further away
        assert m[AnalysisKey("whole_vs_mean", "cos_mismatched", f"{px}px")] < 0.6
        assert m[AnalysisKey("whole_vs_mean", "cos_mismatched_std", f"{px}px")] > 0.2
    assert m[AnalysisKey("whole_vs_mean", "n_images")] == 60


def test_derangement_pairs_every_item_with_another() -> None:
    for n in (2, 3, 60):
        d = derangement(n, seed=5)
        assert sorted(d.tolist()) == list(range(n)) and not (d == torch.arange(n)).any()
        assert torch.equal(d, derangement(n, seed=5))


# --- bag curve -------------------------------------------------------------------------------------


def test_bag_sizes_double_up_to_the_whole_grid() -> None:
    assert bag_sizes(1) == [1]
    assert bag_sizes(9) == [1, 2, 4, 8, 9]
    assert bag_sizes(16) == [1, 2, 4, 8, 16]
    assert bag_sizes(49) == [1, 2, 4, 8, 16, 32, 49]


def test_nested_means_average_the_first_n_patches_of_each_order() -> None:
    h = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    order = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    means = nested_means(h, order, [1, 2, 5])
    for i in range(3):
        for n in (1, 2, 5):
            torch.testing.assert_close(means[n][i], h[i, order[i, :n]].mean(0))
    torch.testing.assert_close(means[5], h.mean(1))


def test_bag_curve_rises_when_patches_are_prototype_plus_noise() -> None:
    """Each patch embedding is its class's prototype plus independent noise: the mean of n patches has
    1/sqrt(n) of the noise, so kNN accuracy must rise with n (and the points are far apart)."""
    gen = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 16, generator=gen)

    def bags(n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n_images) % 10
        return protos[labels, None] + 2.5 * torch.randn(n_images, 16, 16, generator=gen), labels

    (bank_h, bank_y), (val_h, val_y) = bags(500), bags(400)
    sizes = bag_sizes(16)
    orders = [torch.rand(len(h), 16, generator=gen).argsort(1) for h in (bank_h, val_h)]
    bank = nested_means(bank_h, orders[0], sizes)
    val = nested_means(val_h, orders[1], sizes)
    curve = [knn_curve(bank, bank_y, val, val_y, 10, 20, 0.07)[n] for n in sizes]
    assert all(a < b for a, b in itertools.pairwise(curve)), curve
    assert curve[0] < 50 and curve[-1] > 95, curve


def test_bag_curve_ends_at_mean_emb_on_a_real_cnn(tmp_path: Path) -> None:
    """With every grid patch averaged, the curve's representation is `mean_emb`'s: its last point is the
    kNN accuracy of mean_emb features from `extract_features` (up to float summation order)."""
    cfg = small_cfg(
        "eval.analyses=[bag_curve]", "eval.analysis.val_images=null", "eval.analysis.bank_images=null"
    )
    train, val = splits(cfg)
    model = small_cnn().eval()
    result = bag_curve(inputs_of(model, cfg, train, val))
    assert result.sizes == [1, 2, 4, 8, 9] and (result.n_val, result.n_bank) == (60, 240)
    stats = channel_stats(cfg.data.name, 3)
    (bank, bank_y), (feats, y) = (
        extract_features(model, eval_loader(d, 64, 0), cfg, ["mean_emb"], CPU, stats) for d in (train, val)
    )
    direct = knn_classify(bank["mean_emb"], bank_y, feats["mean_emb"], y, 10, 20, 0.07)["top1"]
    assert result.top1[9] == pytest.approx(direct, abs=100 / 60 + 1e-9)  # at most one image apart
    m = result.metrics()
    for n in result.sizes:
        assert m[bag_curve_key(n, "lo")] <= m[bag_curve_key(n)] <= m[bag_curve_key(n, "hi")]
    result.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- locality --------------------------------------------------------------------------------------


def test_each_query_patch_finds_itself_first() -> None:
    """The scored images are the searched images and every one of their patches is searched: each query's
    nearest patch has the query's own pixels, at cosine 1."""
    cfg = small_cfg(
        "eval.analyses=[locality]", "eval.analysis.queries=6", "eval.analysis.neighbours=3",
        "eval.analysis.val_images=null",
    )  # fmt: skip
    _, val = splits(cfg)
    result = locality(inputs_of(small_cnn(), cfg, val, val))
    assert result.n_bank == result.n_bank_total == 60 * 9
    queries, neighbours = result.pixels
    assert queries.shape == (6, 3, 14, 14) and neighbours.shape == (6, 3, 3, 14, 14)
    for q in range(6):
        assert torch.equal(neighbours[q, 0], queries[q])
        assert float(result.similarities[q, 0]) == pytest.approx(1, abs=1e-5)
        assert (result.similarities[q, :-1] >= result.similarities[q, 1:]).all()
    assert torch.equal(result.query_labels, val.labels[[r.image for r in result.queries]])


def test_locality_searches_at_most_its_cap_of_training_patches() -> None:
    cfg = small_cfg(
        "eval.analyses=[locality]", "eval.analysis.train_patches=100", "eval.analysis.val_images=20"
    )
    train, val = splits(cfg)
    result = locality(inputs_of(small_cnn(), cfg, train, val))
    m = result.metrics()
    assert (result.n_bank, result.n_bank_total, result.n_val, result.n_val_patches) == (100, 240 * 9, 20, 180)
    assert m[AnalysisKey("locality", "bank_patches")] == 100
    top1 = AnalysisKey("locality", "patch_knn_top1")
    assert 0 <= m[top1.with_bound("lo")] <= m[top1] <= m[top1.with_bound("hi")] <= 100
    assert len(seeded_subset(240 * 9, 100, 0).unique()) == 100


# --- all of them -----------------------------------------------------------------------------------


def test_run_analyses_reports_every_expected_name(tmp_path: Path) -> None:
    cfg = small_cfg(
        "eval.analyses=[bag_curve, whole_vs_mean, locality]", "eval.analysis.val_images=20",
        "eval.analysis.bank_images=40", "eval.analysis.train_patches=200", "eval.probes=[knn]",
        "eval.analysis.queries=2", "eval.analysis.neighbours=2", "patch.input_size=14",
    )  # fmt: skip
    train, val = splits(cfg)
    report = run_analyses(small_cnn(), cfg, train, val, CPU, cfg.eval.analyses, tmp_path)
    grid = len(grid_boxes(28, 14, 7))
    scales = [patch_pixels(s, 28) for s in cfg.eval.analysis.scales]
    assert list(report.metrics) == analysis_keys(cfg.eval.analyses, grid, scales)
    names = {str(k) for k in report.metrics}
    assert names <= expected_metrics(cfg).at_end
    assert all(AnalysisKey.parse(n) is not None and str(AnalysisKey.parse(n)) == n for n in names)
    assert json.loads((tmp_path / "analyses.json").read_text()) == {
        str(k): v for k, v in report.metrics.items()
    }
    assert set(report.figures) == set(ANALYSES)
    for path in report.figures.values():
        assert path.parent == tmp_path and path.read_bytes()[:4] == b"\x89PNG"
    assert "bag curve" in report.text and "locality" in report.text


def test_analyses_stopped_midway_leave_the_directory_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run over the same directory that is interrupted (Ctrl-C) after its first analysis has run
    changes no file there and leaves no temporary one: figures and `analyses.json` are written together."""
    cfg = small_cfg(
        "eval.analyses=[bag_curve, whole_vs_mean]", "eval.analysis.val_images=20",
        "eval.analysis.bank_images=40", "eval.probes=[knn]", "patch.input_size=14",
    )  # fmt: skip
    train, val = splits(cfg)
    run_analyses(small_cnn(), cfg, train, val, CPU, ["bag_curve", "whole_vs_mean"], tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert sorted(before) == ["analyses.json", "bag_curve.png", "whole_vs_mean.png"]

    def interrupted(inputs: AnalysisInputs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(ANALYSES, "whole_vs_mean", interrupted)
    other = small_cnn()
    torch.nn.init.normal_(next(other.parameters()))  # another model: its bag curve would differ
    with pytest.raises(KeyboardInterrupt):
        run_analyses(other, cfg, train, val, CPU, ["bag_curve", "whole_vs_mean"], tmp_path)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert after == before


def test_analyses_run_again_replace_their_own_numbers_and_keep_the_others(tmp_path: Path) -> None:
    """A later run of some analyses into the same folder: their PNGs and numbers are replaced, and the other
    analyses' numbers stay in analyses.json beside their PNGs, which stay too."""
    cfg = small_cfg(
        "eval.analyses=[bag_curve, whole_vs_mean]", "eval.analysis.val_images=20",
        "eval.analysis.bank_images=40", "eval.probes=[knn]", "patch.input_size=14",
    )  # fmt: skip
    train, val = splits(cfg)
    first = run_analyses(small_cnn(), cfg, train, val, CPU, ["bag_curve", "whole_vs_mean"], tmp_path)
    other = small_cnn()
    torch.nn.init.normal_(next(other.parameters()))
    again = run_analyses(other, cfg, train, val, CPU, ["bag_curve"], tmp_path)
    saved = json.loads((tmp_path / "analyses.json").read_text())
    expected = {str(k): v for k, v in first.metrics.items() if k.analysis == "whole_vs_mean"}
    expected |= {str(k): v for k, v in again.metrics.items()}
    assert saved == expected and expected.keys() == {str(k) for k in first.metrics}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "analyses.json",
        "bag_curve.png",
        "whole_vs_mean.png",
    ]


# --- the command and the training run --------------------------------------------------------------

TINY = [
    "data.name=fashion_mnist", "data.train_subset=160", "data.test_subset=40", "data.batch_size=32",
    "data.val_size=32", "patch.num=2", "patch.size=14", "patch.input_size=8", "model.projector=[32,32]",
    "eval.probes=[knn]", "eval.grid_stride=7", "run.threads=1", "schedule.epochs=1",
    "eval.analyses=[bag_curve,whole_vs_mean,locality]", "eval.analysis.train_patches=300",
    "eval.analysis.queries=2", "eval.analysis.neighbours=2",
]  # fmt: skip


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bagssl_core", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_train_runs_the_analyses_and_analyze_reproduces_them(tmp_path: Path) -> None:
    train = cli(["train", "--out", "run", "--quiet", "--preset", "none", *TINY], tmp_path)
    assert train.returncode == 0, train.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    found = {n: v for n, v in summary.items() if AnalysisKey.parse(n) is not None}
    assert found.keys() == {
        n for n in expected_metrics(load_config(None, TINY)).at_end if n.startswith("analysis/")
    }
    assert sorted(p.name for p in (tmp_path / "run" / "analyses").iterdir()) == [
        "analyses.json", "bag_curve.png", "locality.png", "whole_vs_mean.png",
    ]  # fmt: skip

    bad_input = {
        "no_such_run": (["analyze", "no_such_run"], r"^error: no_such_run: no checkpoint here"),
        "unknown": (["analyze", "run", "--only", "bag_curve,colour"], r"^error: analyze: --only: unknown analysis colour"),
        "model_key": (["analyze", "run", "patch.size=8"], r"^error: analyze: patch\.size: cannot change what the"),
        "bad_value": (["analyze", "run", "eval.analysis.queries=0"], r"eval\.analysis\.queries"),
        "no_analysis": (["analyze", "run", "eval.analyses=[]"], r"^error: analyze: eval\.analyses: an empty list"),
    }  # fmt: skip
    commands = {"again": ["analyze", "run", "--only", "bag_curve,locality", "--out", "again"]}
    commands |= {name: args for name, (args, _) in bad_input.items()}
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(
            zip(commands, pool.map(lambda args: cli(args, tmp_path), commands.values()), strict=True)
        )

    proc = procs["again"]
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "analyses.json").read_text())
    assert again and all(n.startswith(("analysis/bag_curve/", "analysis/locality/")) for n in again)
    assert again == {n: v for n, v in found.items() if n in again}
    assert f"bag_curve: {Path('again') / 'bag_curve.png'}" in proc.stdout
    assert "n=1 " in proc.stdout and "patch-level kNN top-1" in proc.stdout
    for name, (_, message) in bad_input.items():
        bad = procs[name]
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert re.search(message, lines[0]), lines[0]
