"""Backbones (chosen by name) and the VICReg-style projector, combined into `BagSSLModel`.

The backbone f maps a patch to its embedding h (the representation that probes see); the projector g
maps h to z (what the loss sees). All patches of a step go through both as one batch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import cast

import torch
import torch.distributed as dist
import torchvision
from torch import nn

from bagssl_core.config import ModelConfig
from bagssl_core.syncbn import convert_global_batchnorm

log = logging.getLogger(__name__)


def resnet18_cifar(in_channels: int = 3) -> tuple[nn.Module, int]:
    """ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution and no max-pool (small images).

    Returns:
        The backbone, mapping (M, C, S, S) to (M, 512), and its feature dimension 512.
    """
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def resnet18(in_channels: int = 3) -> tuple[nn.Module, int]:
    """torchvision ResNet-18 (ImageNet stem), randomly initialised; (M, C, S, S) -> (M, 512)."""
    return _torchvision_resnet(torchvision.models.resnet18(weights=None), in_channels), 512


def resnet50(in_channels: int = 3) -> tuple[nn.Module, int]:
    """torchvision ResNet-50 (ImageNet stem), randomly initialised; (M, C, S, S) -> (M, 2048)."""
    return _torchvision_resnet(torchvision.models.resnet50(weights=None), in_channels), 2048


def _torchvision_resnet(net: torchvision.models.ResNet, in_channels: int) -> nn.Module:
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


# Name (as in `model.backbone`) -> builder(in_channels) returning (module, feature dimension).
BACKBONES: dict[str, Callable[[int], tuple[nn.Module, int]]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


class Projector(nn.Sequential):
    """MLP g: Linear-BatchNorm1d-ReLU for every width but the last, then a plain Linear.

    As the official VICReg projector (facebookresearch/vicreg, main_vicreg.py `Projector`): hidden
    Linear layers keep their bias, the last has none.

    Args:
        in_dim: input dimension (the backbone's feature dimension).
        widths: output width of each layer; the last one is the projection dimension.

    Shapes:
        (M, in_dim) -> (M, widths[-1]).
    """

    def __init__(self, in_dim: int, widths: list[int]) -> None:
        if not widths:
            raise ValueError("Projector: expected at least one width")
        layers: list[nn.Module] = []
        dim = in_dim
        for width in widths[:-1]:
            layers += [nn.Linear(dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            dim = width
        layers.append(nn.Linear(dim, widths[-1], bias=False))
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = widths[-1]


class BagSSLModel(nn.Module):
    """Backbone f and projector g.

    Attributes:
        backbone: f, (M, C, S, S) -> (M, embed_dim).
        projector: g, (M, embed_dim) -> (M, proj_dim).
        embed_dim: dimension of the embedding h.
        proj_dim: dimension of the projection z.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, projector: Projector) -> None:
        super().__init__()
        if projector.in_dim != embed_dim:
            raise ValueError(f"projector takes {projector.in_dim} features, the backbone gives {embed_dim}")
        self.backbone = backbone
        self.projector = projector
        self.embed_dim = embed_dim
        self.proj_dim = projector.out_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed and project a batch of M patches (every patch of every image, flattened).

        Args:
            x: float (M, C, S, S), normalised patches.

        Returns:
            h (M, embed_dim) and z (M, proj_dim).
        """
        h = self.backbone(x)
        return h, self.projector(h)


def build_model(cfg: ModelConfig, in_channels: int) -> BagSSLModel:
    """The model `cfg` describes, randomly initialised.

    Args:
        cfg: the model part of the run config.
        in_channels: channels of the input images: the run config's `in_channels` (1 for grayscale images
            kept as one channel, else 3). No default, so that a model for a checkpoint is built as the
            run built it.

    Raises:
        ValueError: an unknown backbone name (the message lists the valid ones).
    """
    if cfg.backbone not in BACKBONES:
        raise ValueError(
            f"model.backbone: unknown backbone {cfg.backbone!r}; expected one of {sorted(BACKBONES)}"
        )
    backbone, dim = BACKBONES[cfg.backbone](in_channels)
    return BagSSLModel(backbone, dim, Projector(dim, list(cfg.projector)))


def prepare_for_device(model: BagSSLModel, device: torch.device | str, cfg: ModelConfig) -> BagSSLModel:
    """Move the model to `device`, with synchronised BatchNorm and channels_last where `cfg` asks and they apply.

    With `cfg.sync_bn` under torch.distributed, BatchNorm statistics span all ranks: torch's SyncBatchNorm
    on CUDA, and `GlobalBatchNorm` elsewhere (torch's rejects CPU inputs in training mode).
    channels_last speeds up the ResNets on the CPU as on CUDA: on 2 AMD EPYC (Zen 3) cores with torch 2.14,
    1.44x for the smoke trial's feature extraction and 1.26x for its training step, 1.32x and 1.20x at the
    default config's 28-px input (`bench/memory_format.py --threads 1`). oneDNN's convolutions run in
    NHWC natively; from NCHW they reorder every activation.
    """
    device = torch.device(device)
    if cfg.sync_bn and dist.is_available() and dist.is_initialized():
        # Both return the converted module: the root itself here, as a BagSSLModel is no BatchNorm.
        if device.type == "cuda":
            model = cast(BagSSLModel, nn.SyncBatchNorm.convert_sync_batchnorm(model))
        else:
            model = cast(BagSSLModel, convert_global_batchnorm(model))
        log.info("BatchNorm layers synchronised across ranks")
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def inference_graph(model: nn.Module, in_channels: int, side: int) -> nn.Module:
    """A frozen TorchScript graph of `model` (a CPU module) for feature extraction, or `model` itself where no
    graph can be built or the graph's outputs differ from the model's.

    `torch.jit.trace`, `freeze` and `optimize_for_inference` fold each BatchNorm into the convolution
    before it, prepack the weights for oneDNN and keep the activations in oneDNN's blocked layout from one
    convolution to the next. On 2 Xeon cores (AVX-512 VNNI) with torch 2.14, a chunk of patches goes
    through the graph 1.38x to 1.58x as fast as through the eager channels_last model for the smoke trial's
    shape (CIFAR-stem ResNet-18, 14-px input; 1 and 2 threads), 1.07x to 1.18x at the default 28-px
    input, 1.3x to 1.5x for the ImageNet-stem ResNet-18 and ResNet-50 at 32 to 64 px; 0.93x only for the
    ImageNet-stem ResNet-18 on 14-px input, whose maps are 1 px wide after its stem
    (`bench/inference_graph.py`). The gain is in the oneDNN rewrite: `freeze` alone, which folds the
    BatchNorms, gave 1.06x on the smoke shape. The features agree with the eager model's to about 1e-6 of
    their scale (the folded BatchNorm rounds differently).

    The graph copies the weights as they are when it is built: build one for each evaluation and drop it.
    Torch deprecates these TorchScript functions in favour of torch.compile; their FutureWarnings are
    silenced here. On the smoke shape torch.compile took 31 s to compile (9 s with Inductor's cache warm)
    and 10 to 15 s more at the first chunk-sized batch, then ran 1.06x to 1.08x faster than eager; the
    graph takes 0.3 to 0.4 s to build (`bench/inference_graph.py --compile`). Tracing records one run of
    the model on 2 random patches of `in_channels` x `side` x `side`; the graph is kept only if it gives
    that run's (h, z) again, to 1e-4 of their scale, so a model whose forward a trace cannot capture
    falls back to eager with a warning.
    """
    was_training = model.training
    model.eval()
    example = torch.randn(2, in_channels, side, side, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, example, check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            worst = _relative_difference(graph(example), model(example))
    except (RuntimeError, TypeError, ValueError, AttributeError) as err:
        log.warning("eval.cpu_graph: no graph of the model (%s); extracting with the eager model", err)
        return model
    finally:
        model.train(was_training)
    if worst > GRAPH_TOLERANCE:
        log.warning(
            "eval.cpu_graph: the model's graph differs from it by %.1e of the outputs' scale (expected at "
            "most %.0e); extracting with the eager model",
            worst,
            GRAPH_TOLERANCE,
        )
        return model
    return FrozenGraph(graph)


class FrozenGraph(nn.Module):
    """`inference_graph`'s graph as a module that extraction puts in eval mode and back, as it does the
    model: a frozen ScriptModule has no `training` flag to read."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cast(tuple[torch.Tensor, torch.Tensor], self.graph(x))


# How far `inference_graph`'s outputs may be from the eager model's, relative to their largest magnitude.
# Folding BatchNorm moves them by about 1e-6; a trace that misses part of the forward moves them by far more.
GRAPH_TOLERANCE = 1e-4


def _relative_difference(got: object, expected: object) -> float:
    """Largest |got - expected| over the matching tensors of two outputs (a tensor or a tuple of them), each
    relative to its expected tensor's largest magnitude; inf when their structures differ."""
    gots = got if isinstance(got, tuple) else (got,)
    wants = expected if isinstance(expected, tuple) else (expected,)
    if len(gots) != len(wants):
        return float("inf")
    worst = 0.0
    for g, e in zip(gots, wants, strict=True):
        if not isinstance(g, torch.Tensor) or not isinstance(e, torch.Tensor) or g.shape != e.shape:
            return float("inf")
        scale = e.abs().max().item()
        diff = (g - e).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
