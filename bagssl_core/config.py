"""TrainConfig: the one source of truth for every knob of a BagSSL run.

YAML files, `key=value` CLI overrides and sweep trials only ever override fields of this model.
Every part forbids unknown keys, so a misspelled key is an error that names it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic"]
BackboneName = Literal["resnet18_cifar", "resnet18", "resnet50"]
LossName = Literal["bag_vicreg", "tcr", "vicreg"]
SchemeName = Literal["mean_emb", "mean_proj", "max_emb", "centre", "whole", "multiscale"]

# Side length (pixels) of the images each dataset provides, before any `data.image_size` resize.
NATIVE_IMAGE_SIZE: dict[str, int] = {
    "fashion_mnist": 28,
    "cifar10": 32,
    "cifar100": 32,
    "stl10": 96,
    "imagefolder": 224,
    "synthetic": 32,
}
# Losses that pull every patch of an image toward the bag mean: they need at least two patches.
BAG_LOSSES = frozenset({"bag_vicreg", "tcr"})
_SIZE_EXPECTED = "expected pixels (an int >= 1) or a fraction of the side in (0, 1]"


def _is_size(v: int | float) -> bool:
    """Whether `v` is a patch side: pixels (an int >= 1) or a fraction of the image side in (0, 1]."""
    return 0 < v <= 1 if isinstance(v, float) else v >= 1


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (file, key, what was expected)."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Part):
    name: DatasetName = Field(
        "fashion_mnist", description="Dataset. fashion_mnist is offline via Debian's dataset-fashion-mnist."
    )
    root: str = Field(
        "./data", description="Where datasets live (or are downloaded to when data.download is true)."
    )
    download: bool = Field(False, description="Allow torchvision to download the dataset into data.root.")
    image_size: int | None = Field(
        None, ge=8, description="Resize images to this side; None = the dataset's native size."
    )
    to_rgb: bool = Field(
        True, description="Replicate grayscale images to 3 channels (the backbone always takes 3)."
    )
    batch_size: int = Field(
        256, ge=2, description="GLOBAL images per step, summed over all ranks; split evenly across them."
    )
    train_subset: int | None = Field(
        None, ge=2, description="Use only the first N training images (seeded shuffle)."
    )
    test_subset: int | None = Field(
        None, ge=1, description="Use only the first N test images (seeded shuffle)."
    )
    val_size: int | float = Field(
        0.1,
        description="Validation images carved from the training images (after data.train_subset), "
        "class-stratified, seeded by run.seed: an int is a count, a fraction f in (0, 1) gives round(f * N).",
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes (images are decoded there for imagefolder)."
    )
    synthetic_train: int = Field(512, ge=2, description="synthetic only: number of training images.")
    synthetic_test: int = Field(128, ge=1, description="synthetic only: number of test images.")
    synthetic_classes: int = Field(4, ge=2, description="synthetic only: number of classes.")

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if (0 < v < 1) if isinstance(v, float) else v >= 1:
            return v
        raise ValueError(
            "expected a number of images (an int >= 1) or a fraction of the training images in (0, 1)"
        )


class AugConfig(_Part):
    """Per-patch augmentation, applied independently to every patch (EMP-SSL / BagSSL defaults)."""

    flip_p: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    jitter_p: float = Field(0.8, ge=0, le=1, description="Probability of colour jitter.")
    brightness: float = Field(0.4, ge=0, description="Jitter: brightness factor drawn from [1-b, 1+b].")
    contrast: float = Field(0.4, ge=0, description="Jitter: contrast factor drawn from [1-c, 1+c].")
    saturation: float = Field(0.4, ge=0, description="Jitter: saturation factor drawn from [1-s, 1+s].")
    hue: float = Field(0.2, ge=0, le=0.5, description="Jitter: hue shift drawn from [-h, h].")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="Probability of converting to grayscale.")
    blur_p: float = Field(0.1, ge=0, le=1, description="Probability of a Gaussian blur.")
    blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="Blur sigma drawn uniformly from [low, high]."
    )
    solarize_p: float = Field(0.1, ge=0, le=1, description="Probability of solarizing (threshold 0.5).")
    normalize: bool = Field(True, description="Normalise with the dataset's channel mean/std.")

    @field_validator("blur_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("expected 0 < low <= high")
        return v


class PatchConfig(_Part):
    size: int | float = Field(
        16, description="Patch side: an int is pixels, a float in (0, 1] is a fraction of the image side."
    )
    num: int = Field(16, ge=1, description="Patches per image (N).")
    input_size: int | None = Field(
        None, ge=8, description="Side the backbone sees: every patch is resized to it. None = the image size."
    )
    view_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="vicreg loss only: area range of the two multi-scale random-resized crops."
    )
    aug: AugConfig = Field(default_factory=AugConfig)

    @field_validator("size")
    @classmethod
    def _size(cls, v: int | float) -> int | float:
        if not _is_size(v):
            raise ValueError(_SIZE_EXPECTED)
        return v

    @field_validator("view_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("expected 0 < low <= high <= 1")
        return v


class ModelConfig(_Part):
    backbone: BackboneName = Field(
        "resnet18_cifar", description="resnet18_cifar (3x3 stride-1 stem, no max-pool), resnet18, resnet50."
    )
    projector: list[int] = Field(
        default_factory=lambda: [1024, 1024],
        min_length=1,
        description="Projector output widths: Linear-BN-ReLU for each but the last, which is a plain Linear.",
    )
    sync_bn: bool = Field(False, description="Convert BatchNorm to SyncBatchNorm under torch.distributed.")
    channels_last: bool = Field(True, description="channels_last memory format (CUDA only).")

    @field_validator("projector")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("expected positive widths")
        return v


class LossConfig(_Part):
    name: LossName = Field(
        "bag_vicreg", description="bag_vicreg (patches to their bag mean), tcr (EMP-SSL), vicreg (two views)."
    )
    inv_weight: float = Field(25.0, ge=0, description="lambda: invariance weight.")
    var_weight: float = Field(25.0, ge=0, description="mu: variance-hinge weight.")
    cov_weight: float = Field(1.0, ge=0, description="nu: covariance weight.")
    tcr_eps: float = Field(0.2, gt=0, description="tcr: distortion eps^2 of the coding rate.")
    tcr_weight: float = Field(1.0, ge=0, description="tcr: weight of the (negated) total coding rate.")
    tcr_inv_weight: float = Field(
        200.0, ge=0, description="tcr: weight of the cosine-to-bag-mean invariance term."
    )
    gather_distributed: bool = Field(
        True, description="Gather projections from all ranks (with gradients) so batch statistics are global."
    )


class OptimConfig(_Part):
    name: Literal["lars", "sgd", "adamw"] = Field(
        "lars", description="LARS excludes biases and norm parameters."
    )
    base_lr: float = Field(
        0.3, gt=0, description="Learning rate per 256 images: effective lr = base_lr * data.batch_size / 256."
    )
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (not on biases and norm parameters).")
    momentum: float = Field(0.9, ge=0, lt=1, description="lars/sgd momentum.")
    lars_eta: float = Field(0.02, gt=0, description="LARS trust coefficient.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw betas.")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")


class ScheduleConfig(_Part):
    epochs: int = Field(10, ge=1, description="Training epochs.")
    warmup_epochs: float = Field(
        1.0, ge=0, description="Linear warm-up from 0, in epochs (fractions allowed)."
    )
    final_lr_ratio: float = Field(1e-3, ge=0, le=1, description="Cosine decays to effective lr * this ratio.")


class EvalConfig(_Part):
    aggregation: list[SchemeName] = Field(
        default_factory=lambda: ["mean_emb"], min_length=1, description="Aggregation schemes, each probed."
    )
    patches: Literal["grid", "random"] = Field(
        "grid", description="Evaluation patches: a grid, or N random ones."
    )
    grid_size: int | float | None = Field(
        None, description="Grid patch side (pixels or fraction); None = patch.size."
    )
    grid_stride: int | None = Field(
        None, ge=1, description="Grid stride in pixels; None = half the grid patch side."
    )
    num_patches: int | None = Field(None, ge=1, description="random: patches per image; None = patch.num.")
    multiscale_sizes: list[int | float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        description="multiscale: patch sides of the bag.",
    )
    probes: list[Literal["knn", "linear"]] = Field(
        default_factory=lambda: ["knn", "linear"], min_length=1, description="Probes run for every scheme."
    )
    knn_k: int = Field(20, ge=1, description="kNN: neighbours (cosine similarity, weighted vote).")
    knn_temperature: float = Field(0.07, gt=0, description="kNN: vote weight exp(similarity / T).")
    linear_epochs: int = Field(20, ge=1, description="Linear probe: epochs over the precomputed features.")
    linear_lr: float = Field(
        0.1, gt=0, description="Linear probe lr (SGD, cosine, on standardised features)."
    )
    linear_batch_size: int = Field(256, ge=1, description="Linear probe: batch size.")
    every: int = Field(0, ge=0, description="Probe every k epochs; 0 = only after the last epoch.")
    batch_size: int = Field(256, ge=1, description="Images per feature-extraction batch.")

    @field_validator("aggregation", "probes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("expected each name once")
        return v

    @field_validator("grid_size")
    @classmethod
    def _grid_size(cls, v: int | float | None) -> int | float | None:
        if v is not None and not _is_size(v):
            raise ValueError(_SIZE_EXPECTED)
        return v


class RunConfig(_Part):
    seed: int = Field(0, description="Seeds data order, patches, augmentation, init and probes.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU."
    )
    out_dir: str = Field("runs/bagssl", description="Run directory: config, checkpoints, metrics, summary.")
    checkpoint_every: int = Field(1, ge=0, description="Write a checkpoint every k epochs (0 = never).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep on disk.")
    log_every: int = Field(10, ge=1, description="Steps between progress updates.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default.")


def patch_pixels(size: int | float, image_size: int) -> int:
    """Patch side in pixels: an int is already pixels, a float is a fraction of the image side."""
    if isinstance(size, float):
        return max(1, round(size * image_size))
    return int(size)


class TrainConfig(_Part):
    data: DataConfig = Field(default_factory=DataConfig)
    patch: PatchConfig = Field(default_factory=PatchConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    # --- derived values (never stored, always recomputed from the fields) -------------------------
    @property
    def image_size(self) -> int:
        return self.data.image_size or NATIVE_IMAGE_SIZE[self.data.name]

    @property
    def patch_px(self) -> int:
        return patch_pixels(self.patch.size, self.image_size)

    @property
    def input_size(self) -> int:
        return self.patch.input_size or self.image_size

    @property
    def eval_patch_px(self) -> int:
        return patch_pixels(
            self.eval.grid_size if self.eval.grid_size is not None else self.patch.size, self.image_size
        )

    @property
    def eval_stride(self) -> int:
        return self.eval.grid_stride or max(1, self.eval_patch_px // 2)

    @property
    def eval_num_patches(self) -> int:
        return self.eval.num_patches or self.patch.num

    def effective_lr(self) -> float:
        """lr actually used at the schedule's peak: base_lr * global batch / 256."""
        return self.optim.base_lr * self.data.batch_size / 256

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        img = self.image_size
        if self.patch_px > img:
            raise ValueError(
                f"patch.size: a {self.patch_px}-px patch does not fit a {img}-px image ({self.data.name}); "
                f"expected at most {img} pixels or a fraction <= 1"
            )
        if self.loss.name in BAG_LOSSES and self.patch.num < 2:
            raise ValueError(
                f"patch.num: loss {self.loss.name!r} pulls patches to their bag mean; expected >= 2 patches"
            )
        if self.loss.name == "vicreg" and self.patch.num != 2:
            raise ValueError("patch.num: two-view vicreg uses exactly 2 views; expected 2")
        if self.eval_patch_px > img:
            raise ValueError(
                f"eval.grid_size: a {self.eval_patch_px}-px grid patch does not fit a {img}-px image"
            )
        for s in self.eval.multiscale_sizes:
            if not _is_size(s) or patch_pixels(s, img) > img:
                raise ValueError(
                    f"eval.multiscale_sizes: {s!r} does not fit a {img}-px image; expected 1..{img} px or (0, 1]"
                )
        return self


# --- loading, overriding, dumping ------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A CLI value parsed as YAML, so `8`, `0.5`, `true`, `[mean_emb, centre]` get their natural types."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for key `a.b.c`, creating intermediate dicts."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["patch.size=8", "eval.aggregation=[mean_emb,centre]"]` -> {"patch.size": 8, ...}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. patch.size=8")
        out[key] = parse_value(text.strip())
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `overrides` merged in key by key, at every depth; later keys win.

    Keys may be dotted at any level (`patch.aug.flip_p: 0` and `patch: {aug.flip_p: 0}` are the same), and
    a section in `overrides` changes only the keys it names: the other keys of that section in `base` stay.
    """
    tree = copy.deepcopy(dict(base))
    for key, value in flatten(overrides).items():
        set_dotted(tree, key, value)
    return tree


def read_yaml_file(
    path: str | Path, what: str = "a mapping of config sections"
) -> tuple[dict[str, Any], dict[str, int]]:
    """A YAML file that must hold a mapping; ConfigError (naming the file and line) otherwise.

    Args:
        what: what the top level should be, for the messages (e.g. "a mapping of config sections").

    Returns:
        The mapping, and the 1-based line of every key the file spells out, by dotted key (`patch.aug`), for
        `yaml_location`.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{p}{line}: not valid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty; expected {what}")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected {what} at the top level, got {type(data).__name__}")
    return data, _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            lines[key] = k.start_mark.line + 1
            lines.update(_key_lines(v, key + "."))
    return lines


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A TrainConfig YAML file as a plain mapping (see `read_yaml_file`)."""
    return read_yaml_file(path)[0]


def yaml_location(source: str, lines: Mapping[str, int] | None, key: str) -> str:
    """`file:line` of a dotted key, or of the nearest enclosing key the file spells out; else just `file`."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        line = (lines or {}).get(".".join(parts[:n]))
        if line:
            return f"{source}:{line}"
    return source


# Problems whose own message is clearer than pydantic's, and those where echoing the input adds nothing:
# the key names it, or the message already says what is wrong with it.
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required key is missing"}
_NO_INPUT = frozenset({"extra_forbidden", "missing", "value_error"})


def describe_validation_error(
    err: ValidationError,
    tree: Mapping[str, Any],
    source: str | None = None,
    lines: Mapping[str, int] | None = None,
) -> str:
    """One line per problem: `<source>:<line>: <dotted key>: <what was expected> (got <value>)`.

    Args:
        err: what pydantic found wrong with `tree`.
        tree: the mapping that was validated: it tells the keys in an error's location apart from the list
            indices and union tags (`patch.size.int`) pydantic appends to them.
        source: where the tree came from (a file); None leaves it out.
        lines: line of each dotted key in `source` (see `read_yaml_file`); None leaves lines out.
    """
    out = []
    for e in err.errors():
        key = _error_key(e, tree)
        msg = _MESSAGES.get(e["type"]) or e["msg"].removeprefix("Value error, ")
        if msg.startswith("Input should be"):
            msg = "expected " + msg.removeprefix("Input should be ")
        got = e.get("input")
        got_s = "" if e["type"] in _NO_INPUT or isinstance(got, Mapping) else f" (got {got!r})"
        where = f"{yaml_location(source, lines, key)}: " if source else ""
        out.append(f"{where}{key}: {msg}{got_s}" if key else f"{where}{msg}{got_s}")
    return "\n".join(dict.fromkeys(out))


def _error_key(error: ErrorDetails, tree: Mapping[str, Any]) -> str:
    """The dotted key an error is about: its location for as long as it follows keys of `tree`."""
    if error["type"] == "missing":
        return ".".join(str(p) for p in error["loc"])
    keys: list[str] = []
    node: Any = tree
    for part in error["loc"]:
        if not isinstance(node, Mapping) or part not in node:
            break
        keys.append(str(part))
        node = node[part]
    return ".".join(keys)


def validate_config(
    tree: Mapping[str, Any], source: str | None = None, lines: Mapping[str, int] | None = None
) -> TrainConfig:
    """TrainConfig from a plain dict; a ConfigError naming the source (and line) and keys on failure."""
    try:
        return TrainConfig.model_validate(dict(tree))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, tree, source, lines)) from None


# `python -m bagssl_core train` without --config: a short but real job (Fashion-MNIST subsets, small
# patches at native resolution) that ends within ~10 minutes on 2 CPU cores. The TrainConfig defaults
# themselves describe a full run.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {
        "data.train_subset": 4000,
        "data.test_subset": 1000,
        "data.batch_size": 128,
        "patch.size": 14,
        "patch.num": 8,
        "patch.input_size": 14,
        "model.projector": [1024, 1024],
        "schedule.epochs": 3,
        "schedule.warmup_epochs": 0.5,
        "eval.aggregation": ["mean_emb", "mean_proj", "centre"],
        "eval.grid_stride": 7,
        "eval.linear_epochs": 10,
        "run.out_dir": "runs/quick",
    },
}


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    preset: str | None = None,
) -> TrainConfig:
    """Defaults <- preset (if any) <- YAML file (if any) <- dotted overrides (`key=value` strings or a mapping)."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    tree = merge_overrides({}, PRESETS[preset]) if preset is not None else {}
    lines = None
    if path is not None:
        from_file, lines = read_yaml_file(path)
        try:
            tree = merge_overrides(tree, from_file)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    source = str(path) if path is not None else ("overrides" if over else preset)
    # With overrides, the file's line of a key may not be where its (overridden) value came from.
    return validate_config(merge_overrides(tree, over), source, None if over else lines)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML, loadable by `load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


@functools.cache
def config_defaults() -> Mapping[str, Any]:
    """Every dotted leaf path of TrainConfig (e.g. `patch.size`) and its default, as YAML would give it."""
    return MappingProxyType(flatten(TrainConfig().model_dump(mode="json")))


def config_reference() -> str:
    """A Markdown table of every TrainConfig key with its default and description (the README's reference)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{name}` | `{shown}` | {field.description or ''} |")

    walk(TrainConfig, "")
    return "\n".join(rows)
