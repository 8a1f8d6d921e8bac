"""bagssl_core.models: backbone shapes and stems, input channels from the data, projector structure, device
preparation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bagssl_core.config import ModelConfig, load_config
from bagssl_core.data import load_split
from bagssl_core.models import (
    BACKBONES,
    BagSSLModel,
    FrozenGraph,
    Projector,
    build_model,
    inference_graph,
    prepare_for_device,
)
from bagssl_core.syncbn import GlobalBatchNorm


@pytest.mark.parametrize(
    "backbone, side, dim", [("resnet18_cifar", 16, 512), ("resnet18", 32, 512), ("resnet50", 32, 2048)]
)
def test_output_shapes(backbone: str, side: int, dim: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, projector=[64, 32]), 3)
    assert isinstance(model, BagSSLModel) and (model.embed_dim, model.proj_dim) == (dim, 32)
    h, z = model(torch.randn(2, 3, side, side))
    assert h.shape == (2, dim) and z.shape == (2, 32)
    assert torch.isfinite(h).all() and torch.isfinite(z).all()
    z.square().sum().backward()
    assert model.backbone.conv1.weight.grad is not None


def test_registry_dims_and_grayscale_input() -> None:
    assert sorted(BACKBONES) == ["resnet18", "resnet18_cifar", "resnet50"]
    model = build_model(ModelConfig(projector=[16]), in_channels=1)
    assert model.backbone.conv1.in_channels == 1
    h, z = model.eval()(torch.randn(2, 1, 8, 8))
    assert h.shape == (2, 512) and z.shape == (2, 16)


@pytest.mark.parametrize(
    ("overrides", "channels"),
    [([], 3), (["data.to_rgb=false"], 1), (["data.name=synthetic"], 3)],
    ids=["fashion_mnist_rgb", "fashion_mnist_gray", "synthetic"],
)
def test_the_model_takes_the_channels_the_data_gives(overrides: list[str], channels: int) -> None:
    cfg = load_config(None, [*overrides, "data.test_subset=4", "model.projector=[16]"])
    data = load_split(cfg.data, "test", cfg.run.seed)
    assert data.channels == cfg.in_channels == channels
    images = torch.stack([data[i][0] for i in range(4)]).float() / 255
    h, z = build_model(cfg.model, cfg.in_channels).eval()(images)
    assert h.shape == (4, 512) and z.shape == (4, 16)


def test_resnet18_cifar_stem() -> None:
    net, _ = BACKBONES["resnet18_cifar"](3)
    conv = net.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    # No downsampling before layer1: a 16-px input still has 16x16 feature maps there.
    feats = net.layer1(net.relu(net.bn1(net.conv1(torch.randn(2, 3, 16, 16)))))
    assert feats.shape == (2, 64, 16, 16)
    imagenet, _ = BACKBONES["resnet18"](3)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, nn.MaxPool2d)


def test_projector_structure() -> None:
    proj = Projector(512, [256, 128, 64])
    kinds = [type(m) for m in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [m.out_features for m in proj if isinstance(m, nn.Linear)] == [256, 128, 64]
    assert proj[0].in_features == 512 and proj[-1].bias is None
    # The output is the last Linear's, not rectified: negative values are kept.
    assert (proj(torch.randn(8, 512)) < 0).any()
    single = Projector(32, [16])
    assert len(single) == 1 and isinstance(single[0], nn.Linear)
    with pytest.raises(ValueError):
        Projector(32, [])


def test_unknown_backbone_lists_valid_names() -> None:
    cfg = ModelConfig.model_construct(backbone="vit_tiny", projector=[8], sync_bn=False, channels_last=True)
    with pytest.raises(ValueError, match=r"vit_tiny.*resnet18.*resnet18_cifar.*resnet50"):
        build_model(cfg, 3)


def test_prepare_for_device_on_cpu_uses_channels_last_as_asked_and_keeps_bn() -> None:
    cfg = ModelConfig(projector=[16], sync_bn=True, channels_last=True)
    model = prepare_for_device(build_model(cfg, 3), "cpu", cfg)
    # Not distributed: plain BatchNorm stays.
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(model.parameters()).device.type == "cpu"
    x = torch.randn(4, 3, 16, 16)
    off = ModelConfig(projector=[16], channels_last=False)
    plain = prepare_for_device(build_model(off, 3), "cpu", off)
    assert plain.backbone.conv1.weight.is_contiguous()
    plain.load_state_dict(model.state_dict())
    # The same function either way, up to float summation order.
    for a, b in zip(model.eval()(x), plain.eval()(x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sync_bn_on_cpu_under_distributed_uses_global_batchnorm(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        cfg = ModelConfig(projector=[16], sync_bn=True)
        model = prepare_for_device(build_model(cfg, 3), "cpu", cfg)
        assert any(isinstance(m, GlobalBatchNorm) for m in model.modules())
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
        off = ModelConfig(projector=[16], sync_bn=False)
        model = prepare_for_device(build_model(off, 3), "cpu", off)
        assert not any(isinstance(m, GlobalBatchNorm) for m in model.modules())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prepare_for_device_on_cuda_uses_channels_last() -> None:
    cfg = ModelConfig(projector=[16], channels_last=True)
    model = prepare_for_device(build_model(cfg, 3), "cuda", cfg)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    h, z = model(torch.randn(4, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last))
    assert h.shape == (4, 512) and z.shape == (4, 16)


class _CountsCalls(nn.Module):
    """A forward whose output depends on Python state, which a trace records as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x).flatten(1) + self.calls


class _ReturnsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": self.conv(x)}


def test_inference_graph_keeps_the_models_outputs_and_mode() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(projector=[32, 16]), 3).train()
    graph = inference_graph(model, 3, 16)
    assert isinstance(graph, FrozenGraph) and model.training
    x = torch.randn(5, 3, 16, 16)  # another batch size than the trace's
    with torch.no_grad():
        expected = model.eval()(x)
        got = graph(x)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "module, reason",
    [(_CountsCalls, "differs from it by"), (_ReturnsDict, "no graph of the model")],
)
def test_inference_graph_falls_back_to_the_model_it_cannot_capture(
    module: type[nn.Module], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = module()
    with caplog.at_level("WARNING", logger="bagssl_core.models"):
        assert inference_graph(model, 3, 8) is model
    assert reason in caplog.text and "extracting with the eager model" in caplog.text
