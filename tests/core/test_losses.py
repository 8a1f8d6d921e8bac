"""Losses against formulas re-computed by hand, the official VICReg and EMP-SSL code, gradients, symmetries,
shape errors, and 2 gloo processes against one process on the whole batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bagssl_core.config import BagVICRegConfig, TCRConfig, VICRegConfig, load_config
from bagssl_core.losses import (
    BagVICRegLoss,
    LossOutput,
    TCRLoss,
    VICRegLoss,
    bag_invariance,
    bag_vicreg_loss,
    build_loss,
    tcr_loss,
    vicreg_loss,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
# (B, N, D): D <= B and D > B take the two branches of the covariance and coding-rate products.
SHAPES = [(7, 3, 4), (4, 2, 6)]


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def close(actual: torch.Tensor, expected: float | torch.Tensor) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **TOL)


# --- references written from the formulas with Python loops over plain floats ---------------------------


def ref_var_hinge(rows: list[list[float]]) -> float:
    """mean_d relu(1 - sqrt(unbiased var_b + 1e-4)) of a B×D list."""
    b, d = len(rows), len(rows[0])
    out = 0.0
    for k in range(d):
        col = [rows[n][k] for n in range(b)]
        m = sum(col) / b
        var = sum((x - m) ** 2 for x in col) / (b - 1)
        out += max(0.0, 1.0 - math.sqrt(var + 1e-4))
    return out / d


def ref_cov_offdiag(rows: list[list[float]]) -> float:
    """sum_{j!=k} cov_jk^2 / D of a B×D list, covariance normalised by B - 1."""
    b, d = len(rows), len(rows[0])
    means = [sum(rows[n][k] for n in range(b)) / b for k in range(d)]
    out = 0.0
    for j in range(d):
        for k in range(d):
            if j != k:
                c = sum((rows[n][j] - means[j]) * (rows[n][k] - means[k]) for n in range(b)) / (b - 1)
                out += c * c
    return out / d


def ref_bag_vicreg(z: torch.Tensor, lam: float, mu: float, nu: float) -> dict[str, float]:
    zl = z.tolist()
    b, n, d = z.shape
    inv = 0.0
    for img in zl:
        for k in range(d):
            m = sum(img[i][k] for i in range(n)) / n
            inv += sum((img[i][k] - m) ** 2 for i in range(n))
    inv /= b * n * d
    var = sum(ref_var_hinge([zl[r][i] for r in range(b)]) for i in range(n)) / n
    cov = sum(ref_cov_offdiag([zl[r][i] for r in range(b)]) for i in range(n)) / n
    return {"total": lam * inv + mu * var + nu * cov, "invariance": inv, "variance": var, "covariance": cov}


def ref_vicreg(a: torch.Tensor, b: torch.Tensor, lam: float, mu: float, nu: float) -> dict[str, float]:
    al, bl = a.tolist(), b.tolist()
    bsz, d = a.shape
    inv = sum((al[r][k] - bl[r][k]) ** 2 for r in range(bsz) for k in range(d)) / (bsz * d)
    var = (ref_var_hinge(al) + ref_var_hinge(bl)) / 2
    cov = ref_cov_offdiag(al) + ref_cov_offdiag(bl)
    return {"total": lam * inv + mu * var + nu * cov, "invariance": inv, "variance": var, "covariance": cov}


def ref_tcr(z: torch.Tensor, eps: float, tcr_w: float, inv_w: float) -> dict[str, float]:
    b, n, d = z.shape
    zl = []
    for img in z.tolist():
        zl.append([[x / math.sqrt(sum(y * y for y in p)) for x in p] for p in img])
    rate = 0.0
    for i in range(n):
        m = np.eye(d)
        for j in range(d):
            for k in range(d):
                m[j, k] += d / (b * eps) * sum(zl[r][i][j] * zl[r][i][k] for r in range(b))
        rate += 0.5 * math.log(np.linalg.det(m))
    rate /= n
    sim = 0.0
    for img in zl:
        mean = [sum(img[i][k] for i in range(n)) / n for k in range(d)]
        mean_norm = math.sqrt(sum(x * x for x in mean))
        for p in img:
            p_norm = math.sqrt(sum(x * x for x in p))
            sim += sum(x * y for x, y in zip(p, mean, strict=True)) / (p_norm * mean_norm)
    sim /= b * n
    return {"total": -tcr_w * rate - inv_w * sim, "coding_rate": rate, "similarity": sim}


def check_against(out: LossOutput, ref: dict[str, float]) -> None:
    close(out.total, ref["total"])
    assert set(out.parts) == set(ref) - {"total"}
    for name, value in out.parts.items():
        assert not value.requires_grad
        close(value, ref[name])


# --- re-written official code ---------------------------------------------------------------------------


def official_vicreg(x: torch.Tensor, y: torch.Tensor, sim: float, std: float, cov: float) -> torch.Tensor:
    """VICReg.forward of facebookresearch/vicreg main_vicreg.py, re-written for one process.

    Source: commit b42aa2327afe19773b4fbd7d3bcb46a9af1e4367 (as stored in our code index). The projector
    output is the input, the gather is the identity and args.batch_size is the batch.
    """
    batch, features = x.shape

    def off_diagonal(m: torch.Tensor) -> torch.Tensor:
        n = m.shape[0]
        return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch - 1)
    cov_y = (y.T @ y) / (batch - 1)
    cov_loss = off_diagonal(cov_x).pow(2).sum() / features + off_diagonal(cov_y).pow(2).sum() / features
    return sim * repr_loss + std * std_loss + cov * cov_loss


def official_emp_ssl(z: torch.Tensor, eps: float, tcr: float, patch_sim: float) -> torch.Tensor:
    """EMP-SSL's training loss (tsb0601/EMP-SSL main.py + loss.py), re-written.

    Source: commit bce1514c61e0fd12984fc3d849024f8cc960b6d4 (as stored in our code index). The encoder
    L2-normalises, patches are stacked patch-major along the batch axis, `cal_TCR` averages
    -TotalCodingRate over the patch chunks and `Similarity_Loss` gives -mean cos to the (unnormalised) mean.
    """
    b, n, d = z.shape
    z_proj = F.normalize(z.transpose(0, 1).reshape(n * b, d), dim=1)
    chunks = z_proj.chunk(n, dim=0)
    avg = torch.stack(chunks).mean(dim=0)
    loss_sim = -sum(F.cosine_similarity(c, avg, dim=1).mean() for c in chunks) / n
    loss_tcr = 0.0
    for c in chunks:
        w = c.T
        loss_tcr = loss_tcr - torch.logdet(torch.eye(d, dtype=z.dtype) + d / (b * eps) * w @ w.T) / 2
    return patch_sim * loss_sim + tcr * loss_tcr / n


# --- values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_bag_vicreg_matches_formula(shape: tuple[int, int, int]) -> None:
    z = randn(*shape, scale=0.8)
    check_against(bag_vicreg_loss(z, 25.0, 15.0, 2.0), ref_bag_vicreg(z, 25.0, 15.0, 2.0))
    check_against(BagVICRegLoss(3.0, 4.0, 5.0)(z), ref_bag_vicreg(z, 3.0, 4.0, 5.0))


@pytest.mark.parametrize("shape", SHAPES)
def test_vicreg_matches_formula_and_official(shape: tuple[int, int, int]) -> None:
    b, _, d = shape
    z_a, z_b = randn(b, d, seed=1, scale=0.8), randn(b, d, seed=2, scale=1.3)
    out = vicreg_loss(z_a, z_b, 25.0, 15.0, 2.0)
    check_against(out, ref_vicreg(z_a, z_b, 25.0, 15.0, 2.0))
    close(out.total, official_vicreg(z_a, z_b, 25.0, 15.0, 2.0))
    module_out = VICRegLoss(25.0, 15.0, 2.0)(torch.stack([z_a, z_b], dim=1))
    close(module_out.total, official_vicreg(z_a, z_b, 25.0, 15.0, 2.0))


@pytest.mark.parametrize("shape", SHAPES)
def test_tcr_matches_formula_and_emp_ssl(shape: tuple[int, int, int]) -> None:
    z = randn(*shape, seed=3)
    check_against(tcr_loss(z, 0.2, 1.0, 200.0), ref_tcr(z, 0.2, 1.0, 200.0))
    check_against(TCRLoss(0.5, 2.0, 3.0)(z), ref_tcr(z, 0.5, 2.0, 3.0))
    close(tcr_loss(z, 0.2, 1.0, 200.0).total, official_emp_ssl(z, 0.2, 1.0, 200.0))


def test_bag_invariance_with_two_patches_is_a_quarter_of_the_two_view_mse() -> None:
    z = randn(5, 2, 3, seed=4)
    close(bag_invariance(z), F.mse_loss(z[:, 0], z[:, 1]) / 4)


def test_losses_run_in_float32_under_bf16_autocast() -> None:
    z = randn(8, 4, 16, seed=5).float()
    for loss in (BagVICRegLoss(), TCRLoss()):
        expected = loss(z).total
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss(z.bfloat16()).total
        assert got.dtype == torch.float32
        # only the bf16 rounding of the input remains
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


# --- gradients -------------------------------------------------------------------------------------------


def test_gradients_match_finite_differences() -> None:
    # scale 0.5 keeps every std below 1, away from the variance hinge's kink
    z = randn(4, 3, 3, seed=6, scale=0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bag_vicreg_loss(t).total, (z,))
    assert torch.autograd.gradcheck(lambda t: tcr_loss(t).total, (z,))
    z2 = randn(4, 2, 3, seed=7, scale=0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: VICRegLoss()(t).total, (z2,))


# --- symmetries ------------------------------------------------------------------------------------------


def test_vicreg_is_symmetric_in_the_views() -> None:
    z_a, z_b = randn(6, 5, seed=8), randn(6, 5, seed=9, scale=2.0)
    ab, ba = vicreg_loss(z_a, z_b), vicreg_loss(z_b, z_a)
    close(ab.total, ba.total)
    for name in ab.parts:
        close(ab.parts[name], ba.parts[name])


@pytest.mark.parametrize("loss", [BagVICRegLoss(), TCRLoss()], ids=["bag_vicreg", "tcr"])
def test_bag_losses_ignore_the_order_of_patches(loss: torch.nn.Module) -> None:
    z = randn(6, 4, 5, seed=10)
    base = loss(z)
    # one order for every image keeps each patch index's batch: the whole loss is unchanged
    close(loss(z[:, torch.tensor([2, 0, 3, 1])]).total, base.total)
    # an order per image mixes patch indices: the per-image term still cannot change
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([img[torch.randperm(4, generator=g)] for img in z])
    local = "invariance" if isinstance(loss, BagVICRegLoss) else "similarity"
    close(loss(shuffled).parts[local], base.parts[local])


def test_identical_patches_have_zero_invariance() -> None:
    z = randn(5, 1, 4, seed=11).expand(5, 3, 4)
    close(bag_vicreg_loss(z).parts["invariance"], 0.0)
    close(tcr_loss(z).parts["similarity"], 1.0)


# --- errors and registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bag_vicreg_loss(randn(4, 3)), "expected z of shape"),
        (lambda: bag_vicreg_loss(randn(4, 1, 3)), "N >= 2"),
        (lambda: bag_vicreg_loss(randn(1, 3, 3)), "at least 2 images"),
        (lambda: tcr_loss(randn(4, 3, 3, 2)), "expected z of shape"),
        (lambda: tcr_loss(randn(4, 1, 3)), "N >= 2"),
        (lambda: tcr_loss(randn(1, 3, 3)), "at least 2 images"),
        (lambda: tcr_loss(randn(4, 3, 3), eps=0.0), "eps > 0"),
        (lambda: TCRLoss(eps=-1.0), "eps > 0"),
        (lambda: VICRegLoss()(randn(4, 3, 5)), r"\(B, 2, D\)"),
        (lambda: VICRegLoss()(randn(4, 5)), r"\(B, 2, D\)"),
        (lambda: VICRegLoss()(randn(1, 2, 5)), "at least 2 images"),
        (lambda: vicreg_loss(randn(4, 5), randn(4, 6)), "differ in shape"),
        (lambda: vicreg_loss(randn(4), randn(4)), "expected views of shape"),
    ],
)
def test_bad_shapes_raise(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_build_loss_from_config() -> None:
    bag = build_loss(
        BagVICRegConfig(inv_weight=3.0, var_weight=4.0, cov_weight=5.0, gather_distributed=False)
    )
    assert isinstance(bag, BagVICRegLoss)
    assert (bag.inv_weight, bag.var_weight, bag.cov_weight, bag.gather_distributed) == (3.0, 4.0, 5.0, False)
    assert isinstance(build_loss(VICRegConfig()), VICRegLoss)
    tcr = build_loss(TCRConfig(eps=0.5, coding_rate_weight=2.0, similarity_weight=7.0))
    assert isinstance(tcr, TCRLoss)
    assert (tcr.eps, tcr.coding_rate_weight, tcr.similarity_weight, tcr.gather_distributed) == (
        0.5,
        2.0,
        7.0,
        True,
    )


def test_each_loss_of_a_train_config_gets_its_own_knobs() -> None:
    """`loss.name` picks the loss config, so the loss built from a run config is the one it names."""
    tcr = build_loss(load_config(None, ["loss.name=tcr", "loss.eps=0.3", "patch.num=2"]).loss)
    assert isinstance(tcr, TCRLoss) and tcr.eps == 0.3
    assert isinstance(build_loss(load_config(None, ["loss.inv_weight=5"]).loss), BagVICRegLoss)
    vicreg = build_loss(load_config(None, ["loss.name=vicreg", "loss.cov_weight=2", "patch.num=2"]).loss)
    assert isinstance(vicreg, VICRegLoss) and vicreg.cov_weight == 2.0


# --- distributed -------------------------------------------------------------------------------------------

WORLD = 2


def _dist_inputs() -> dict[str, torch.Tensor]:
    return {
        "bag_vicreg": randn(8, 3, 5, seed=12),
        "vicreg": randn(8, 2, 5, seed=13),
        "tcr": randn(8, 3, 5, seed=14),
    }


def _dist_losses() -> dict[str, torch.nn.Module]:
    return {
        "bag_vicreg": BagVICRegLoss(gather_distributed=True),
        "vicreg": VICRegLoss(gather_distributed=True),
        "tcr": TCRLoss(gather_distributed=True),
    }


def _dist_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, z in _dist_inputs().items():
            half = z.shape[0] // WORLD
            local = z[rank * half : (rank + 1) * half].clone().requires_grad_()
            out = _dist_losses()[name](local)
            out.total.backward()
            results[name] = {"total": out.total.detach(), "parts": out.parts, "grad": local.grad}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, z in _dist_inputs().items():
        z = z.clone().requires_grad_()
        single = _dist_losses()[name](z)  # no process group: the gather is the identity
        single.total.backward()
        # Each rank's gradient for its own slice is WORLD x the single-process one (local terms are means
        # over half the batch; the gather's backward sums every rank's copy of the global terms), so
        # DDP's average over ranks gives the parameters exactly the single-process gradient.
        close(sum(r[name]["total"] for r in ranks) / WORLD, single.total.detach())
        close(torch.cat([r[name]["grad"] for r in ranks]) / WORLD, z.grad)
        for part, value in single.parts.items():
            close(sum(r[name]["parts"][part] for r in ranks) / WORLD, value)
        # batch statistics are global: every rank sees the single-process value itself
        for part in {"variance", "covariance", "coding_rate"} & set(single.parts):
            for r in ranks:
                close(r[name]["parts"][part], single.parts[part])
