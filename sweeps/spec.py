"""SweepSpec: a sweep described in YAML, validated before anything starts.

Every error names the spec file, the line where it can, the key and what was expected. Importing this
module does not import Ray, torch or MLflow, so a bad spec fails in well under a second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from bagssl_core.config import (
    ConfigError,
    TrainConfig,
    config_defaults,
    describe_validation_error,
    merge_overrides,
    parse_overrides,
    read_yaml_file,
    read_yaml_mapping,
    set_dotted,
    validate_config,
    yaml_location,
)

DIST_KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
PROBE_METRIC = re.compile(r"^(knn|linear)_top(1|5)(/[a-z_]+)?$")
# What the trainer reports every epoch besides the probes (see bagssl_core.train).
TRAIN_METRICS = frozenset({"train/loss", "lr", "patches_per_s", "epoch_seconds"})
LOSS_PARTS = {
    "bag_vicreg": ("invariance", "variance", "covariance"),
    "vicreg": ("invariance", "variance", "covariance"),
    "tcr": ("coding_rate", "similarity"),
}


class SpecError(ValueError):
    """A problem with a sweep spec, phrased for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """Exactly one of the keys: the distribution of one dotted TrainConfig path."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    quniform: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Distribution:
        given = [k for k in DIST_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"expected exactly one of {', '.join(DIST_KINDS)}; got {given or 'none'}")
        kind, v = self.kind, self.args
        if self.discrete and not v:
            raise ValueError(f"{kind}: expected a non-empty list of values")
        if not self.discrete and not v[0] < v[1]:
            raise ValueError(f"{kind}: expected low < high, got {list(v)}")
        if kind == "loguniform" and v[0] <= 0:
            raise ValueError(f"loguniform: expected positive bounds, got {list(v)}")
        if kind == "quniform" and v[2] <= 0:
            raise ValueError(f"quniform: expected a positive step q, got {v[2]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DIST_KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "grid")

    def probe_values(self) -> list[Any]:
        """Values to validate against TrainConfig before the sweep starts: every listed value, or the bounds
        (randint's upper bound is exclusive, as in Tune)."""
        a = self.args
        if self.discrete:
            return list(a)
        if self.kind == "randint":
            return [a[0], a[1] - 1]
        return [a[0], a[1]]


class SearchSpec(_Strict):
    algo: Literal["optuna", "grid", "random"] = "optuna"
    sampler: Literal["tpe", "random", "cmaes", "gp"] = Field("tpe", description="optuna only")
    seed: int = 0
    n_startup_trials: int = Field(4, ge=0, description="optuna tpe: random trials before TPE takes over")


class SchedulerSpec(_Strict):
    name: Literal["asha", "median", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesSpec(_Strict):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)


class TrackingSpec(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    experiment: str = "bagssl"


class FailureSpec(_Strict):
    max_retries: int = Field(
        1, ge=0, description="times a failed trial's Train run is restarted from its checkpoint"
    )


def _config_path(key: str) -> str:
    """A space key: a dotted TrainConfig path, with a hint when only its last part is right."""
    if key not in config_defaults():
        close = sorted(p for p in config_defaults() if p.split(".")[-1] == key.split(".")[-1])
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"not a TrainConfig field{hint}; expected a dotted path such as patch.size")
    return key


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[Annotated[str, AfterValidator(_config_path)], Distribution] = Field(min_length=1)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: str
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage_path: str = "./sweeps_storage"
    failure: FailureSpec = Field(default_factory=FailureSpec)

    # --- derived --------------------------------------------------------------------------------
    def eval_axes(self) -> dict[str, Distribution]:
        """Discrete eval.* axes: enumerated inside every trial on the same checkpoints, never retrained."""
        return {k: d for k, d in self.space.items() if k.startswith("eval.") and d.discrete}

    def train_axes(self) -> dict[str, Distribution]:
        """Axes searched by Tune: every trial trains its own model."""
        ev = self.eval_axes()
        return {k: d for k, d in self.space.items() if k not in ev}


def apply_spec_overrides(tree: dict[str, Any], items: Iterable[str]) -> dict[str, Any]:
    """`--set key=value` on the spec: `num_samples=2`, `base.schedule.epochs=1`,
    `space.patch.size={choice: [8, 16]}` (everything after `space.` is one dotted TrainConfig path)."""
    for key, value in parse_overrides(items).items():
        if key.startswith("space."):
            tree.setdefault("space", {})
            if not isinstance(tree["space"], dict):
                raise SpecError(f"--set {key}: space is not a mapping")
            tree["space"][key.removeprefix("space.")] = value
        else:
            try:
                set_dotted(tree, key, value)
            except ConfigError as err:
                raise SpecError(f"--set {key}: {err}") from None
    return tree


def resolve_base(spec: SweepSpec, spec_dir: Path, source: str) -> dict[str, Any]:
    """The base TrainConfig as a plain dict: the `base.config` file (relative to the spec), with the spec's
    other base keys merged over it key by key (see `merge_overrides`)."""
    base = dict(spec.base)
    cfg_path = base.pop("config", None)
    tree: dict[str, Any] = {}
    if cfg_path is not None:
        try:
            tree = read_yaml_mapping(spec_dir / str(cfg_path))
        except ConfigError as err:
            raise SpecError(f"{source}: base.config: {err}") from None
    try:
        return merge_overrides(tree, base)
    except ConfigError as err:
        raise SpecError(f"{source}: base: {err}") from None


def coerce_value(path: str, value: Any) -> Any:
    """A scalar given for a list-typed field (e.g. `eval.aggregation: centre`) means a one-element list."""
    if isinstance(config_defaults().get(path), list) and not isinstance(value, list):
        return [value]
    return value


def known_metrics(spec: SweepSpec, base_cfg: TrainConfig) -> set[str]:
    """Every metric a trial of this sweep reports (probe metrics for every scheme it will evaluate)."""
    schemes = _names_in_trials(spec, "eval.aggregation", base_cfg.eval.aggregation)
    probes = _names_in_trials(spec, "eval.probes", base_cfg.eval.probes)
    out = set(TRAIN_METRICS)
    losses = {base_cfg.loss.name}
    if "loss.name" in spec.space:
        losses.update(spec.space["loss.name"].probe_values())
    for name in losses:
        out.update(f"train/{p}" for p in LOSS_PARTS.get(name, ()))
    for probe in probes:
        for k in (1, 5):
            out.add(f"{probe}_top{k}")
            out.update(f"{probe}_top{k}/{s}" for s in schemes)
    return out


def _names_in_trials(spec: SweepSpec, key: str, base_names: Iterable[str]) -> set[str]:
    """The names a list field holds across trials: the swept values replace the base list, never add to it
    (see sweeps.space.eval_variants)."""
    if key not in spec.space:
        return set(base_names)
    return {name for v in spec.space[key].probe_values() for name in coerce_value(key, v)}


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> tuple[SweepSpec, TrainConfig]:
    """Read, override and validate a spec; also validate every value of its space against TrainConfig.

    Returns the spec and the base TrainConfig. Raises SpecError with file, line, key and expectation.
    """
    p = Path(path)
    source = str(p)
    try:
        tree, lines = read_yaml_file(p, "a mapping (name, base, space, metric, ...)")
    except ConfigError as err:
        raise SpecError(str(err)) from None
    tree = apply_spec_overrides(tree, overrides)
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as err:
        raise SpecError(describe_validation_error(err, tree, source, lines)) from None

    def at(key: str) -> str:
        return yaml_location(source, lines, key)

    base_tree = resolve_base(spec, p.parent, source)
    try:
        base_cfg = validate_config(base_tree)
    except ConfigError as err:
        raise SpecError(f"{at('base')}: base: {_indent(err)}") from None
    _check_space_values(spec, base_tree, at)
    _check_metric(spec, base_cfg, at)
    _check_grid_axes(spec, at)
    return spec, base_cfg


def _check_space_values(spec: SweepSpec, base_tree: dict[str, Any], at: Callable[[str], str]) -> None:
    """Every value a trial can get (the bounds of a range) must make a valid TrainConfig over the base."""
    for key, d in spec.space.items():
        for v in d.probe_values():
            try:
                validate_config(merge_overrides(base_tree, {key: coerce_value(key, v)}))
            except ConfigError as err:
                raise SpecError(
                    f"{at(f'space.{key}')}: space.{key}: value {v!r} is rejected: {_indent(err)}"
                ) from None


def _check_metric(spec: SweepSpec, base_cfg: TrainConfig, at: Callable[[str], str]) -> None:
    metrics = known_metrics(spec, base_cfg)
    if spec.metric not in metrics:
        probes = sorted(m for m in metrics if PROBE_METRIC.match(m))
        raise SpecError(
            f"{at('metric')}: metric: {spec.metric!r} is never reported by the trainer; expected one of "
            f"{', '.join(probes[:12])}{' ...' if len(probes) > 12 else ''} or {', '.join(sorted(TRAIN_METRICS))}"
        )


def _check_grid_axes(spec: SweepSpec, at: Callable[[str], str]) -> None:
    grids = [k for k, d in spec.train_axes().items() if d.kind == "grid"]
    if spec.search.algo == "optuna" and grids:
        raise SpecError(
            f"{at(f'space.{grids[0]}')}: space.{grids[0]}: grid needs search.algo: grid "
            "(Optuna samples; use choice with optuna)"
        )


def _indent(err: ConfigError) -> str:
    """A multi-line message under the line that introduces it."""
    return str(err).replace("\n", "\n  ")


def trial_count(spec: SweepSpec) -> int:
    """Trials Tune will run: num_samples, times the product of grid sizes (grid repeats per sample)."""
    grid = math.prod(len(d.args) for d in spec.train_axes().values() if d.kind == "grid")
    return spec.num_samples * grid


def epoch_range(spec: SweepSpec, base_epochs: int) -> tuple[int, int]:
    """The fewest and the most epochs a trial runs: the bounds of a `schedule.epochs` axis, else the
    base's count twice."""
    if "schedule.epochs" not in spec.space:
        return base_epochs, base_epochs
    values = [int(v) for v in spec.space["schedule.epochs"].probe_values()]
    return min(values), max(values)


def asha_max_t(spec: SweepSpec, base_epochs: int) -> int:
    """ASHA's max_t: one epoch more than the longest trial runs, so that trials which run all their
    epochs end by themselves instead of being stopped at their last report (docs/operations.md, "ASHA")."""
    return epoch_range(spec, base_epochs)[1] + 1


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec as plain YAML-ready data that `load_spec` reads back to the same spec."""
    return spec.model_dump(mode="json", exclude_none=True)
