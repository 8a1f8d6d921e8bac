"""SweepSpec -> what Tune searches, and the evaluation variants every trial probes without retraining.

The rule (README, "Evaluation-only axes"): a discrete (`choice`/`grid`) axis under `eval.` never reaches
Tune. Each trial trains once and probes every value of every such axis on the same checkpoints:
`eval.aggregation` values are unioned into one list (one pass of patch embeddings serves every scheme),
and the other eval axes form named variants whose metrics carry a suffix, e.g.
`val/knn_top1/mean_emb:grid_stride-4`. The objective the spec names is then the best value over those
variants (and over schemes when the metric names no scheme): `sweeps.spec.Objective`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from bagssl_core.config import EvalConfig, TrainConfig
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
    """`grid_stride-4:patches-random`: only characters MLflow allows in metric names."""
    return ":".join(f"{k.removeprefix('eval.')}-{_SAFE.sub('', str(v))}" for k, v in values.items())


def variant_values(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """name -> {dotted eval path: value} for every combination of the non-aggregation eval axes."""
    others = {k: list(d.args) for k, d in spec.eval_axes().items() if k != "eval.aggregation"}
    if not others:
        return {"": {}}
    combos = (dict(zip(others, combo, strict=True)) for combo in itertools.product(*others.values()))
    return {_variant_name(values): values for values in combos}


def variant_overrides(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """name -> the dotted `eval.` overrides of each evaluation variant: the values of the discrete eval
    axes, and `eval.aggregation` as the union of every value listed for it ("" alone, with no override or
    only the aggregation, when the spec has no other eval axis)."""
    axes = spec.eval_axes()
    shared: dict[str, Any] = {}
    if "eval.aggregation" in axes:
        schemes: list[str] = []
        for v in axes["eval.aggregation"].args:
            schemes.extend(s for s in coerce_value("eval.aggregation", v) if s not in schemes)
        shared["eval.aggregation"] = schemes
    return {
        name: {**shared, **{k: coerce_value(k, v) for k, v in values.items()}}
        for name, values in variant_values(spec).items()
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
    return apply_variants(base, variant_overrides(spec))


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
