"""Optimizers (LARS, SGD, AdamW) and the per-iteration learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bagssl_core.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in official VICReg.

    For a parameter p with gradient g (weight decay wd added to g first):
        trust = eta * ||p|| / ||g||   (1 where either norm is 0)
        v <- momentum * v + trust * g;  p <- p - lr * v
    Groups with `lars_exclude=True` (biases and normalisation parameters) get neither weight decay nor
    the trust ratio: they follow plain SGD with momentum.
    """

    def __init__(
        self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.02
    ):
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False)
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, torch.ones_like(p_norm)
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])
        return loss


def _split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases-and-norm-params): 1-D parameters are excluded from decay and LARS adaptation."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by cfg.optim, at the effective lr (the schedule rescales it every step)."""
    o = cfg.optim
    lr = cfg.effective_lr()
    decay, no_decay = _split_decay(model)
    if o.name == "lars":
        lars_groups: list[dict[str, Any]] = [
            {"params": decay},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
        ]
        return LARS(lars_groups, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.lars_eta)
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=o.betas, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name: unknown optimizer {o.name!r}; expected lars, sgd or adamw")


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> torch.Tensor:
    """Learning rate for every iteration: linear warm-up from 0, then cosine to final_lr_ratio * peak.

    Precomputed (float64, one entry per step) so a resumed run indexes it by the global step and gets
    exactly the rates of an uninterrupted run.
    """
    peak = cfg.effective_lr()
    total = cfg.schedule.epochs * steps_per_epoch
    warm = min(total, round(cfg.schedule.warmup_epochs * steps_per_epoch))
    final = peak * cfg.schedule.final_lr_ratio
    lrs = torch.empty(total, dtype=torch.float64)
    for i in range(total):
        if i < warm:
            lrs[i] = peak * (i + 1) / warm
        else:
            t = (i - warm) / max(1, total - warm - 1)
            lrs[i] = final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, t)))
    return lrs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
