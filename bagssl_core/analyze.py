"""`python -m bagssl_core analyze RUN_DIR|CHECKPOINT`: BagSSL's analyses of a trained checkpoint.

The checkpoint's own config says what was trained and how it is evaluated; overrides may change only how
the analyses run (`eval.*`) and where (`RUNS_MAY_CHANGE`), never the model or the data. Results go to
`RUN_DIR/analyses/` (`analyses.json` and one PNG per analysis) unless another directory is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bagssl_core.analyses import ANALYSES, AnalysisReport, run_analyses
from bagssl_core.config import ConfigError, TrainConfig, parse_overrides, validate_config
from bagssl_core.data import check_same_data, data_identity, load_split
from bagssl_core.metrics import ANALYSES_DIR
from bagssl_core.models import build_model, prepare_for_device
from bagssl_core.outputs import writable_dir
from bagssl_core.run_files import CHECKPOINTS_DIR, find_checkpoint
from bagssl_core.train import (
    load_checkpoint,
    resolve_device,
    seed_everything,
    use_bf16,
)

# Besides eval.*: where the analyses run and find their data; nothing that changes what was trained.
RUNS_MAY_CHANGE = frozenset({"run.device", "run.threads", "data.root", "data.num_workers"})


def check_arguments(only: Sequence[str] | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The overrides as a tree, once `only` names analyses and they touch only eval.* and `RUNS_MAY_CHANGE`
    (checked before any checkpoint is read, so a typo is answered at once).

    Raises:
        ConfigError: an unknown analysis or a key the analyses may not change.
    """
    if only is not None:
        unknown = [n for n in only if n not in ANALYSES]
        if unknown or not only:
            raise ConfigError(
                f"analyze: --only: unknown analysis {', '.join(unknown) or '(none given)'}; "
                f"expected a comma-separated list of {', '.join(ANALYSES)}"
            )
    tree = parse_overrides(overrides)
    bad = [k for k in tree if not k.startswith("eval.") and k != "eval" and k not in RUNS_MAY_CHANGE]
    if bad:
        raise ConfigError(
            f"analyze: {', '.join(bad)}: cannot change what the checkpoint was trained with; "
            f"expected eval.* or {', '.join(sorted(RUNS_MAY_CHANGE))}"
        )
    return tree


def analysis_config(
    stored: dict[str, Any], only: Sequence[str] | None, overrides: Sequence[str], source: str
) -> TrainConfig:
    """The config the analyses run under: the checkpoint's, with `overrides` and eval.analyses set to `only`.

    Without `only`: the overrides' eval.analyses, else the checkpoint's, else every analysis.

    Raises:
        ConfigError: an unknown analysis, an override of a key outside eval.* and `RUNS_MAY_CHANGE`, or an
            invalid value.
    """
    tree = check_arguments(only, overrides)
    if only is not None:
        tree["eval.analyses"] = list(dict.fromkeys(only))
    elif "eval.analyses" not in tree:
        stored_eval = stored.get("eval")
        asked = stored_eval.get("analyses") if isinstance(stored_eval, dict) else None
        tree["eval.analyses"] = asked or list(ANALYSES)
    elif tree["eval.analyses"] == []:  # for `train`, no analyses; here, a command with nothing to do
        raise ConfigError(
            f"analyze: eval.analyses: an empty list; expected one or more of {', '.join(ANALYSES)} (or leave it "
            "out for the run's own, else all)"
        )
    return validate_config(tree, source, defaults=stored)


def default_out_dir(path: str | Path) -> Path:
    """`RUN_DIR/analyses` for a run directory or a checkpoint inside one (`RUN_DIR/checkpoints/epoch_*/`);
    `CHECKPOINT_DIR/analyses` for a checkpoint elsewhere."""
    ckpt = find_checkpoint(path)
    run = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS_DIR else ckpt
    return run / ANALYSES_DIR


def analyze(
    path: str | Path,
    only: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    out_dir: str | Path | None = None,
) -> tuple[AnalysisReport, Path, int]:
    """Run the analyses on the checkpoint at `path` (a run directory: its latest checkpoint).

    Returns:
        The report, the directory written (`default_out_dir` unless `out_dir`), and the checkpoint's epoch.

    Raises:
        ConfigError: no checkpoint at `path`, an unreadable one, or bad arguments (see `analysis_config`).
    """
    check_arguments(only, overrides)
    try:
        state = load_checkpoint(path)
        out = Path(out_dir) if out_dir is not None else default_out_dir(path)
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(str(err)) from None
    writable_dir(
        out_dir if out_dir is not None else out, "--out" if out_dir is not None else "the analyses' directory"
    )
    cfg = analysis_config(state["config"], only, overrides, f"{path} + overrides")
    if cfg.run.threads:
        import torch

        torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    device = resolve_device(cfg)
    model = build_model(cfg.model, cfg.in_channels)
    model.load_state_dict(state["model"])
    model = prepare_for_device(model, device, cfg.model)
    train_data = load_split(cfg.data, "train", cfg.run.seed)
    check_same_data(state.get("data"), data_identity(train_data), cfg.data.root, f"the checkpoint at {path}")
    val_data = load_split(cfg.data, "val", cfg.run.seed)
    report = run_analyses(
        model, cfg, train_data, val_data, device, cfg.eval.analyses, out, use_bf16(cfg, device)
    )
    return report, out, int(state["epoch"])
