"""`python -m bagssl_core train|eval|analyze|baselines ...`: one BagSSL run, locally, no Ray.

    python -m bagssl_core train [--config FILE] [--out DIR] [--resume] [key=value ...]
    python -m bagssl_core eval CHECKPOINT [--out FILE] [key=value ...]
    python -m bagssl_core eval --random-init [--config FILE] [--out FILE] [key=value ...]
    python -m bagssl_core analyze RUN_DIR|CHECKPOINT [--only bag_curve,...] [--out DIR] [eval.key=value ...]
    python -m bagssl_core baselines [--config FILE] [--preset P] [--out FILE] [key=value ...]

`train` ends with a table of its final probes, `eval` prints the same table: for every scheme, probe and
statistic, the validation and the test accuracy side by side, each with its 95% Wilson interval.
`baselines` prints that table for raw pixels and for the randomly initialised backbone
(`bagssl_core.baselines`); `analyze` prints BagSSL's analyses (`bagssl_core.analyses`) and writes their
figures.

Bad input (a config error, a missing dataset, a missing checkpoint) is one message on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bagssl_core.arguments import Parser
from bagssl_core.config import (
    PRESETS,
    ConfigError,
    DataError,
    TrainConfig,
    error_message,
    flatten,
    is_under,
    load_config,
    parse_overrides,
    read_yaml_mapping,
    show_value,
    validate_config,
)
from bagssl_core.metrics import format_probe_table
from bagssl_core.openmp import prefer_passive_wait
from bagssl_core.outputs import refuse_empty_path, writable_dir, writable_file
from bagssl_core.run_files import CHECKPOINTS_DIR, SUMMARY_FILE, ended_run, find_checkpoint, run_owner

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line's parser, and each command's own."""
    p = Parser(prog="python -m bagssl_core", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (defaults: a short Fashion-MNIST job on CPU)")
    t.add_argument("--config", help="TrainConfig YAML file; key=value arguments override it")
    t.add_argument(
        "--preset",
        choices=[*PRESETS, "none"],
        default=None,
        help="settings under the config file; default 'quick' (a ~10-minute CPU job) when no --config is given",
    )
    t.add_argument("--out", help="run directory (default: run.out_dir)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in the run directory"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. patch.size=8 eval.aggregation=[mean_emb,centre]",
    )
    e = sub.add_parser(
        "eval",
        help="re-run the probes on a checkpoint (or on a randomly initialised backbone), on val and test",
    )
    e.add_argument(
        "checkpoint",
        nargs="?",
        help="a checkpoint directory, a run directory (latest checkpoint) or state.pt",
    )
    e.add_argument(
        "--random-init", action="store_true", help="probe an untrained model built from --config (a baseline)"
    )
    e.add_argument("--config", help="with --random-init: TrainConfig YAML file")
    e.add_argument("--out", help="write the probe results (val and test, with intervals) as JSON here")
    e.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. eval.aggregation=[mean_emb,max_emb,whole]"
    )
    a = sub.add_parser(
        "analyze", help="BagSSL's analyses of a checkpoint: bag curve, whole vs mean, locality"
    )
    a.add_argument(
        "checkpoint", help="a run directory (latest checkpoint), a checkpoint directory or state.pt"
    )
    a.add_argument(
        "--only",
        help="comma-separated analyses (bag_curve, whole_vs_mean, locality); default: the run's "
        "eval.analyses, else all",
    )
    a.add_argument("--out", help="directory for analyses.json and the PNGs (default: RUN_DIR/analyses)")
    a.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="eval.* (e.g. eval.analysis.train_patches=5000), run.device, run.threads, data.root",
    )
    b = sub.add_parser(
        "baselines", help="probe raw pixels and the randomly initialised backbone on a config's splits"
    )
    b.add_argument(
        "--config", help="TrainConfig YAML file (a run's config.yaml); key=value arguments override it"
    )
    b.add_argument(
        "--preset",
        choices=[*PRESETS, "none"],
        default=None,
        help="settings under the config file; default 'quick' when no --config is given (as train)",
    )
    b.add_argument("--out", help="write the baseline metrics as JSON here")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.probes=[knn]")
    return p, {"train": t, "eval": e, "analyze": a, "baselines": b}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with options and key=value overrides in any order (`eval RUN --out F eval.knn_k=5`).

    Each command's parser reads its arguments intermixed: argparse's plain parsing gives a `nargs="*"`
    positional only the values before the first option and refuses the rest. Intermixed parsing does not
    work through subparsers, so the command is picked here; --help and an unknown command go to the
    top-level parser.
    """
    parser, commands = _parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def _analyze(args: argparse.Namespace) -> int:
    from bagssl_core.analyze import analyze

    only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    report, out, epoch = analyze(args.checkpoint, only, args.overrides, args.out)
    print(f"checkpoint: {args.checkpoint} (epoch {epoch})\n")
    print(report.text)
    print()
    for name, path in report.figures.items():
        print(f"{name}: {path}")
    print(f"metrics: {out / 'analyses.json'}")
    return EXIT_OK


def _baselines(args: argparse.Namespace) -> int:
    cfg = _given_config(args)
    # Before the probes, whose results would be lost to a path that cannot be written.
    if args.out is not None:
        writable_file(args.out, "--out")

    from bagssl_core.baselines import format_baselines, score_baselines_on
    from bagssl_core.metrics import n_images
    from bagssl_core.train import load_splits

    splits = load_splits(cfg)
    metrics = score_baselines_on(cfg, splits)
    print(format_baselines(metrics, {n_images(s): len(d) for s, d in splits[1].items()}))
    if args.out:
        _write_json(args.out, metrics)
    return EXIT_OK


def _write_json(path: str, payload: object) -> None:
    """An --out file, in a directory `writable_file` found writable or creatable at the command's start."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _train(args: argparse.Namespace) -> int:
    # torch is imported only once the command line is known to be good: bad input fails in a fraction of
    # a second, not after the seconds torch and torchvision take to import.
    resume = None
    ended = None
    if args.resume:
        out, cfg = _resumed_run(args)
        ended = ended_run(out)
        if ended is None:
            try:
                resume = find_checkpoint(out)
            except FileNotFoundError as err:
                raise ConfigError(f"--resume: {err}") from None
    else:
        cfg = _given_config(args)
        if args.out is not None:
            refuse_empty_path(args.out, "--out", "the run's directory (or leave --out out for run.out_dir)")
        out = Path(args.out or cfg.run.out_dir)
        if (out / SUMMARY_FILE).exists() or (out / CHECKPOINTS_DIR).exists():
            raise ConfigError(f"{out}: already holds a run; pass --resume to continue it, or another --out")
        owner = run_owner(out)
        if owner is not None:  # a new run there would replace the files of an existing one
            raise ConfigError(f"{out}: part of {owner}; expected a directory outside a run's own files")
    if ended is not None:  # answered from the run directory alone, without importing torch
        print(f"{out}: the run has already ended; nothing to resume, nothing changed", file=sys.stderr)
        result = ended
    else:
        writable_dir(out, "--out" if args.out else "run.out_dir")  # before torch's import, and any work
        from bagssl_core.provenance import provenance
        from bagssl_core.train import train

        out.mkdir(parents=True, exist_ok=True)
        (out / "provenance.json").write_text(json.dumps(provenance(), indent=2) + "\n")
        result = train(cfg, out, resume_from=resume, progress=not args.quiet)
    print(format_probe_table(result.metrics))
    print(f"status: {result.status} after {result.epochs} epochs; run directory: {out}")
    return EXIT_OK if result.status == "finished" else EXIT_FAILED


def _given_config(args: argparse.Namespace) -> TrainConfig:
    """The config the command line describes: --config (else the quick preset) and --preset, overrides."""
    preset = args.preset or ("quick" if args.config is None else "none")
    return load_config(args.config, args.overrides, preset=None if preset == "none" else preset)


# What a resumed run may take from the command line instead of its config.yaml: where it runs and where
# its files are, never what it computes.
RESUME_MAY_CHANGE = frozenset({"run.device", "run.threads", "run.out_dir", "data.root", "data.num_workers"})


def _resumed_run(args: argparse.Namespace) -> tuple[Path, TrainConfig]:
    """The directory of the run to resume (--out, else the given config's run.out_dir) and the config it
    continues with: its own `config.yaml`.

    A --config or --preset must describe the run's config, and overrides (alone, they apply to the run's
    config) must keep it, but for the keys of `RESUME_MAY_CHANGE`, whose given values are used.

    Raises:
        ConfigError: the directory holds no config.yaml, or the given config differs from it elsewhere
            (each such key listed with both values).
    """
    given = _given_config(args) if args.config is not None or args.preset is not None else None
    # Without --out: the directory `train` with the same arguments would have written.
    out = Path(args.out or (given or _given_config(args)).run.out_dir)
    path = out / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {path}: no such file; expected the directory of a run to continue")
    # A stored config is a layer of defaults: any dump of a valid config loads (see validate_config).
    run_cfg = validate_config({}, str(path), defaults=read_yaml_mapping(path))
    if given is None:
        given = validate_config(
            parse_overrides(args.overrides), "overrides", defaults=run_cfg.model_dump(mode="json")
        )
    run, new = flatten(run_cfg.model_dump(mode="json")), flatten(given.model_dump(mode="json"))
    differ = [
        k for k in dict.fromkeys([*run, *new]) if k not in RESUME_MAY_CHANGE and run.get(k) != new.get(k)
    ]
    if differ:
        lines = [f"  {k}: run has {_shown(run, k)}, given {_shown(new, k)}" for k in differ]
        raise ConfigError(
            f"--resume: the given config differs from the run's ({path}); a resumed run keeps its config, "
            f"only {', '.join(sorted(RESUME_MAY_CHANGE))} may change:\n" + "\n".join(lines)
        )
    return out, given


def _shown(flat: dict[str, object], key: str) -> str:
    return show_value(flat[key]) if key in flat else "(not used)"


def _eval(args: argparse.Namespace) -> int:
    if args.random_init and args.checkpoint is not None and "=" in args.checkpoint:
        # argparse hands the first key=value to the optional CHECKPOINT positional
        args.overrides, args.checkpoint = [args.checkpoint, *args.overrides], None
    if args.random_init == (args.checkpoint is not None):
        raise ConfigError("eval: expected either a CHECKPOINT or --random-init (with an optional --config)")
    if args.out is not None:
        writable_file(args.out, "--out")
    if args.random_init:
        cfg = load_config(args.config, args.overrides)
    else:
        ckpt = _checkpoint_to_probe(args)

    from bagssl_core.baselines import probe_backbone
    from bagssl_core.metrics import EPOCH, metric_names
    from bagssl_core.train import load_checkpoint

    if args.random_init:
        state, epoch = None, 0
    else:
        try:
            state = load_checkpoint(ckpt)
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError(str(err)) from None
        source = f"{args.checkpoint} + overrides"
        cfg = validate_config(parse_overrides(args.overrides), source, defaults=state["config"])
        _refuse_other_channels(cfg, state["model"])
        epoch = state["epoch"]
    metrics = metric_names(probe_backbone(cfg, None if state is None else state["model"]))
    print(format_probe_table(metrics))
    if args.out:
        what = "random-init" if args.random_init else str(args.checkpoint)
        payload = {"checkpoint": what, EPOCH: epoch, **metrics}
        _write_json(args.out, payload)
    return EXIT_OK


def _refuse_other_channels(cfg: TrainConfig, weights: dict[str, Any]) -> None:
    """ConfigError when data.* overrides give the checkpoint's backbone images of other channels than it was
    trained on (a grayscale dataset kept at 1 channel, or data.to_rgb): its first layer cannot take them.
    That layer is the first convolution among the weights, which follow the modules' order."""
    trained = next(int(w.shape[1]) for w in weights.values() if w.ndim == 4)
    if cfg.in_channels != trained:
        raise ConfigError(
            f"eval: data.name={cfg.data.name}, data.to_rgb={str(cfg.data.to_rgb).lower()}: images of "
            f"{cfg.in_channels} channel{'s' if cfg.in_channels > 1 else ''}, but the checkpoint's backbone takes "
            f"{trained}; expected data overrides that keep its input channels"
        )


def _checkpoint_to_probe(args: argparse.Namespace) -> Path:
    """`eval CHECKPOINT`'s checkpoint directory, once the arguments fit a checkpoint; before torch is
    imported, so that a wrong path or flag fails at once."""
    if args.config is not None:
        raise ConfigError(
            "eval: --config: read with --random-init only; a checkpoint is probed under its own config, "
            "expected key=value overrides of it instead"
        )
    # The weights fix the architecture: another one cannot load them.
    fixed = [k for k in flatten(parse_overrides(args.overrides)) if is_under(k, ("model",))]
    if fixed:
        raise ConfigError(
            f"eval: {', '.join(fixed)}: the checkpoint's model is fixed; expected overrides of how it is "
            "probed (eval.*, data.*, patch.*, run.*)"
        )
    try:
        return find_checkpoint(args.checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None


COMMANDS = {"train": _train, "eval": _eval, "analyze": _analyze, "baselines": _baselines}


def main(argv: list[str] | None = None) -> int:
    prefer_passive_wait()  # before any command imports torch
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
