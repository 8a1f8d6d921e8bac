"""The training loop on tiny synthetic runs: exact resume, checkpoints handed to the reporter, divergence,
the lr schedule, LARS against its formula, what is reported when (validation every probing epoch, test at
the end, with intervals, exactly `expected_metrics`), evaluation variants, and 2 gloo processes against one
process on the whole batch."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bagssl_core.config import BagVICRegConfig, ConfigError, EvalConfig, TrainConfig, load_config
from bagssl_core.data import ImageData, load_split
from bagssl_core.losses import build_loss
from bagssl_core.metrics import (
    CHECKPOINT_SECONDS,
    EPOCH_SECONDS,
    EPOCHS_PLANNED,
    PROBE_SECONDS,
    SETUP_SECONDS,
    TIMING_METRICS,
    ProbeKey,
    expected_metrics,
    metric_names,
    n_images,
    probe_keys,
    wilson_interval,
)
from bagssl_core.models import build_model, prepare_for_device
from bagssl_core.optim import LARS, build_optimizer, lr_schedule, set_lr
from bagssl_core.patches import channel_stats
from bagssl_core.run_files import RunResult
from bagssl_core.syncbn import GlobalBatchNorm
from bagssl_core.train import (
    batch_length,
    eval_variant_config,
    evaluate,
    extract_split,
    load_checkpoint,
    shard_batches,
    sharing_batch,
    train,
    train_step,
    use_bf16,
)

# A few seconds per epoch on one CPU thread: 4 steps of 16 images x 2 patches of 16 px (72 training images,
# 8 of them set aside for validation).
TINY = [
    "data.name=synthetic",
    "data.synthetic_train=72",
    "data.val_size=8",
    "data.synthetic_test=32",
    "data.batch_size=16",
    "patch.num=2",
    "patch.size=16",
    "patch.input_size=16",
    "model.projector=[32, 32]",
    "eval.probes=[knn]",
    "run.threads=1",
]


def tiny(*overrides: str) -> TrainConfig:
    return load_config(None, [*TINY, *overrides])


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # run.threads sets torch's process-wide thread count: give the next test the count it had.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- a 2-epoch run, shared by the resume and reporter tests ---------------------------------------------


class Interrupted(Exception):
    """Raised by a reporter to stop a run after an epoch, as a crash would."""


RESUME_CFG = [*TINY, "schedule.epochs=2", "run.keep_checkpoints=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult, list[dict[str, Any]]]:
    """Run A: 2 epochs straight through, with a reporter that records what it sees when it is called."""
    out = tmp_path_factory.mktemp("run_a")
    calls: list[dict[str, Any]] = []

    def record(metrics: dict[str, float], ckpt: Path | None) -> None:
        calls.append(
            {
                "metrics": dict(metrics),
                "ckpt": ckpt,
                "files": sorted(p.name for p in ckpt.iterdir()) if ckpt else [],
                "stored": json.loads((ckpt / "metrics.json").read_text()) if ckpt else None,
                "kept": sorted(p.name for p in (out / "checkpoints").iterdir()),
            }
        )

    threads = torch.get_num_threads()  # restored by hand: module fixtures run outside _restore_threads
    result = train(load_config(None, RESUME_CFG), out, reporter=record)
    torch.set_num_threads(threads)
    return out, result, calls


def test_resume_after_a_crash_is_exact(
    uninterrupted: tuple[Path, RunResult, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out_a, result_a, _ = uninterrupted
    cfg = load_config(None, RESUME_CFG)
    out_b = tmp_path / "run_b"

    def crash_after_first_epoch(metrics: dict[str, float], ckpt: Path | None) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, out_b, reporter=crash_after_first_epoch)
    # train() writes the epoch's checkpoint and metrics line before it calls the reporter.
    assert (out_b / "checkpoints" / "epoch_0001" / "state.pt").is_file()
    assert len(read_jsonl(out_b / "metrics.jsonl")) == 1
    assert not (out_b / "summary.json").exists()

    result_b = train(cfg, out_b, resume_from=out_b)
    assert (result_b.status, result_b.epochs) == ("finished", 2) == (result_a.status, result_a.epochs)

    state_a, state_b = load_checkpoint(out_a), load_checkpoint(out_b)
    assert (state_a["epoch"], state_a["step"]) == (state_b["epoch"], state_b["step"]) == (2, 8)
    model_a, model_b = state_a["model"], state_b["model"]
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    moments_a, moments_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys()
    for i in moments_a:
        assert torch.equal(moments_a[i]["mu"], moments_b[i]["mu"]), i

    lines_a, lines_b = read_jsonl(out_a / "metrics.jsonl"), read_jsonl(out_b / "metrics.jsonl")
    assert [without_timing(m) for m in lines_a] == [without_timing(m) for m in lines_b]
    assert "val/knn_top1/mean_emb" in lines_b[1] and "test/knn_top1/mean_emb" in lines_b[1]
    summary_a = json.loads((out_a / "summary.json").read_text())
    summary_b = json.loads((out_b / "summary.json").read_text())
    assert without_timing(summary_a) == without_timing(summary_b)
    assert summary_b["status"] == "finished"


def test_resuming_from_the_last_epochs_checkpoint_reports_that_epoch_again(
    tmp_path: Path, uninterrupted: tuple[Path, RunResult, list[dict[str, Any]]]
) -> None:
    # As a sweep trial restarted from the final checkpoint its workers reported before the driver died.
    out_a, result_a, calls_a = uninterrupted
    calls: list[tuple[dict[str, float], Path | None]] = []
    result = train(
        load_config(None, RESUME_CFG),
        tmp_path / "c",
        resume_from=out_a,
        reporter=lambda m, c: calls.append((m, c)),
    )
    assert calls == [(calls_a[-1]["metrics"], None)]
    assert (result.status, result.epochs, result.metrics) == ("finished", 2, result_a.metrics)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["test/knn_top1/mean_emb"] == result_a.metrics["test/knn_top1/mean_emb"]


def test_each_epoch_says_where_its_time_went(
    uninterrupted: tuple[Path, RunResult, list[dict[str, Any]]],
) -> None:
    # Set-up before the first epoch only; probes after the last only (eval.every=0); a checkpoint each epoch.
    first, last = (c["metrics"] for c in uninterrupted[2])
    assert first[SETUP_SECONDS] > 0 and last[SETUP_SECONDS] == 0
    assert first[PROBE_SECONDS] < 0.01 < last[PROBE_SECONDS]
    assert first[EPOCH_SECONDS] > 0 and last[EPOCH_SECONDS] > 0
    assert first[CHECKPOINT_SECONDS] > 0 and last[CHECKPOINT_SECONDS] > 0


def test_reporter_gets_each_epochs_checkpoint_and_old_ones_are_pruned(
    uninterrupted: tuple[Path, RunResult, list[dict[str, Any]]],
) -> None:
    out, result, calls = uninterrupted
    cfg = load_config(None, RESUME_CFG)
    assert [c["metrics"]["epoch"] for c in calls] == [1, 2]
    for epoch, call in enumerate(calls, start=1):
        assert call["ckpt"] == out / "checkpoints" / f"epoch_{epoch:04d}"
        assert call["files"] == ["config.yaml", "metrics.json", "state.pt"]
        assert call["stored"] == call["metrics"]
        # keep_checkpoints=1: by the time the reporter runs, the previous checkpoint is gone
        assert call["kept"] == [f"epoch_{epoch:04d}"]
        assert {"train/loss", "train/invariance", "train/variance", "train/covariance", "lr"} <= set(
            call["metrics"]
        )
    # Probes run after the last epoch only (eval.every=0), and the reporter sees them there: validation
    # and, the run being finished, test.
    per_epoch, at_end = expected_metrics(cfg)
    assert set(calls[0]["metrics"]) == {k for k in per_epoch if ProbeKey.parse(k) is None} - {n_images("val")}
    assert set(calls[1]["metrics"]) == per_epoch | at_end
    for key in ("val/knn_top1/mean_emb", "test/knn_top1/mean_emb"):
        assert calls[1]["metrics"][key] == result.metrics[key]
    assert [c["metrics"][EPOCHS_PLANNED] for c in calls] == [2, 2]
    assert load_config(calls[1]["ckpt"] / "config.yaml") == cfg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0002"]
    lrs = lr_schedule(cfg, steps_per_epoch=4)
    assert [c["metrics"]["lr"] for c in calls] == [float(lrs[3]), float(lrs[7])]


# --- divergence ----------------------------------------------------------------------------------------


def test_non_finite_loss_stops_the_run_as_diverged(tmp_path: Path) -> None:
    # SGD at an absurd rate blows the projector weights up after the first step: the next loss is NaN.
    result = train(tiny("optim.name=sgd", "optim.base_lr=1e20", "schedule.epochs=2"), tmp_path)
    assert result.status == "diverged"
    assert result.epochs == 0 and result.metrics["diverged_at_step"] >= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs"] == 0
    assert not (tmp_path / "checkpoints").exists()  # no checkpoint of a broken model


# --- grayscale images kept as one channel ----------------------------------------------------------------


def test_grayscale_kept_as_one_channel_trains_probes_and_reloads(tmp_path: Path) -> None:
    """data.to_rgb=false on real Fashion-MNIST: a 1-channel backbone trains and probes, and the checkpoint's
    config builds the same model back (what `python -m bagssl_core eval` does)."""
    cfg = load_config(
        None,
        [
            "data.to_rgb=false",
            "data.train_subset=64",
            "data.test_subset=32",
            "data.batch_size=16",
            "patch.num=2",
            "patch.size=14",
            "patch.input_size=14",
            "model.projector=[32, 32]",
            "eval.probes=[knn]",
            "run.threads=1",
            "schedule.epochs=1",
        ],
    )
    result = train(cfg, tmp_path)
    assert (result.status, result.epochs) == ("finished", 1)
    keys = [ProbeKey(split, "knn", "top1", "mean_emb") for split in ("val", "test")]
    assert all(0.0 <= result.metrics[str(k)] <= 100.0 for k in keys)
    state = load_checkpoint(tmp_path)
    stored = TrainConfig.model_validate(state["config"])
    assert stored == cfg and stored.in_channels == 1
    model = build_model(stored.model, stored.in_channels)
    model.load_state_dict(state["model"])
    assert model.backbone.conv1.in_channels == 1
    train_data, val_data, test_data = (
        load_split(stored.data, split, stored.run.seed) for split in ("train", "val", "test")
    )
    again = evaluate(model, stored, train_data, {"val": val_data, "test": test_data}, torch.device("cpu"))
    assert [again[k] for k in keys] == [result.metrics[str(k)] for k in keys]


def test_bf16_on_the_cpu_extracts_features_close_to_fp32_and_trains_and_probes(tmp_path: Path) -> None:
    """run.precision=bf16 on the CPU (the README's fastest way where the CPU has native bf16): auto stays fp32
    there; bf16 extraction gives features within bf16 rounding of fp32's, not the same ones; a bf16 run
    trains, probes and records its precision."""
    cpu = torch.device("cpu")
    assert not use_bf16(tiny(), cpu)
    assert use_bf16(tiny("run.precision=bf16"), cpu)
    assert use_bf16(tiny(), torch.device("cuda"))  # auto: bf16 on CUDA (a device object needs no GPU)
    cfg = tiny("run.precision=bf16", "schedule.epochs=1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels).eval()
    data = load_split(cfg.data, "train", cfg.run.seed)
    mean_std = channel_stats(cfg.data.name, data.channels)
    fp32, bf16 = (
        extract_split(model, data, cfg, cfg.eval, cpu, mean_std, autocast) for autocast in (False, True)
    )
    assert fp32 is not None and bf16 is not None
    assert torch.equal(fp32[1], bf16[1])  # the same images, in the same order
    a, b = fp32[0]["mean_emb"], bf16[0]["mean_emb"]
    assert a.dtype == b.dtype == torch.float32  # bf16 features are scored in fp32
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999
    result = train(cfg, tmp_path)
    assert (result.status, result.epochs) == ("finished", 1)
    knn = [result.metrics[str(ProbeKey(split, "knn", "top1", "mean_emb"))] for split in ("val", "test")]
    assert all(0.0 <= v <= 100.0 for v in knn)
    assert TrainConfig.model_validate(load_checkpoint(tmp_path)["config"]).run.precision == "bf16"


# --- learning-rate schedule ----------------------------------------------------------------------------


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine() -> None:
    cfg = tiny(
        "optim.base_lr=0.4", "schedule.epochs=3", "schedule.warmup_epochs=1", "schedule.final_lr_ratio=0.01"
    )
    peak = 0.4 * 16 / 256
    assert cfg.effective_lr() == pytest.approx(peak)
    lrs = lr_schedule(cfg, steps_per_epoch=10)
    assert lrs.shape == (30,) and lrs.dtype == torch.float64
    warm, decay = lrs[:10], lrs[10:]
    torch.testing.assert_close(warm, peak * torch.arange(1, 11, dtype=torch.float64) / 10)
    assert warm[0] == pytest.approx(peak / 10)  # starts near 0, not at 0 (a zero step would be wasted)
    assert warm[-1] == pytest.approx(peak)  # the peak is reached at the end of warm-up
    assert decay[0] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.01 * peak)  # the last step is at final_lr_ratio * peak
    assert torch.all(decay[1:] < decay[:-1])
    t = torch.arange(20, dtype=torch.float64) / 19
    torch.testing.assert_close(decay, 0.01 * peak + 0.5 * (peak - 0.01 * peak) * (1 + torch.cos(math.pi * t)))


def test_lr_schedule_with_fractional_and_no_warm_up() -> None:
    half = lr_schedule(tiny("schedule.epochs=2", "schedule.warmup_epochs=0.5"), steps_per_epoch=10)
    peak = tiny().effective_lr()
    assert half.shape == (20,) and half[4] == pytest.approx(peak) and half[3] < peak
    none = lr_schedule(tiny("schedule.epochs=2", "schedule.warmup_epochs=0"), steps_per_epoch=10)
    assert none[0] == pytest.approx(peak) and none[-1] == pytest.approx(peak * 1e-3)


# --- LARS ------------------------------------------------------------------------------------------------


def test_biases_and_norm_parameters_are_excluded_from_decay_and_lars() -> None:
    cfg = tiny("optim.weight_decay=0.05")
    model = build_model(cfg.model, cfg.in_channels)
    names = {id(p): n for n, p in model.named_parameters()}
    norm_params = {
        id(p)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    }
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, LARS)
    adapted, excluded = opt.param_groups
    assert (adapted["lars_exclude"], adapted["weight_decay"]) == (False, 0.05)
    assert (excluded["lars_exclude"], excluded["weight_decay"]) == (True, 0.0)
    excluded_ids = {id(p) for p in excluded["params"]}
    assert norm_params <= excluded_ids
    assert all(names[i].endswith(".bias") or i in norm_params for i in excluded_ids)
    assert all(p.ndim > 1 and id(p) not in norm_params for p in adapted["params"])
    assert len(adapted["params"]) + len(excluded["params"]) == len(names)
    for name in ("sgd", "adamw"):  # the other optimizers exclude the same parameters from decay
        groups = build_optimizer(model, tiny("optim.weight_decay=0.05", f"optim.name={name}")).param_groups
        assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
        assert {id(p) for p in groups[1]["params"]} == excluded_ids


def test_lars_steps_follow_the_docstring_formula() -> None:
    wd, momentum, eta, lr = 0.1, 0.9, 0.02, 0.5
    cfg = tiny(
        "optim.name=lars", f"optim.weight_decay={wd}", f"optim.momentum={momentum}", f"optim.lars_eta={eta}"
    )
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        module[2].weight.zero_()  # ||p|| = 0: the trust ratio falls back to 1
    opt = build_optimizer(module, cfg)
    params = list(module.parameters())
    excluded = {id(p) for p in opt.param_groups[1]["params"]}
    expected = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step exercises the momentum buffer
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p.grad = g.clone()
            if id(p) not in excluded:
                g = g + wd * expected[i]
                p_norm, g_norm = expected[i].norm(), g.norm()
                trust = eta * p_norm / g_norm if p_norm > 0 and g_norm > 0 else 1.0
                g = trust * g
            velocity[i] = momentum * velocity[i] + g
            expected[i] = expected[i] - lr * velocity[i]
        set_lr(opt, lr)
        opt.step()
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


# --- evaluation variants ----------------------------------------------------------------------------------


def test_evaluate_names_metrics_by_split_scheme_and_variant() -> None:
    cfg = tiny("data.synthetic_train=48", "data.synthetic_test=16", "eval.grid_stride=16")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.in_channels)
    train_data, val_data, test_data = (
        load_split(cfg.data, s, cfg.run.seed) for s in ("train", "val", "test")
    )
    named = EvalConfig(aggregation=["centre", "mean_emb"], probes=["knn"], knn_k=5)
    cpu = torch.device("cpu")
    splits = {"val": val_data, "test": test_data}
    metrics = evaluate(model, cfg, train_data, splits, cpu, {"": cfg.eval, "small": named})
    expected = {n_images("val"): 8, n_images("test"): 16}
    for split in ("val", "test"):
        keys = probe_keys(split, ["knn"], ["mean_emb"]) + probe_keys(
            split, ["knn"], ["centre", "mean_emb"], "small"
        )
        expected |= {k: metrics[k] for k in keys}
    assert metrics == expected
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if isinstance(k, ProbeKey))
    assert model.training  # evaluate leaves the model in the mode it found it
    default = evaluate(model, cfg, train_data, {"val": val_data}, cpu)
    assert default == {
        k: v
        for k, v in metrics.items()
        if k == n_images("val") or (isinstance(k, ProbeKey) and k.split == "val" and not k.variant)
    }


# --- what a run reports, and when ---------------------------------------------------------------------------


def test_each_epoch_reports_validation_and_the_end_reports_test_with_intervals(tmp_path: Path) -> None:
    # Probing every epoch, a loss with other parts, and an evaluation variant: every reported name must be
    # one expected_metrics announces, at the time it announces it.
    cfg = tiny("schedule.epochs=2", "eval.every=1", "loss.name=tcr", "run.checkpoint_every=0")
    variants = {"": cfg.eval, "small": EvalConfig(aggregation=["centre"], probes=["knn"], knn_k=5)}
    calls: list[dict[str, float]] = []
    result = train(cfg, tmp_path, reporter=lambda m, _: calls.append(dict(m)), eval_variants=variants)
    per_epoch, at_end = expected_metrics(cfg, variants)
    assert "train/coding_rate" in per_epoch and "val/knn_top1/centre:small" in per_epoch
    assert "test/knn_top5_hi/centre:small" in at_end
    assert [set(c) for c in calls] == [per_epoch, per_epoch | at_end]
    assert {key.split for k in calls[0] if (key := ProbeKey.parse(k))} == {"val"}
    last = calls[-1]
    assert (last[n_images("val")], last[n_images("test")]) == (8, 32)
    checked = 0
    for name, value in last.items():
        key = ProbeKey.parse(name)
        if key is None or key.bound:
            continue
        lo, hi = last[str(key.with_bound("lo"))], last[str(key.with_bound("hi"))]
        assert (lo, hi) == wilson_interval(value, int(last[n_images(key.split)]))
        assert lo <= value <= hi
        checked += 1
    # val and test x kNN top1 and top5 x (mean_emb, centre:small)
    assert checked == 2 * 2 * 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in ("status", "epochs")} == result.metrics == last


def test_eval_epochs_probe_after_exactly_those_epochs_and_the_last(tmp_path: Path) -> None:
    # The epochs a scheduler reads (sweeps' `scheduler.probe_epochs: rungs`): probes after epochs 1 and 2 of
    # 4 and after the last, none after the third; the epoch metrics every epoch.
    cfg = tiny("schedule.epochs=4", "eval.epochs=[1, 2]", "run.checkpoint_every=0", "data.synthetic_train=40")
    calls: list[dict[str, float]] = []
    train(cfg, tmp_path, reporter=lambda m, _: calls.append(dict(m)))
    probed = [int(c["epoch"]) for c in calls if "val/knn_top1/mean_emb" in c]
    assert probed == [1, 2, 4]
    assert [int(c["epoch"]) for c in calls] == [1, 2, 3, 4]
    assert all("train/loss" in c for c in calls)


def test_eval_epochs_past_the_last_epoch_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"eval\.epochs: 5 is not an epoch of this run; expected 1\.\.4"):
        tiny("schedule.epochs=4", "eval.epochs=[2, 5]")


# --- 2 gloo processes vs 1 process on the whole batch -----------------------------------------------------

WORLD = 2
BATCH, NUM, SIDE = 8, 2, 16
OPTIMIZERS = ("lars", "sgd")


def _views() -> torch.Tensor:
    """A fixed step's normalised patches, (B, N, C, S, S)."""
    return torch.randn(BATCH, NUM, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


def _step_parts(optim: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, float]:
    """Model (seeded, through prepare_for_device), loss and optimizer of one step; the same on every rank.

    Contiguous weights: with channels_last the CPU convolutions round differently for a half batch than
    for the whole one, and one pre-activation within rounding of 0 then flips its ReLU mask, moving a
    gradient by that element's whole share (12% of one BatchNorm bias's here). That is rounding, not
    what this compares (the ranks' step against one process's), which needs every rounding the same."""
    cfg = TrainConfig.model_validate(
        {
            "data": {"batch_size": BATCH},
            "model": {"projector": [32, 32], "sync_bn": True, "channels_last": False},
            "optim": {"name": optim, "base_lr": 4.0, "weight_decay": 1e-3},
        }
    )
    torch.manual_seed(0)
    model = prepare_for_device(build_model(cfg.model, cfg.in_channels), "cpu", cfg.model)
    optimizer = build_optimizer(model, cfg)
    return model, build_loss(BagVICRegConfig(gather_distributed=True)), optimizer, cfg.effective_lr()


def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        local = _views()[rank * BATCH // WORLD : (rank + 1) * BATCH // WORLD]
        results = {}
        for optim in OPTIMIZERS:
            model, loss_fn, optimizer, lr = _step_parts(optim)
            global_bn = sum(isinstance(m, GlobalBatchNorm) for m in model.modules())
            loss, _ = train_step(DistributedDataParallel(model), local, loss_fn, optimizer, lr)
            results[optim] = {"state": model.state_dict(), "loss": loss, "global_bn": global_bn}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_step_like_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    torch.set_num_threads(1)
    for optim in OPTIMIZERS:
        model, loss_fn, optimizer, lr = _step_parts(optim)  # no process group: plain BatchNorm
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss, _ = train_step(model, _views(), loss_fn, optimizer, lr)
        single = model.state_dict()
        assert not any(isinstance(m, GlobalBatchNorm) for m in model.modules())
        torch.testing.assert_close(sum(r[optim]["loss"] for r in ranks) / WORLD, loss, rtol=1e-5, atol=1e-6)
        for r in ranks:
            assert r[optim]["global_bn"] > 0  # the distributed model really synchronised its BatchNorm
            max_diff, max_update = 0.0, 0.0
            for name, value in single.items():
                got = r[optim]["state"][name]
                if value.is_floating_point():
                    max_diff = max(max_diff, (got - value).abs().max().item())
                    max_update = max(max_update, (value - before[name]).abs().max().item())
                    torch.testing.assert_close(got, value, rtol=0, atol=5e-6, msg=f"{optim}: {name}")
                else:
                    assert torch.equal(got, value), name
            # The step moved the weights by far more than the ranks' disagreement with one process.
            assert max_update > 1000 * max(max_diff, 1e-9), (optim, max_update, max_diff)


# --- sharded evaluation: 2 gloo processes vs 1 process ------------------------------------------------


def _eval_parts() -> tuple[nn.Module, TrainConfig, dict[str, EvalConfig]]:
    """A seeded model and a config whose 64 training images make 3 evaluation batches of 24 (rank 0
    extracts 2, rank 1 one) and whose 8 validation images make one (rank 1 none); a variant with random
    patches, whose draws must not depend on the rank that extracts them."""
    cfg = tiny(
        "data.synthetic_train=72",
        "eval.batch_size=24",
        "eval.aggregation=[mean_emb, centre]",
        "eval.probes=[knn, linear]",  # the linear probe sees its training rows in order
        "eval.linear_epochs=2",
    )
    variants = {
        "": cfg.eval,
        "rnd": EvalConfig(
            patches="random", num_patches=3, probes=["knn"], aggregation=["mean_emb"], batch_size=24
        ),
    }
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.in_channels), cfg, variants


def _random_patch_features(
    model: nn.Module, cfg: TrainConfig, ev: EvalConfig, data: ImageData
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    stats = channel_stats(cfg.data.name, data.channels)
    return extract_split(model, data, eval_variant_config(cfg, ev), ev, torch.device("cpu"), stats)


def _eval_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model, cfg, variants = _eval_parts()
        train_data = load_split(cfg.data, "train", cfg.run.seed)
        val = load_split(cfg.data, "val", cfg.run.seed)
        metrics = evaluate(model, cfg, train_data, {"val": val}, torch.device("cpu"), variants)
        (Path(out_dir) / f"eval{rank}.json").write_text(json.dumps(metric_names(metrics)))
        feats = _random_patch_features(model, cfg, variants["rnd"], train_data)
        torch.save({"feats": feats}, Path(out_dir) / f"feats{rank}.pt")
    finally:
        dist.destroy_process_group()


def _images_per_rank(sizes: tuple[int, ...], batch_size: int, world: int) -> list[int]:
    shares = [shard_batches(sizes, batch_size, r, world) for r in range(world)]
    return [
        sum(batch_length(n, batch_size, b) for n, bs in zip(sizes, share, strict=True) for b in bs)
        for share in shares
    ]


@pytest.mark.parametrize(
    ("sizes", "batch_size", "world"),
    [
        ((461, 51), 256, 2),
        ((461, 51, 256), 256, 2),
        ((64, 8), 16, 2),
        ((1000, 100, 10), 64, 3),
        ((5,), 256, 4),
    ],
)
def test_shard_batches_gives_every_batch_to_one_rank_and_evens_the_images(
    sizes: tuple[int, ...], batch_size: int, world: int
) -> None:
    shares = [shard_batches(sizes, batch_size, r, world) for r in range(world)]
    for split, n in enumerate(sizes):
        got = sorted(b for share in shares for b in share[split])
        assert got == list(range(-(-n // batch_size)))  # each batch once, by one rank
        assert all(share[split] == sorted(share[split]) for share in shares)
    loads = _images_per_rank(sizes, batch_size, world)
    assert sum(loads) == sum(sizes)
    assert max(loads) - min(loads) <= batch_size  # greedy, largest first: within one batch of even
    assert shares == [
        shard_batches(sizes, batch_size, r, world) for r in range(world)
    ]  # the same on every rank


def test_shard_batches_evens_the_smoke_specs_probe() -> None:
    """The smoke spec's probe (461 training, 51 validation images, batches of 256; at the last epoch 256
    test images too): shared split by split, rank 0 took 307 images and rank 1 205 (563 and 205 with the
    test split)."""
    assert _images_per_rank((461, 51), 256, 2) == [256, 256]
    assert _images_per_rank((461, 51, 256), 256, 2) == [461, 307]
    # Batches of 256 are too coarse for the last probe's 768 images; grid patches shrink them.
    grid, rnd = EvalConfig(), EvalConfig(patches="random", num_patches=4)
    assert sharing_batch((461, 51, 256), grid, 2) == 48
    assert _images_per_rank((461, 51, 256), 48, 2) == [384, 384]
    assert sharing_batch((461, 51), grid, 2) == 32
    assert _images_per_rank((461, 51), 32, 2) == [256, 256]
    assert sharing_batch((461, 51, 256), rnd, 2) == 256  # random patches: the batches one process draws
    assert sharing_batch((461, 51, 256), grid, 1) == 256  # alone, nothing to share
    assert sharing_batch((5,), grid, 4) == 1


def test_two_gloo_ranks_share_the_extraction_and_probe_as_one_process(tmp_path: Path) -> None:
    mp.spawn(_eval_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    main, other = (json.loads((tmp_path / f"eval{r}.json").read_text()) for r in range(WORLD))
    torch.set_num_threads(1)
    model, cfg, variants = _eval_parts()
    train_data = load_split(cfg.data, "train", cfg.run.seed)
    assert len(train_data) == 64
    single = metric_names(
        evaluate(
            model,
            cfg,
            train_data,
            {"val": load_split(cfg.data, "val", cfg.run.seed)},
            torch.device("cpu"),
            variants,
        )
    )
    assert "val/knn_top1/mean_emb:rnd" in single and "val/linear_top1/centre" in single
    assert main == single  # the same features, in the same order: the same probes, value for value
    assert other == {n_images("val"): 8.0}  # rank 1 extracted, rank 0 probed
    # Row for row: rank 0 holds every batch in order, each with the random patches one process draws.
    (got, got_labels), none = (torch.load(tmp_path / f"feats{r}.pt")["feats"] for r in range(WORLD))
    want, want_labels = _random_patch_features(model, cfg, variants["rnd"], train_data)
    assert none is None and torch.equal(got_labels, want_labels)
    assert torch.equal(got["mean_emb"], want["mean_emb"])
