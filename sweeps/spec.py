"""SweepSpec: a sweep described in YAML, validated before anything starts.

Every error names the spec file, the line where it can, the key and what was expected. Importing this
module does not import Ray, torch or MLflow, so a bad spec fails in well under a second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bagssl_core.config import (
    RENAMED_KNOBS,
    ConfigError,
    TrainConfig,
    config_defaults,
    describe_validation_error,
    expand_dotted,
    flatten,
    is_set,
    is_under,
    merge_overrides,
    override_locations,
    parse_overrides,
    read_yaml_file,
    refuse_bool_for_number,
    set_dotted,
    show_value,
    validate_config,
    yaml_location,
)
from bagssl_core.metrics import ProbeKey, ProbeQuery, best_key, expected_metrics

# Failed starts of a trial's worker group tolerated before the trial fails (Train's controller_failure_limit,
# counted over the whole trial): Ray's default, -1, would wait forever for a node that never returns.
START_FAILURES_TOLERATED = 3

DIST_KINDS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


class SpecError(ValueError):
    """A problem with a sweep spec, phrased for the user."""


class _Strict(BaseModel):
    # Bounds, resources, timeouts: an infinite one is never what was meant, and fails only mid-sweep.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_for_number(cls, value, info)


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

    def inner_draw(self) -> float | None:
        """A draw strictly between the bounds of a uniform or loguniform axis (None for other kinds): a
        fractional number even where both bounds are whole, as most of the axis's draws are."""
        a = self.args
        if self.kind == "uniform":
            return float(a[0] + 0.37 * (a[1] - a[0]))
        if self.kind == "loguniform":
            return float(a[0] * (a[1] / a[0]) ** 0.37)
        return None


class SearchSpec(_Strict):
    algo: Literal["optuna", "grid", "random"] = "optuna"
    sampler: Literal["tpe", "random", "cmaes", "gp"] = Field("tpe", description="optuna only")
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="the searcher's seed (numpy's range, as Optuna's samplers take)"
    )
    n_startup_trials: int = Field(4, ge=0, description="optuna tpe: random trials before TPE takes over")
    warm_start: bool = Field(
        False,
        description="optuna only: start the study with the finished trials of earlier sweeps in the same "
        "MLflow experiment with the same space and base config (sweeps.searcher)",
    )

    @model_validator(mode="after")
    def _warm_start_needs_optuna(self) -> SearchSpec:
        if self.warm_start and self.algo != "optuna":
            raise ValueError(
                f"warm_start: true needs algo: optuna (Optuna's study holds the earlier trials); got {self.algo}"
            )
        return self

    @model_validator(mode="after")
    def _no_unused_option(self) -> SearchSpec:
        """An option the chosen search never reads is refused when set to anything but its default, not
        silently ignored. Defaults pass: a spec dumped whole (`spec_to_dict`, as a sweep logs it) reads back."""
        fields = type(self).model_fields
        changed = [k for k in ("sampler", "n_startup_trials") if getattr(self, k) != fields[k].default]
        if self.algo != "optuna" and changed:
            raise ValueError(
                f"{', '.join(changed)}: used by algo: optuna only, and algo is {self.algo}; expected "
                f"algo: optuna, or no {' or '.join(changed)}"
            )
        if self.sampler != "tpe" and "n_startup_trials" in changed:
            raise ValueError(
                f"n_startup_trials: used by sampler: tpe only, and sampler is {self.sampler}; expected "
                "sampler: tpe, or no n_startup_trials"
            )
        return self


class SchedulerSpec(_Strict):
    name: Literal["asha", "median", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    probe_epochs: Literal["all", "rungs"] = Field(
        "all",
        description=(
            "all: trials probe every epoch (base.eval.every: 1); rungs (asha only): only at the epochs ASHA "
            "reads, its rungs, and the last, with the same decisions (`asha_probe_epochs`)"
        ),
    )

    @model_validator(mode="after")
    def _rungs_need_asha(self) -> SchedulerSpec:
        if self.probe_epochs == "rungs" and self.name != "asha":
            raise ValueError(f"probe_epochs: rungs are ASHA's; expected name: asha (got {self.name})")
        return self

    @model_validator(mode="after")
    def _no_unused_option(self) -> SchedulerSpec:
        """As for the search: a knob the chosen scheduler never reads is an error when set to anything but
        its default (ASHA reads both, the median rule only grace_period, none neither)."""
        used = {"asha": ("grace_period", "reduction_factor"), "median": ("grace_period",), "none": ()}[
            self.name
        ]
        fields = type(self).model_fields
        unused = [k for k in ("grace_period", "reduction_factor") if k not in used]
        changed = [k for k in unused if getattr(self, k) != fields[k].default]
        if changed:
            readers = "asha" if "reduction_factor" in changed else "asha or median"
            raise ValueError(
                f"{', '.join(changed)}: not read by name: {self.name}; expected name: {readers}, or no "
                f"{' or '.join(changed)}"
            )
        return self


class ResourcesSpec(_Strict):
    workers_per_trial: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    placement: Literal["pack", "spread"] = Field(
        "pack",
        description="a trial's workers: pack (fewest nodes) or spread (one worker per node, on distinct nodes)",
    )

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> ResourcesSpec:
        # NCCL refuses two ranks of one process group on one GPU ("Duplicate GPU detected"), and Ray gives
        # fractional GPUs of one trial's workers the same device whenever they land on one node.
        if 0 < self.gpus_per_worker < 1 and self.workers_per_trial > 1:
            raise ValueError(
                f"gpus_per_worker: {self.gpus_per_worker:g} with workers_per_trial {self.workers_per_trial} "
                "would put two DDP (NCCL) ranks of one trial on one GPU; expected gpus_per_worker >= 1, "
                "or workers_per_trial: 1 to share GPUs between trials"
            )
        return self


class TrackingSpec(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    experiment: str = Field("bagssl", min_length=1, max_length=500)  # MLflow's limits on a name
    outage_wait_s: float = Field(
        600.0,
        ge=0,
        description=(
            "an MLflow server that stops answering mid-sweep: its writes are held while the trials go on, "
            "and the end of each experiment waits this long for it before the sweep stops, naming them"
        ),
    )


class FailureSpec(_Strict):
    max_retries: int = Field(
        1, ge=0, description="times a failed trial's Train run is restarted from its checkpoint"
    )
    worker_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="seconds one start of a trial's worker group waits for room (a lost node's place) "
        f"before it counts as a failed start; a trial fails at failed start {START_FAILURES_TOLERATED + 1}",
    )
    health_check_interval_s: float = Field(
        0.5,
        gt=0,
        description="seconds between two polls of a trial's workers by its Train controller: a report, a "
        "finished run or a failed worker is seen up to this late (Ray's own default is 2 s)",
    )


def _config_path(key: str) -> str:
    """A space key: a dotted TrainConfig path, with a hint when only its last part is right."""
    if key in RENAMED_KNOBS:
        raise ValueError(f"renamed; expected {RENAMED_KNOBS[key]}")
    if key not in config_defaults():
        close = sorted(p for p in config_defaults() if p.split(".")[-1] == key.split(".")[-1])
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"not a TrainConfig field{hint}; expected a dotted path such as patch.size")
    return key


class RefineSpec(_Strict):
    """Re-train the best configs of the search with new seeds (sweeps.refine)."""

    top_k: int = Field(3, ge=1, description="how many of the search's best configs (by the val objective)")
    seeds: int = Field(3, ge=2, description="new seeds per config: at least 2 to measure a spread")


def _selectable_metric(name: str) -> str:
    """The spec's metric: a validation probe statistic or an epoch metric; never a test-split number, an
    interval bound or one evaluation variant (the objective is the best over the variants)."""
    query = ProbeQuery.parse(name)
    key = ProbeKey.parse(name)
    # A key with a bound or a variant is no query; point at the statistic it belongs to.
    stat = ProbeQuery(key.split, key.probe, key.stat, key.scheme) if query is None and key else query
    if stat is None:
        return name  # an epoch metric, or nothing the trainer reports (load_spec says which)
    val = replace(stat, split="val")
    if stat.split != "val":
        raise ValueError(
            f"{name!r} is scored on the {stat.split} split, which must never choose a config (the searcher, "
            f"scheduler and best-config pick read validation only); expected {val}"
        )
    if query is None and key is not None:
        what = "an interval bound" if key.bound else f"one evaluation variant ({key.variant})"
        raise ValueError(
            f"{name!r} names {what}; expected {val}, the statistic itself (the best over the evaluation "
            "variants, whose scheme and variant the best config then carries)"
        )
    return name


@dataclass(frozen=True)
class Objective:
    """What a sweep optimises, read from one trial report.

    `name` is the spec's metric, the key Tune, its searcher and its scheduler read. For a probe statistic
    (`query`, always on the validation split) the value is the best over the matching schemes and
    evaluation variants, which `sweeps.trainable.with_objective` adds to each report under `name`;
    otherwise (`query` None) it is an epoch metric such as `train/loss`, read as it is.
    """

    name: str
    mode: Literal["max", "min"]
    query: ProbeQuery | None

    def __post_init__(self) -> None:
        if self.query is not None and self.query.split != "val":
            raise ValueError(f"objective {self.name!r}: only validation metrics may choose a config")

    @classmethod
    def of(cls, metric: str, mode: Literal["max", "min"]) -> Objective:
        return cls(metric, mode, ProbeQuery.parse(metric))

    def keys(self, metrics: Mapping[str, float]) -> list[ProbeKey]:
        """The reported probe keys the objective is taken from (none for an epoch metric).

        The copy stored under `name` is left out whenever the keys it was taken from are present, so a
        key always names the scheme and variant that gave its value; it counts only when it is the one
        match (a query naming a scheme, evaluated without variants, is itself a reported key).
        """
        if self.query is None:
            return []
        found = [k for k in map(ProbeKey.parse, metrics) if k is not None and self.query.matches(k)]
        own = ProbeKey.parse(self.name)
        return [k for k in found if k != own] or found

    def best(self, metrics: Mapping[str, float]) -> tuple[ProbeKey | None, float] | None:
        """The objective in one report: the key that gave it (None for an epoch metric) and its value."""
        if self.query is None:
            return (None, float(metrics[self.name])) if self.name in metrics else None
        values = {k: float(metrics[str(k)]) for k in self.keys(metrics)}
        if not values:
            return None
        key = best_key(values, self.mode)
        return key, values[key]


class SweepSpec(_Strict):
    # A directory name under storage_path (with -N and _local appended): no '.' or '..', and short enough
    # for any file system.
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=100)
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[Annotated[str, AfterValidator(_config_path)], Distribution] = Field(min_length=1)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    metric: Annotated[str, AfterValidator(_selectable_metric)]
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage_path: str = "./sweeps_storage"
    failure: FailureSpec = Field(default_factory=FailureSpec)
    refine: RefineSpec | None = None
    baselines: bool = Field(
        True,
        description="score raw pixels and a randomly initialised backbone with the base's probes on its "
        "splits once per sweep, on the parent run, so the report shows what the objective must beat",
    )

    # --- derived --------------------------------------------------------------------------------
    def eval_axes(self) -> dict[str, Distribution]:
        """Discrete eval.* axes: enumerated inside every trial on the same checkpoints, never retrained."""
        return {k: d for k, d in self.space.items() if k.startswith("eval.") and d.discrete}

    def train_axes(self) -> dict[str, Distribution]:
        """Axes searched by Tune: every trial trains its own model."""
        ev = self.eval_axes()
        return {k: d for k, d in self.space.items() if k not in ev}

    def objective(self) -> Objective:
        return Objective.of(self.metric, self.mode)


def apply_spec_overrides(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`--set key=value` on the spec, as `parse_overrides` reads them: `num_samples=2`,
    `base.schedule.epochs=1`, `space.patch.size={choice: [8, 16]}` (everything after `space.` is one dotted
    TrainConfig path).

    A mapping given for a part of the base merges into it key by key, as an override of the core's config
    does (`base.data={name: cifar10}` keeps the base's batch size); any other value replaces what the spec
    has, a mapping included (`search={algo: grid}` is the whole search, `space.patch.size={grid: [8]}` the
    whole axis).
    """
    for key, value in overrides.items():
        if key == "base" or key.startswith("base."):
            inner = key.removeprefix("base").removeprefix(".")
            if not isinstance(tree.get("base", {}), dict):
                raise SpecError(
                    f"{key}: base is {show_value(tree['base'])}; expected a mapping of config sections"
                )
            try:
                tree["base"] = merge_overrides(tree.get("base", {}), {inner: value} if inner else value)
            except ConfigError as err:
                raise SpecError(f"{key}: {err}") from None
        elif key.startswith("space."):
            tree.setdefault("space", {})
            if not isinstance(tree["space"], dict):
                raise SpecError(f"{key}: space is {show_value(tree['space'])}; expected a mapping of axes")
            tree["space"][key.removeprefix("space.")] = value
        else:
            try:
                set_dotted(tree, key, value)
            except ConfigError as err:
                raise SpecError(f"{key}: {err}") from None
    return tree


def resolve_base(spec: SweepSpec, spec_dir: Path, source: str) -> dict[str, Any]:
    """The base TrainConfig as a plain dict: the `base.config` file (relative to the spec), with the spec's
    other base keys merged over it key by key (see `merge_overrides`)."""
    return _read_base(spec, spec_dir, source)[0]


def _read_base(spec: SweepSpec, spec_dir: Path, source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """`resolve_base`, and the `file:line` of each key the `base.config` file spells out and the spec's own
    base keys do not replace, as `base.<key>`: where the value the base holds for it was given."""
    base = dict(spec.base)
    cfg_path = base.pop("config", None)
    tree: dict[str, Any] = {}
    locations: dict[str, str] = {}
    if cfg_path is not None:
        if not isinstance(cfg_path, str) or not cfg_path.strip():
            raise SpecError(
                f"{source}: base.config: {show_value(cfg_path)}; expected the path of a TrainConfig YAML file, "
                "relative to the spec"
            )
        cfg_file = spec_dir / cfg_path
        try:
            tree, cfg_lines = read_yaml_file(cfg_file)
        except ConfigError as err:
            raise SpecError(f"{source}: base.config: {err}") from None
        given = flatten(base)
        locations = {
            f"base.{key}": f"{cfg_file}:{line}" for key, line in cfg_lines.items() if not is_under(key, given)
        }
    try:
        # Dotted keys in the file mean what they mean in the spec's own base.
        return merge_overrides(expand_dotted(tree), base), locations
    except ConfigError as err:
        raise SpecError(f"{source}: base: {err}") from None


def coerce_value(path: str, value: Any) -> Any:
    """A scalar given for a list-typed field (e.g. `eval.aggregation: centre`) means a one-element list."""
    if isinstance(config_defaults().get(path), list) and not isinstance(value, list):
        return [value]
    return value


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> tuple[SweepSpec, TrainConfig]:
    """Read, override and validate a spec; also validate every value of its space against TrainConfig.

    Returns the spec and the base TrainConfig. Raises SpecError with file, line, key and expectation.
    """
    read = _read_spec(path, overrides)
    _check_space_values(read.spec, read.base_tree, read.at)
    _check_metric(read.spec, read.base_tree, read.base_cfg, read.at)
    _check_grid_axes(read.spec, read.at)
    _check_probe_epochs(read.spec, read.base_cfg, read.at)
    return read.spec, read.base_cfg


def check_space_at_image_size(path: str | Path, overrides: Iterable[str], image_size: int) -> None:
    """`load_spec`'s check of the space's values again, with the base's images `image_size` px.

    An ImageFolder that keeps its images' own size has none until its files are read, so `load_spec` could
    not tell whether each axis's values fit it (a 40-px patch on 32-px images). The driver reads the size,
    then calls this: a value that does not fit is refused before the sweep, with the spec's line, instead
    of failing every trial that draws it.
    """
    read = _read_spec(path, overrides)
    sized = merge_overrides(read.base_tree, {"data.image_size": image_size})
    _check_space_values(read.spec, sized, read.at)


@dataclass(frozen=True)
class _ReadSpec:
    spec: SweepSpec
    base_tree: dict[str, Any]  # the base config as given (base.config file and the spec's base keys)
    base_cfg: TrainConfig
    at: Callable[[str], str]  # dotted spec key -> "file:line" where it was given


def _read_spec(path: str | Path, overrides: Iterable[str]) -> _ReadSpec:
    """The spec file with `--set` overrides applied, validated, and its base built and validated."""
    p = Path(path)
    source = str(p)
    try:
        tree, file_lines = read_yaml_file(p, "a mapping (name, base, space, metric, ...)")
    except ConfigError as err:
        raise SpecError(str(err)) from None
    given = parse_overrides(overrides)
    try:
        tree = apply_spec_overrides(tree, given)
    except SpecError as err:
        raise SpecError(f"{source} (--set): {err}") from None
    # A base mapping merges key by key (apply_spec_overrides): exactly its leaves now hold --set's values.
    set_keys = {k: v for k, v in given.items() if not is_under(k, ("base",))}
    set_keys |= flatten({k: v for k, v in given.items() if is_under(k, ("base",))})
    lines = override_locations(file_lines, set_keys, f"{source} (--set)")
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as err:
        raise SpecError(describe_validation_error(err, tree, source, lines)) from None

    def at(key: str) -> str:
        return yaml_location(source, lines, key)

    base_tree, base_file_lines = _read_base(spec, p.parent, source)
    try:
        # A base key the spec spells out (or --set gives) is located there; one it leaves to the base.config
        # file, at that file's line. The spec's keys win, since they are merged over the file's.
        base_cfg = validate_config(base_tree, source, base_file_lines | lines, prefix="base.")
    except ConfigError as err:
        raise SpecError(str(err)) from None
    return _ReadSpec(spec, base_tree, base_cfg, at)


def _check_probe_epochs(spec: SweepSpec, base_cfg: TrainConfig, at: Callable[[str], str]) -> None:
    """With a probe as the metric, trials must probe where the searcher and scheduler read: every epoch
    (base.eval.every: 1), or, with `scheduler.probe_epochs: rungs`, where the sweep sets it per trial, so
    that the base's own probing epochs would be ignored: an error."""
    if spec.scheduler.probe_epochs == "rungs":
        for key in ("eval.every", "eval.epochs"):
            if is_set(base_cfg, key) or key in spec.space:
                where = f"space.{key}" if key in spec.space else f"base.{key}"
                raise SpecError(
                    f"{at(where)}: {where}: scheduler.probe_epochs: rungs sets each trial's probing epochs "
                    f"(ASHA's rungs and the last); expected no {key} in the spec"
                )
        return
    if spec.objective().query is not None and base_cfg.eval.every != 1:
        raise SpecError(
            f"{at('base.eval.every')}: base.eval.every: the metric {spec.metric!r} must be reported every "
            "epoch for the searcher and scheduler to compare trials; expected base.eval.every: 1 "
            f"(got {base_cfg.eval.every}), or scheduler.probe_epochs: rungs"
        )


# Combinations of the discrete training axes `load_spec` builds and validates, at most: each takes about
# 0.3 ms (times 1 + the number of continuous axes), so the check stays within seconds; a sweep with more
# combinations would also need more trials than anyone runs to see each one.
MAX_COMBINATIONS = 4096


def _check_space_values(spec: SweepSpec, base_tree: dict[str, Any], at: Callable[[str], str]) -> None:
    """Every config a trial can be given must be valid, including the knobs it sets: an axis that the
    chosen options ignore is an error, never a silent no-op (README, "No silent axes").

    Options are themselves axes, so the rule is checked on combinations, not on each value alone:
      - Training axes (searched by Tune): every trial's config is the base with one value of each, built
        and validated whole (`TrialPlan.config`). So every combination of the discrete axes' values is
        validated, with each continuous axis at each of its bounds. A knob ignored in SOME combination is
        an error naming the values that ignore it (`loss.inv_weight` with `loss.name=tcr`), because Tune
        would sample that combination and the trial would fail at its start; an axis ignored in every
        combination is an error too. The same check finds values that are wrong only together (a patch
        size that fits one dataset and not the other).
      - Evaluation axes (discrete `eval.*`, enumerated inside each trial): the variants are probed on the
        same checkpoint, so a knob ignored by some variants but used by others is fine: those variants
        leave it out of their name (`sweeps.space.variant_values`). A knob no variant uses is an error.
    """
    _check_fractional_draws(spec, base_tree, at)
    _check_training_combinations(spec, base_tree, at)
    _check_evaluation_variants(spec, base_tree, at)


def _check_fractional_draws(spec: SweepSpec, base_tree: dict[str, Any], at: Callable[[str], str]) -> None:
    """A uniform or loguniform axis on a knob that takes whole numbers only: its bounds pass (1 and 20 are
    whole) but nearly every draw fails the trial it is given to."""
    for key, d in spec.space.items():
        draw = d.inner_draw()
        if draw is None:
            continue
        try:
            validate_config({}, defaults=merge_overrides(base_tree, {key: draw}))
        except ConfigError as err:
            if "int_from_float" in err.kinds:
                raise SpecError(
                    f"{at(f'space.{key}')}: space.{key}: {d.kind} draws fractional values such as {draw:.4g}, "
                    f"and {key} takes whole numbers; expected randint, choice or grid"
                ) from None


def _check_training_combinations(
    spec: SweepSpec, base_tree: dict[str, Any], at: Callable[[str], str]
) -> None:
    axes = spec.train_axes()
    discrete = {k: list(d.args) for k, d in axes.items() if d.discrete}
    ranges = {k: d.probe_values() for k, d in axes.items() if not d.discrete}
    count = math.prod(len(v) for v in discrete.values())
    if count > MAX_COMBINATIONS:
        sizes = ", ".join(f"{k} ({len(v)})" for k, v in discrete.items())
        raise SpecError(
            f"{at('space')}: space: the discrete axes {sizes} make {count} combinations, more than the "
            f"{MAX_COMBINATIONS} that are checked before a sweep starts; expected fewer values, or a "
            "split into several sweeps"
        )
    # Each combination with the continuous axes at their lower bounds, then each upper bound in turn.
    low = {k: v[0] for k, v in ranges.items()}
    points = [low] + [{**low, k: v[-1]} for k, v in ranges.items() if v[-1] != v[0]]
    assignments = [
        {**dict(zip(discrete, combo, strict=True)), **point}
        for combo in itertools.product(*discrete.values())
        for point in points
    ]
    failures: dict[str, list[tuple[int, str]]] = {}  # problem key -> (assignment, message), in order
    for i, values in enumerate(assignments):
        tree = merge_overrides(base_tree, {k: coerce_value(k, v) for k, v in values.items()})
        try:
            validate_config(tree)
        except ConfigError as err:
            for line in str(err).splitlines():
                failures.setdefault(line.partition(": ")[0], []).append((i, line))
    problems = [_describe_failure(spec, key, found, assignments, at) for key, found in failures.items()]
    if problems:
        raise SpecError("\n".join(dict.fromkeys(problems)))


def _describe_failure(
    spec: SweepSpec,
    key: str,
    found: list[tuple[int, str]],
    assignments: list[dict[str, Any]],
    at: Callable[[str], str],
) -> str:
    """One line for one problem (`key`) that some assignments of the training axes have: on the axis it
    names (else the one axis whose values cause it), with the values under which it happens."""
    failing = {i for i, _ in found}
    message = found[0][1]
    # The values of each axis among the failing assignments; an axis that fails at every value says nothing.
    axes = list(assignments[0])
    seen = {a: _unique(assignments[i][a] for i in sorted(failing)) for a in axes}
    every = {a: _unique(v[a] for v in assignments) for a in axes}
    cond = {a: seen[a] for a in axes if len(seen[a]) < len(every[a])}
    exact = failing == {i for i, v in enumerate(assignments) if all(v[a] in vals for a, vals in cond.items())}
    if not exact:  # an interaction of several axes: name one failing combination in full
        cond = {a: [assignments[min(failing)][a]] for a in axes if spec.space[a].discrete}
    blamed = key if key in spec.space else (next(iter(cond)) if len(cond) == 1 else None)
    where = f"{at(f'space.{blamed}')}: space.{blamed}" if blamed else f"{at('space')}: space"
    if blamed is not None and exact and set(cond) == {blamed}:
        values = " or ".join(repr(v) for v in cond[blamed])
        return f"{where}: value {values} is rejected: {message}" + _continuous_eval_hint(spec, blamed)
    if not cond:
        return f"{where}: rejected with every value: {message}" + _continuous_eval_hint(spec, key)
    when = ", ".join(f"{a}={' or '.join(show_value(v) for v in vals)}" for a, vals in cond.items())
    line = f"{where}: rejected when {when}: {message}"
    if len(cond) == 1:
        (option, bad), *_ = cond.items()
        good = [v for v in every[option] if v not in bad]
        line += (
            f"; sweep {blamed or 'it'} only with {option}={' or '.join(show_value(v) for v in good)}, "
            f"or split the sweep into one spec per {option}"
        )
    else:
        line += "; expected axes whose every combination is valid: split the sweep"
    return line


def _unique(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _continuous_eval_hint(spec: SweepSpec, key: str) -> str:
    """Why a continuous eval.* axis can be ignored although an evaluation variant would use it."""
    if not key.startswith("eval.") or key not in spec.space or spec.space[key].discrete:
        return ""
    if not any(k != "eval.aggregation" for k in spec.eval_axes()):
        return ""
    return (
        f" (a continuous {key} is set on each trial's own config, whose eval options are the base's; "
        "list its values with choice to probe them in each evaluation variant, or change the base)"
    )


def _check_evaluation_variants(spec: SweepSpec, base_tree: dict[str, Any], at: Callable[[str], str]) -> None:
    from sweeps.space import variant_table  # sweeps.space builds on this module

    for key, d in spec.eval_axes().items():
        for v in d.probe_values():
            try:
                # The value alone, over the base: whether the base's options use it is the variants' matter.
                validate_config({}, defaults=merge_overrides(base_tree, {key: coerce_value(key, v)}))
            except ConfigError as err:
                raise SpecError(
                    f"{at(f'space.{key}')}: space.{key}: value {v!r} is rejected: {_indent(err)}"
                ) from None
    try:
        table = variant_table(spec, base_tree)
    except ConfigError as err:
        raise SpecError(f"{at('space')}: space: an evaluation variant is rejected: {_indent(err)}") from None
    for key in spec.eval_axes():
        if key == "eval.aggregation" or any(key in row.kept for row in table):
            continue
        why = table[0].ignored[key]
        raise SpecError(
            f"{at(f'space.{key}')}: space.{key}: ignored by every evaluation variant: {key}: {why}"
        )


def reported_metrics(spec: SweepSpec, base_tree: Mapping[str, Any], base_cfg: TrainConfig) -> set[str]:
    """Every metric name some trial of this sweep reports after each epoch: `expected_metrics`, with the
    sweep's evaluation variants, of trial configs that give each training axis each of its values.

    Each such config is one combination `_check_training_combinations` validated (the other axes at their
    first value or lower bound), not the base with one value alone: that may be no valid config (a
    `loss.name: vicreg` value under a base with 16 patches, where a `patch.num` axis gives it 2).
    """
    from sweeps.space import eval_variants  # sweeps.space builds on this module

    variants = eval_variants(spec, base_cfg)
    axes = spec.train_axes()
    first = {k: d.probe_values()[0] for k, d in axes.items()}
    assignments = [first] + [{**first, k: v} for k, d in axes.items() for v in d.probe_values()[1:]]
    configs = [
        validate_config(merge_overrides(base_tree, {k: coerce_value(k, v) for k, v in a.items()}))
        for a in assignments
    ]
    return {name for cfg in configs for name in expected_metrics(cfg, variants).per_epoch}


def _check_metric(
    spec: SweepSpec, base_tree: Mapping[str, Any], base_cfg: TrainConfig, at: Callable[[str], str]
) -> None:
    reported = reported_metrics(spec, base_tree, base_cfg)
    objective = spec.objective()
    query = objective.query
    if query is None and spec.metric in reported:
        return
    keys = [k for k in map(ProbeKey.parse, reported) if k is not None and k.split == "val" and not k.bound]
    if query is not None and any(query.matches(k) for k in keys):
        return
    queries = {ProbeQuery(k.split, k.probe, k.stat, s) for k in keys for s in (None, k.scheme)}
    listed = sorted(queries, key=lambda q: (q.scheme is not None, str(q)))  # best-over-schemes first
    others = sorted(n for n in reported if ProbeKey.parse(n) is None)
    raise SpecError(
        f"{at('metric')}: metric: {spec.metric!r} is never reported by the trainer; expected one of "
        f"{', '.join(map(str, listed))} or an epoch metric: {', '.join(others)}"
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


def asha_probe_epochs(spec: SweepSpec, base_epochs: int) -> list[int]:
    """The epochs at which ASHA records a trial's objective (its rungs), as Ray's `_Bracket` builds them:
    milestones grace_period · rf^k, k < int(log(max_t / grace_period) / log(rf) + 1), each recorded at the
    first report whose epoch reaches it. A trial that probes at exactly these epochs (and its last) gets
    the decisions it would get probing every epoch: ASHA stops a trial only when it records a rung."""
    sched = spec.scheduler
    max_t = asha_max_t(spec, base_epochs)
    rf, grace = float(sched.reduction_factor), sched.grace_period
    import numpy as np  # Ray's own arithmetic, imported here: a bad spec must fail without heavy imports

    n_rungs = int(np.log(max_t / grace) / np.log(rf) + 1)
    # The same float expression as Ray's, so that ceil agrees with its `epoch >= milestone`.
    milestones = [grace * rf**k for k in range(n_rungs)]
    return sorted({math.ceil(m) for m in milestones if math.ceil(m) < max_t})


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec as plain YAML-ready data that `load_spec` reads back to the same spec."""
    return spec.model_dump(mode="json", exclude_none=True)


# What `--resume` may change: how patiently and where the trials run. Everything else (what a trial
# computes, how many run, how they are chosen and stopped) is the sweep's: a resumed sweep that changed it
# would mix trials of two sweeps under one parent run and report them as one.
RESUME_MAY_CHANGE = (
    "failure",
    "max_concurrent",
    "resources.cpus_per_worker",
    "resources.placement",
    "storage_path",
    "tracking.outage_wait_s",
    "tracking.uri",
)


def spec_changes(ran: SweepSpec, given: SweepSpec) -> list[str]:
    """Each key where `given` differs from the spec a sweep `ran`, as `key: sweep has X, given Y`, but for
    the keys of `RESUME_MAY_CHANGE`."""
    before, after = flatten(spec_to_dict(ran)), flatten(spec_to_dict(given))
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if is_under(key, RESUME_MAY_CHANGE) or before.get(key) == after.get(key):
            continue
        was, now = (show_value(d[key]) if key in d else "nothing" for d in (before, after))
        changes.append(f"{key}: sweep has {was}, given {now}")
    return changes
