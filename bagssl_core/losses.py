"""Self-supervised losses over patch projections: bag VICReg, two-view VICReg, TCR (EMP-SSL).

Each loss is a pure function built from pure per-term functions, wrapped by a thin `nn.Module` that holds
its weights. Every module's forward takes the projections of one step as `z` of shape (B, N, D) — B images,
N patches (or views) per image, D projection dims — and returns a `LossOutput`: the weighted `total` to
backpropagate and the unweighted terms in `parts` (detached), so every term can be logged.

Term functions are written for any shape (batch, ..., dim): statistics are taken over the leading batch
axis separately for every middle index (each patch index) and then averaged over the middle indices.

Precision: the losses run with autocast disabled and in float32 at least (float64 stays float64), because
batch statistics, Gram matrices and log-determinants lose too much in bf16/fp16.

Distributed: with `gather_distributed=True` and an initialised process group, the batch statistics
(variance, covariance, coding rate) are computed on the projections gathered from every rank, with
gradients (`bagssl_core.dist.gather_with_grad`), while the per-image terms (invariance, similarity) stay
local, like official VICReg's `repr_loss`. With equal per-rank batches, DDP's gradient averaging then gives
each rank's parameters exactly the gradient of the loss computed by one process on the global batch, and
the mean of the ranks' `total` is that loss. Without a process group the option changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from bagssl_core.config import BagVICRegConfig, LossConfig, TCRConfig, VICRegConfig
from bagssl_core.dist import gather_with_grad

VAR_EPS = 1e-4  # added to the variance under the square root, as in VICReg


class LossOutput(NamedTuple):
    """What every loss returns.

    Attributes:
        total: scalar tensor to backpropagate (weighted sum of the terms).
        parts: unweighted terms by name, detached scalar tensors (call `.item()` when logging).
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


# --- helpers ----------------------------------------------------------------------------------------


@contextmanager
def _full_precision(device_type: str) -> Iterator[None]:
    """Autocast off: matmuls and reductions of the loss then run in the (upcast) input dtype."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _upcast(z: torch.Tensor) -> torch.Tensor:
    """`z` in float32 if it is a narrower float type; float32/float64 unchanged."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def _gather(z: torch.Tensor, gather_distributed: bool) -> torch.Tensor:
    return gather_with_grad(z) if gather_distributed else z


def _check_batch(z: torch.Tensor, what: str) -> None:
    if z.shape[0] < 2:
        raise ValueError(
            f"{what}: batch statistics need at least 2 images in the (gathered) batch, "
            f"got shape {tuple(z.shape)}"
        )


def _check_bag(z: torch.Tensor, loss: str) -> None:
    if z.ndim != 3:
        raise ValueError(
            f"{loss}: expected z of shape (B, N, D), got a {z.ndim}-D tensor of shape {tuple(z.shape)}"
        )
    if z.shape[1] < 2:
        raise ValueError(
            f"{loss}: pulls patches to their bag mean, needs N >= 2 patches, got shape {tuple(z.shape)}"
        )


# --- pure terms ---------------------------------------------------------------------------------------


def bag_invariance(z: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each patch projection to its bag mean.

    Args:
        z: (..., N, D) projections; the N patches of one bag lie along dim -2.

    Returns:
        Scalar: mean over every leading index, patch and dim of (z - z̄)², z̄ = mean over the N patches.
        With N = 2 it equals a quarter of the two-view MSE between the patches.
    """
    centred = z - z.mean(dim=-2, keepdim=True)
    return centred.pow(2).mean()


def variance_hinge(z: torch.Tensor, eps: float = VAR_EPS) -> torch.Tensor:
    """VICReg variance term: hinge on the per-dimension standard deviation over the batch.

    Args:
        z: (B, ..., D) projections; statistics over dim 0 for every middle index.
        eps: added to the variance before the square root.

    Returns:
        Scalar: mean over middle indices and dims of relu(1 - sqrt(Var_batch(z) + eps)), unbiased variance.
    """
    std = torch.sqrt(z.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def covariance_penalty(z: torch.Tensor) -> torch.Tensor:
    """VICReg covariance term: squared off-diagonal batch covariances, summed and divided by D.

    Args:
        z: (B, ..., D) projections; one D×D covariance over dim 0 for every middle index.

    Returns:
        Scalar: mean over middle indices of sum_{j≠k} C_jk² / D, with C = Zcᵀ Zc / (B - 1), Zc centred.
    """
    b, d = z.shape[0], z.shape[-1]
    zc = z - z.mean(dim=0, keepdim=True)
    # ||ZcᵀZc||_F = ||Zc Zcᵀ||_F, so the smaller of the D×D and B×B products gives all squared entries;
    # the squared diagonal (the variances) is then taken off.
    if d <= b:
        prod = torch.einsum("b...i,b...j->...ij", zc, zc)
    else:
        prod = torch.einsum("b...d,c...d->...bc", zc, zc)
    all_sq = prod.pow(2).sum(dim=(-2, -1)) / (b - 1) ** 2
    diag_sq = (zc.pow(2).sum(dim=0) / (b - 1)).pow(2).sum(dim=-1)
    return ((all_sq - diag_sq) / d).mean()


def coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Total coding rate (MCR²/EMP-SSL): R(Z) = 1/2 logdet(I_D + D / (m·eps) ZᵀZ) with Z of shape (m, D).

    Args:
        z: (B, ..., D) embeddings; one rate over the m = B rows for every middle index.
        eps: distortion (EMP-SSL's `eps`, the ε² of the MCR² paper).

    Returns:
        Scalar: mean over middle indices of R. Computed in float32 at least, autocast off.
    """
    with _full_precision(z.device.type):
        z = _upcast(z)
        m, d = z.shape[0], z.shape[-1]
        z = z.reshape(m, -1, d)
        scale = d / (m * eps)
        # Sylvester: det(I_D + c ZᵀZ) = det(I_m + c ZZᵀ); factor the smaller matrix.
        gram = torch.einsum("mni,mnj->nij", z, z) if d <= m else torch.einsum("mnd,knd->nmk", z, z)
        eye = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device)
        chol = torch.linalg.cholesky(eye + scale * gram)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(dim=-1)
        return (0.5 * logdet).mean()


def bag_cosine_similarity(z: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between each patch embedding and its bag mean (EMP-SSL's similarity).

    Args:
        z: (..., N, D) embeddings; the N patches of one bag lie along dim -2.

    Returns:
        Scalar: mean over every leading index and patch of cos(z_i, z̄), z̄ = mean over the N patches.
    """
    mean = z.mean(dim=-2, keepdim=True)
    return F.cosine_similarity(z, mean, dim=-1).mean()


# --- losses ------------------------------------------------------------------------------------------


def bag_vicreg_loss(
    z: torch.Tensor,
    inv_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gather_distributed: bool = False,
) -> LossOutput:
    """Bag (intra-instance) VICReg over the N patches of each image.

    total = inv_weight·invariance + var_weight·variance + cov_weight·covariance, where
    invariance = mean_{b,i,d} (z_bid − z̄_bd)², z̄ the mean of image b's N patch projections;
    variance = mean_i mean_d relu(1 − sqrt(Var_b(z_bid) + 1e-4)) (unbiased variance over the batch);
    covariance = mean_i sum_{j≠k} C_i[j,k]² / D, C_i the covariance over the batch of patch index i,
    normalised by B − 1.

    Args:
        z: (B, N, D) projections, N >= 2.
        inv_weight: λ, weight of the invariance term.
        var_weight: μ, weight of the variance term.
        cov_weight: ν, weight of the covariance term.
        gather_distributed: compute variance and covariance on the batch gathered from all ranks.

    Returns:
        LossOutput with parts "invariance", "variance", "covariance".

    Raises:
        ValueError: z is not (B, N, D) with N >= 2, or the (gathered) batch has fewer than 2 images.
    """
    _check_bag(z, "bag_vicreg")
    with _full_precision(z.device.type):
        z = _upcast(z)
        invariance = bag_invariance(z)
        z_all = _gather(z, gather_distributed)
        _check_batch(z_all, "bag_vicreg")
        variance = variance_hinge(z_all)
        covariance = covariance_penalty(z_all)
        total = inv_weight * invariance + var_weight * variance + cov_weight * covariance
    parts = {"invariance": invariance, "variance": variance, "covariance": covariance}
    return LossOutput(total, {k: v.detach() for k, v in parts.items()})


def vicreg_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    inv_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gather_distributed: bool = False,
) -> LossOutput:
    """Two-view VICReg, as official facebookresearch/vicreg `main_vicreg.py` computes it.

    total = inv_weight·invariance + var_weight·variance + cov_weight·covariance, where
    invariance = mean (z_a − z_b)² (MSE, on the local batch);
    variance = (hinge(z_a) + hinge(z_b)) / 2 — the two branches' variance terms are AVERAGED;
    covariance = cov(z_a) + cov(z_b) — the two branches' covariance terms are SUMMED,
    with hinge and cov the `variance_hinge` and `covariance_penalty` terms above (eps 1e-4, B − 1).
    This is the official convention, kept so that the default weights mean what they mean there.

    Args:
        z_a: (B, ..., D) projections of the first view (usually (B, D)).
        z_b: projections of the second view, same shape as z_a.
        inv_weight: λ (official `sim_coeff`).
        var_weight: μ (official `std_coeff`).
        cov_weight: ν (official `cov_coeff`).
        gather_distributed: compute variance and covariance on the batch gathered from all ranks.

    Returns:
        LossOutput with parts "invariance", "variance", "covariance".

    Raises:
        ValueError: shapes differ, a view has fewer than 2 dims, or the (gathered) batch has < 2 images.
    """
    if z_a.shape != z_b.shape:
        raise ValueError(f"vicreg: the two views differ in shape: {tuple(z_a.shape)} vs {tuple(z_b.shape)}")
    if z_a.ndim < 2:
        raise ValueError(f"vicreg: expected views of shape (B, ..., D), got shape {tuple(z_a.shape)}")
    with _full_precision(z_a.device.type):
        z_a, z_b = _upcast(z_a), _upcast(z_b)
        invariance = F.mse_loss(z_a, z_b)
        z_a, z_b = _gather(z_a, gather_distributed), _gather(z_b, gather_distributed)
        _check_batch(z_a, "vicreg")
        variance = (variance_hinge(z_a) + variance_hinge(z_b)) / 2
        covariance = covariance_penalty(z_a) + covariance_penalty(z_b)
        total = inv_weight * invariance + var_weight * variance + cov_weight * covariance
    parts = {"invariance": invariance, "variance": variance, "covariance": covariance}
    return LossOutput(total, {k: v.detach() for k, v in parts.items()})


def tcr_loss(
    z: torch.Tensor,
    eps: float = 0.2,
    coding_rate_weight: float = 1.0,
    similarity_weight: float = 200.0,
    gather_distributed: bool = False,
) -> LossOutput:
    """EMP-SSL loss: total coding rate per patch index plus cosine similarity to the bag mean.

    z is first L2-normalised along D (EMP-SSL's projector ends with that normalisation). Then
    total = −coding_rate_weight·coding_rate − similarity_weight·similarity, where
    coding_rate = mean_i R(Z_i), R(Z) = 1/2 logdet(I_D + D / (B·eps) ZᵀZ), Z_i the (B, D) embeddings of
    patch index i over the batch;
    similarity = mean_{b,i} cos(z_bi, z̄_b), z̄_b the mean of image b's N (normalised) embeddings.
    Both parts are "higher is better"; the loss is minimised by raising them. EMP-SSL defaults: eps 0.2,
    coding_rate_weight 1 (`--tcr`), similarity_weight 200 (`--patch_sim`).

    Args:
        z: (B, N, D) projections, N >= 2.
        eps: distortion of the coding rate (> 0).
        coding_rate_weight: weight of the negated coding rate.
        similarity_weight: weight of the negated similarity.
        gather_distributed: compute the coding rate on the batch gathered from all ranks (B = global batch).

    Returns:
        LossOutput with parts "coding_rate", "similarity".

    Raises:
        ValueError: z is not (B, N, D) with N >= 2, the (gathered) batch has < 2 images, or eps <= 0.
    """
    _check_bag(z, "tcr")
    if eps <= 0:
        raise ValueError(f"tcr: expected eps > 0, got {eps}")
    with _full_precision(z.device.type):
        z = F.normalize(_upcast(z), dim=-1)
        similarity = bag_cosine_similarity(z)
        z_all = _gather(z, gather_distributed)
        _check_batch(z_all, "tcr")
        rate = coding_rate(z_all, eps)
        total = -coding_rate_weight * rate - similarity_weight * similarity
    return LossOutput(total, {"coding_rate": rate.detach(), "similarity": similarity.detach()})


# --- modules -----------------------------------------------------------------------------------------


_V = TypeVar("_V", bound="_VICRegWeights")


class _VICRegWeights(nn.Module):
    """The weights λ (invariance), μ (variance), ν (covariance) shared by both VICReg losses."""

    # The names of the terms in `LossOutput.parts`, each reported as `train/<part>`.
    PARTS: ClassVar[tuple[str, ...]] = ("invariance", "variance", "covariance")

    def __init__(
        self,
        inv_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.inv_weight = inv_weight
        self.var_weight = var_weight
        self.cov_weight = cov_weight
        self.gather_distributed = gather_distributed

    @classmethod
    def from_config(cls: type[_V], c: BagVICRegConfig | VICRegConfig) -> _V:
        return cls(c.inv_weight, c.var_weight, c.cov_weight, c.gather_distributed)

    def extra_repr(self) -> str:
        return (
            f"inv_weight={self.inv_weight}, var_weight={self.var_weight}, cov_weight={self.cov_weight}, "
            f"gather_distributed={self.gather_distributed}"
        )


class BagVICRegLoss(_VICRegWeights):
    """Bag VICReg (see `bag_vicreg_loss` for the formula): z (B, N, D) -> LossOutput.

    total = λ·mean (z − z̄)² + μ·mean_i mean_d relu(1 − std_b) + ν·mean_i sum_{j≠k} C_i[j,k]² / D,
    statistics over the batch for each patch index i.
    """

    def forward(self, z: torch.Tensor) -> LossOutput:
        """z: (B, N, D) patch projections."""
        return bag_vicreg_loss(z, self.inv_weight, self.var_weight, self.cov_weight, self.gather_distributed)


class VICRegLoss(_VICRegWeights):
    """Two-view VICReg (see `vicreg_loss`), official convention: z (B, 2, D) -> LossOutput.

    total = λ·MSE(z_a, z_b) + μ·(hinge(z_a) + hinge(z_b))/2 + ν·(cov(z_a) + cov(z_b)):
    variance averaged over the two views, covariance summed. z[:, 0] and z[:, 1] are the two views.
    """

    def forward(self, z: torch.Tensor) -> LossOutput:
        """z: (B, 2, D) projections of the two views of each image."""
        if z.ndim != 3 or z.shape[1] != 2:
            raise ValueError(f"vicreg: expected z of shape (B, 2, D) (two views), got shape {tuple(z.shape)}")
        return vicreg_loss(
            z[:, 0], z[:, 1], self.inv_weight, self.var_weight, self.cov_weight, self.gather_distributed
        )


class TCRLoss(nn.Module):
    """EMP-SSL total coding rate + bag similarity (see `tcr_loss`): z (B, N, D) -> LossOutput.

    total = −coding_rate_weight·mean_i 1/2 logdet(I + D/(B·eps) Z_iᵀZ_i) − similarity_weight·mean cos(z_bi, z̄_b),
    on L2-normalised z.
    """

    PARTS: ClassVar[tuple[str, ...]] = ("coding_rate", "similarity")

    def __init__(
        self,
        eps: float = 0.2,
        coding_rate_weight: float = 1.0,
        similarity_weight: float = 200.0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"tcr: expected eps > 0, got {eps}")
        self.eps = eps
        self.coding_rate_weight = coding_rate_weight
        self.similarity_weight = similarity_weight
        self.gather_distributed = gather_distributed

    @classmethod
    def from_config(cls, c: TCRConfig) -> TCRLoss:
        return cls(c.eps, c.coding_rate_weight, c.similarity_weight, c.gather_distributed)

    def forward(self, z: torch.Tensor) -> LossOutput:
        """z: (B, N, D) patch projections (normalised inside)."""
        return tcr_loss(z, self.eps, self.coding_rate_weight, self.similarity_weight, self.gather_distributed)

    def extra_repr(self) -> str:
        return (
            f"eps={self.eps}, coding_rate_weight={self.coding_rate_weight}, "
            f"similarity_weight={self.similarity_weight}, "
            f"gather_distributed={self.gather_distributed}"
        )


# loss.name -> its class, which names its parts (`PARTS`) and builds itself from its own config.
LOSSES: dict[str, type[BagVICRegLoss] | type[VICRegLoss] | type[TCRLoss]] = {
    "bag_vicreg": BagVICRegLoss,
    "vicreg": VICRegLoss,
    "tcr": TCRLoss,
}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module `cfg` (the member of the `loss` union that `loss.name` picks) describes, holding
    its weights."""
    if isinstance(cfg, TCRConfig):
        return TCRLoss.from_config(cfg)
    return (VICRegLoss if isinstance(cfg, VICRegConfig) else BagVICRegLoss).from_config(cfg)


def loss_parts(name: str) -> tuple[str, ...]:
    """The names of the terms the loss `name` returns in `LossOutput.parts`, in order.

    Raises:
        ValueError: unknown loss name.
    """
    try:
        return LOSSES[name].PARTS
    except KeyError:
        raise ValueError(f"loss.name: unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
