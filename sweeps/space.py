"""SweepSpec -> what Tune searches, and the evaluation variants every trial probes without retraining.

The rule (README, "Evaluation-only axes"): a discrete (`choice`/`grid`) axis under `eval.` never reaches
Tune. Each trial trains once and probes every value of every such axis on the same checkpoints:
`eval.aggregation` values are unioned into one list (one pass of patch embeddings serves every scheme),
and the other eval axes form named variants whose metrics carry a suffix, e.g.
`val/knn_top1/mean_emb:grid_stride-4`. The objective the spec names is then the best value over those
variants (and over schemes when the metric names no scheme): `sweeps.spec.Objective`. A variant leaves
out the knobs its own options ignore and is probed once (`variant_values`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bagssl_core.config import EvalConfig, TrainConfig, merge_overrides, validate_config
from sweeps.spec import Distribution, SweepSpec, coerce_value

_SAFE = re.compile(r"[^\w.\- /]")


def tune_domain(d: Distribution) -> Any:
    """The Tune search domain of one axis."""
    from ray import tune

    a = d.args
    match d.kind:
        case "choice":
            return tune.choice(list(a))
        case "grid":
            return tune.grid_search(list(a))
        case "uniform":
            return tune.uniform(a[0], a[1])
        case "loguniform":
            return tune.loguniform(a[0], a[1])
        case "randint":
            return tune.randint(a[0], a[1])
        case "quniform":
            return tune.quniform(a[0], a[1], a[2])
    raise ValueError(f"unknown distribution {d.kind!r}")


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space over dotted TrainConfig paths (training axes only)."""
    return {key: tune_domain(d) for key, d in spec.train_axes().items()}


def trial_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune trial's config -> dotted TrainConfig overrides (scalars for list fields wrapped)."""
    return {k: coerce_value(k, v) for k, v in params.items()}


def _variant_name(values: Mapping[str, Any]) -> str:
    """`grid_stride-4:patches-grid`: only characters MLflow allows in metric names."""
    return ":".join(f"{k.removeprefix('eval.')}-{_SAFE.sub('', str(v))}" for k, v in values.items())


@dataclass(frozen=True)
class VariantRow:
    """One combination of the non-aggregation eval axes' values, over a base config."""

    values: dict[str, Any]  # dotted eval path -> the value the combination gives it
    kept: dict[str, Any]  # those values less the knobs this combination's options ignore
    ignored: dict[
        str, str
    ]  # every knob the combination's options ignore -> why (`TrainConfig.ignored_knobs`)


def _shared_overrides(spec: SweepSpec) -> dict[str, Any]:
    """`eval.aggregation` as the union of every value listed for it (one pass serves every scheme)."""
    axes = spec.eval_axes()
    if "eval.aggregation" not in axes:
        return {}
    schemes: list[str] = []
    for v in axes["eval.aggregation"].args:
        schemes.extend(s for s in coerce_value("eval.aggregation", v) if s not in schemes)
    return {"eval.aggregation": schemes}


def variant_table(spec: SweepSpec, base: TrainConfig | Mapping[str, Any]) -> list[VariantRow]:
    """Every combination of the non-aggregation eval axes over `base` (a config or its tree), with the knobs
    its options ignore. ConfigError when a combination is no valid config."""
    others = {k: list(d.args) for k, d in spec.eval_axes().items() if k != "eval.aggregation"}
    tree = base.model_dump(mode="json") if isinstance(base, TrainConfig) else dict(base)
    shared = _shared_overrides(spec)
    rows = []
    for combo in itertools.product(*others.values()):
        values = dict(zip(others, combo, strict=True))
        over = {**shared, **{k: coerce_value(k, v) for k, v in values.items()}}
        # Knobs of the base that this variant's options ignore are dropped, not reported (`defaults`).
        ignored = validate_config(
            {}, "evaluation variant", defaults=merge_overrides(tree, over)
        ).ignored_knobs()
        rows.append(VariantRow(values, {k: v for k, v in values.items() if k not in ignored}, ignored))
    return rows


def variant_values(spec: SweepSpec, base: TrainConfig | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {dotted eval path: value} for every distinct evaluation variant over `base`.

    A variant is a combination of the non-aggregation eval axes' values, less the knobs its own options
    ignore: `eval.grid_stride` plays no part with `eval.patches=random`, so with axes `grid_stride: [4, 7]`
    and `patches: [grid, random]` the variants are `grid_stride-4:patches-grid`,
    `grid_stride-7:patches-grid` and `patches-random`, once. Keeping the ignored knob would probe the same
    evaluation twice under two names that claim a stride it never used. (A knob that no variant uses is a
    spec error: `sweeps.spec.load_spec`.) The names depend on the base only through its eval options.
    """
    if not any(k != "eval.aggregation" for k in spec.eval_axes()):
        return {"": {}}
    out: dict[str, dict[str, Any]] = {}
    for row in variant_table(spec, base):
        out.setdefault(_variant_name(row.kept), row.kept)
    return out


def variant_overrides(spec: SweepSpec, base: TrainConfig | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> the dotted `eval.` overrides of each evaluation variant (`variant_values`), with
    `eval.aggregation` as the union of every value listed for it ("" alone, with no override or only the
    aggregation, when the spec has no other eval axis)."""
    shared = _shared_overrides(spec)
    return {
        name: {**shared, **{k: coerce_value(k, v) for k, v in values.items()}}
        for name, values in variant_values(spec, base).items()
    }


def apply_variants(cfg: TrainConfig, overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, EvalConfig]:
    """name -> EvalConfig: cfg.eval with each variant's overrides. cfg is the trial's own config, so an
    `eval.` value the trial sampled (a continuous axis) reaches every variant's probes."""
    base_eval = cfg.eval.model_dump()
    return {
        name: EvalConfig.model_validate({**base_eval, **{k.removeprefix("eval."): v for k, v in ov.items()}})
        for name, ov in overrides.items()
    }


def eval_variants(spec: SweepSpec, base: TrainConfig) -> dict[str, EvalConfig]:
    """name -> EvalConfig for every variant of the spec over the config `base`."""
    return apply_variants(base, variant_overrides(spec, base))


def describe_space(spec: SweepSpec, base: TrainConfig) -> list[str]:
    """Human-readable lines: each axis, whether it is searched or enumerated per trial."""
    lines = []
    eval_axes = spec.eval_axes()
    for key, d in spec.space.items():
        how = (
            "enumerated inside each trial (no retraining)"
            if key in eval_axes
            else f"searched by {spec.search.algo}"
        )
        lines.append(f"  {key}: {d.kind} {list(d.args)} -> {how}")
    variants = eval_variants(spec, base)
    if list(variants) != [""]:
        lines.append(f"  evaluation variants per trial: {', '.join(variants)}")
    schemes = sorted({s for ev in variants.values() for s in ev.aggregation})
    lines.append(f"  schemes probed per trial: {', '.join(schemes)}")
    return lines
