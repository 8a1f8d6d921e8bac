"""TrainConfig: the one source of truth for every knob of a BagSSL run.

YAML files, `key=value` CLI overrides and sweep trials only ever override fields of this model.
Every part forbids unknown keys, so a misspelled key is an error that names it.
"""

from __future__ import annotations

import copy
import functools
import logging
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, to_jsonable_python

DatasetName = Literal["fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic"]
BackboneName = Literal["resnet18_cifar", "resnet18", "resnet50"]
SchemeName = Literal["mean_emb", "mean_proj", "max_emb", "centre", "whole", "multiscale"]
ProbeName = Literal["knn", "linear"]
AnalysisName = Literal["bag_curve", "whole_vs_mean", "locality"]

# Side length (pixels) of the images each dataset provides, before any `data.image_size` resize. None:
# the files' own size, known only once they are read (imagefolder: `bagssl_core.data.resolve_image_size`).
NATIVE_IMAGE_SIZE: dict[str, int | None] = {
    "fashion_mnist": 28,
    "cifar10": 32,
    "cifar100": 32,
    "stl10": 96,
    "imagefolder": None,
    "synthetic": 32,
}
# A patch given in pixels that covers less than this fraction of the image's area is warned about
# (`warn_tiny_patches`): a 14-px patch, sensible on 28-px images, is 0.4% of a 224-px image, and its
# dense evaluation grid (961 patches an image at stride 7) is what ran out of memory in issue 9.
TINY_PATCH_AREA = 0.01
# eval.patch_chunk=null cuts out and forwards as many patches at once as make this many pixels per
# channel, at the larger of their cut-out and input sides: extraction memory then stays bounded whatever
# the image size and the backbone's input size (about 70 MB per ResNet activation at 14 px).
EVAL_CHUNK_PIXELS = 2**18
# On a GPU that bound leaves the device idle between small forwards: on an H100 the default config's probe
# (334 patches of 28 px a forward) took 11 s against a 14-s training epoch, launch-bound. A GPU forwards 16x
# more at once (about 0.5 GB per activation in bf16 at 28 px); bench/eval_chunk.py measures the choice.
EVAL_CHUNK_PIXELS_CUDA = 2**22
# Datasets whose images have one channel (replicated to 3 unless data.to_rgb is false).
GRAYSCALE_DATASETS = frozenset({"fashion_mnist"})
# Datasets torchvision can download into data.root (fashion_mnist only when Debian's copy is missing).
DOWNLOADABLE_DATASETS = frozenset({"fashion_mnist", "cifar10", "cifar100", "stl10"})
# Losses that pull every patch of an image toward the bag mean: they need at least two patches.
BAG_LOSSES = frozenset({"bag_vicreg", "tcr"})
# Aggregation schemes that reduce the evaluation bag (eval.patches): grid or random patches.
BAG_SCHEMES = ("mean_emb", "mean_proj", "max_emb")
_LOG = logging.getLogger(__name__)
_SIZE_EXPECTED = "expected pixels (an int >= 1) or a fraction of the side in (0, 1]"


def _is_size(v: int | float) -> bool:
    """Whether `v` is a patch side: pixels (an int >= 1) or a fraction of the image side in (0, 1]."""
    return 0 < v <= 1 if isinstance(v, float) else v >= 1


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user (file, key, what was expected).

    `kinds` holds pydantic's error types (`int_from_float`, ...) when the problem came from validation, for
    callers that act on the kind of a problem rather than on its wording.
    """

    def __init__(self, message: str, kinds: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.kinds = kinds


class DataError(RuntimeError):
    """A dataset could not be loaded; the message (one line) says what is missing and what to do.

    Defined here, beside ConfigError, and raised by `bagssl_core.data`: the command line catches both
    without importing torch first."""


def error_message(err: BaseException) -> str:
    """`err`'s message, on one line where torch made it several.

    A DataLoader re-raises a worker's exception as the same type, with the worker's traceback in its
    message ("Caught DataError in DataLoader worker process 0.", "Original Traceback ...", and last
    "bagssl_core.config.DataError: MESSAGE"): the original message is that last line's end.
    """
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        marker = f"{type(err).__name__}: "
        at = last.find(marker)
        if at >= 0:
            return last[at + len(marker) :]
    return text


def takes_numbers(annotation: Any) -> bool:
    """Whether a field's type holds numbers (int or float, alone, optional, in a union or as the items of a
    list or tuple), and no booleans."""
    if annotation in (int, float):
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    return bool(args) and bool not in args and all(takes_numbers(a) for a in args)


def bool_for_number(value: Any) -> bool:
    """Whether a value given for a number knob is, or holds, a boolean. pydantic reads `true` as 1 for an int
    and 1.0 for a float: `patch.size: true` trained 1-px patches and `num_samples: yes` ran one trial."""
    return any(isinstance(v, bool) for v in (value if isinstance(value, list | tuple) else [value]))


def refuse_bool_for_number(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A `field_validator("*", mode="before")` body: a number field takes numbers only (`bool_for_number`).
    TrainConfig checks its tree before validation instead (`_refuse_bools`): pydantic allows no such validator
    on a tagged union's tag (`loss.name`)."""
    name = info.field_name
    if name is not None and takes_numbers(model.model_fields[name].annotation) and bool_for_number(value):
        raise ValueError(f"expected a number, not {show_value(value)}")
    return value


class _Part(BaseModel):
    # No knob means anything at infinity: an infinite warm-up, learning rate or timeout only fails later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Part):
    name: DatasetName = Field(
        "fashion_mnist", description="Dataset. fashion_mnist is offline via Debian's dataset-fashion-mnist."
    )
    root: str = Field(
        "./data", description="Where datasets live (or are downloaded to when data.download is true)."
    )
    download: bool = Field(False, description="Allow torchvision to download the dataset into data.root.")
    image_size: int | None = Field(
        None,
        ge=8,
        description="Resize images to this side; None = the dataset's native size. imagefolder: None keeps "
        "the files' own size when they all share one square size, and is an error otherwise.",
    )
    to_rgb: bool = Field(
        True,
        description="Replicate the grayscale channel to 3; false = a backbone that takes 1 channel.",
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
    synthetic_train: int = Field(512, ge=2, description="Number of training images.")
    synthetic_test: int = Field(128, ge=1, description="Number of test images.")
    synthetic_classes: int = Field(4, ge=2, description="Number of classes.")

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
        (0.08, 1.0), description="Area range of the two random-resized-crop views of two-view VICReg."
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
    channels_last: bool = Field(
        True, description="channels_last memory format (faster on CPU and CUDA: bench/memory_format.py)."
    )

    @field_validator("projector")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("expected positive widths")
        return v


class _LossKnobs(_Part):
    name: str  # the tag that picks the loss: each loss config narrows it to its own name


# Every loss has it (each lists it after its own knobs).
_GATHER_DISTRIBUTED = Field(
    True, description="Gather projections from all ranks (with gradients) so batch statistics are global."
)


class _VICRegKnobs(_LossKnobs):
    inv_weight: float = Field(25.0, ge=0, description="lambda: invariance weight.")
    var_weight: float = Field(25.0, ge=0, description="mu: variance-hinge weight.")
    cov_weight: float = Field(1.0, ge=0, description="nu: covariance weight.")
    gather_distributed: bool = _GATHER_DISTRIBUTED


class BagVICRegConfig(_VICRegKnobs):
    """Bag VICReg: every patch pulled toward its image's bag mean (`bagssl_core.losses.bag_vicreg_loss`)."""

    name: Literal["bag_vicreg"] = "bag_vicreg"


class VICRegConfig(_VICRegKnobs):
    """Two-view VICReg, official convention (`bagssl_core.losses.vicreg_loss`)."""

    name: Literal["vicreg"] = "vicreg"


class TCRConfig(_LossKnobs):
    """EMP-SSL: total coding rate plus cosine similarity to the bag mean (`bagssl_core.losses.tcr_loss`)."""

    name: Literal["tcr"] = "tcr"
    eps: float = Field(0.2, gt=0, description="Distortion eps^2 of the coding rate (EMP-SSL --eps).")
    coding_rate_weight: float = Field(
        1.0, ge=0, description="Weight of the negated total coding rate (EMP-SSL --tcr)."
    )
    similarity_weight: float = Field(
        200.0,
        ge=0,
        description="Weight of the negated cosine similarity to the bag mean (EMP-SSL --patch_sim).",
    )
    gather_distributed: bool = _GATHER_DISTRIBUTED


# The loss part of a run: `loss.name` picks the loss, and each loss has only its own knobs, so a knob of
# another loss is an unknown key (`describe_validation_error` names the chosen loss and its knobs).
LossConfig = Annotated[BagVICRegConfig | TCRConfig | VICRegConfig, Field(discriminator="name")]
LossName = Literal["bag_vicreg", "tcr", "vicreg"]
DEFAULT_LOSS: LossName = "bag_vicreg"


class OptimConfig(_Part):
    name: Literal["lars", "sgd", "adamw"] = Field(
        "lars", description="LARS excludes biases and norm parameters."
    )
    base_lr: float = Field(
        0.3, gt=0, description="Learning rate per 256 images: effective lr = base_lr * data.batch_size / 256."
    )
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (not on biases and norm parameters).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum.")
    lars_eta: float = Field(0.02, gt=0, description="LARS trust coefficient.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (beta1, beta2).")
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm to this value.")


class ScheduleConfig(_Part):
    epochs: int = Field(10, ge=1, description="Training epochs.")
    warmup_epochs: float = Field(
        1.0, ge=0, description="Linear warm-up from 0, in epochs (fractions allowed)."
    )
    final_lr_ratio: float = Field(1e-3, ge=0, le=1, description="Cosine decays to effective lr * this ratio.")


class AnalysisConfig(_Part):
    """Settings of BagSSL's analyses (`bagssl_core.analyses`); each caps the work so memory stays bounded."""

    val_images: int | None = Field(
        1000,
        ge=2,
        description="Validation images the analyses score (a seeded random subset); None = the whole split.",
    )
    bank_images: int | None = Field(
        10000,
        ge=1,
        description="Bag curve: training images in its kNN bank (a seeded random subset); None = the whole split.",
    )
    scales: list[int | float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        description="Whole vs mean: patch sides (pixels or fraction) of the non-overlapping tiles averaged.",
    )
    train_patches: int = Field(
        20000,
        ge=1,
        description="Locality: training grid patches searched (a seeded random subset of every image's grid).",
    )
    queries: int = Field(8, ge=1, description="Locality: query patches drawn in the figure (seeded).")
    neighbours: int = Field(8, ge=1, description="Locality: nearest training patches drawn per query.")

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[int | float]) -> list[int | float]:
        if not all(_is_size(s) for s in v):
            raise ValueError(_SIZE_EXPECTED)
        return v


class EvalConfig(_Part):
    aggregation: list[SchemeName] = Field(
        default_factory=lambda: list[SchemeName](["mean_emb"]),
        min_length=1,
        description="Aggregation schemes, each probed.",
    )
    patches: Literal["grid", "random"] = Field(
        "grid", description="Evaluation patches: a grid, or N random ones."
    )
    grid_size: int | float | None = Field(
        None,
        description="Side of the evaluation patches (grid, random and centre; pixels or fraction); None = patch.size.",
    )
    grid_stride: int | None = Field(
        None, ge=1, description="Grid stride in pixels; None = half the grid patch side."
    )
    num_patches: int | None = Field(None, ge=1, description="Random patches per image; None = patch.num.")
    multiscale_sizes: list[int | float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        description="Patch sides of the multiscale bag.",
    )
    probes: list[ProbeName] = Field(
        default_factory=lambda: list[ProbeName](["knn", "linear"]),
        min_length=1,
        description="Probes run for every scheme.",
    )
    knn_k: int = Field(20, ge=1, description="kNN: neighbours (cosine similarity, weighted vote).")
    knn_temperature: float = Field(0.07, gt=0, description="kNN: vote weight exp(similarity / T).")
    linear_epochs: int = Field(20, ge=1, description="Linear probe: epochs over the precomputed features.")
    linear_lr: float = Field(
        0.1, gt=0, description="Linear probe lr (SGD, cosine, on standardised features)."
    )
    linear_batch_size: int = Field(256, ge=1, description="Linear probe: batch size.")
    every: int = Field(0, ge=0, description="Probe every k epochs; 0 = only after the last epoch.")
    epochs: list[int] = Field(
        default_factory=list,
        description="Also probe after these epochs (1-based), e.g. the ones a scheduler reads; the last always probes.",
    )
    batch_size: int = Field(256, ge=1, description="Images per feature-extraction batch.")
    patch_chunk: int | None = Field(
        None,
        ge=1,
        description="Most patches cut out and forwarded at once in feature extraction, whatever the image "
        f"size, grid or schemes (bounds its memory); None = as many as make {EVAL_CHUNK_PIXELS} pixels "
        "at the larger of their cut-out and input sides (1337 patches of 14 px, 256 of 32 px), "
        f"{EVAL_CHUNK_PIXELS_CUDA} on a CUDA device.",
    )
    cpu_graph: bool = Field(
        True,
        description="On the CPU in fp32, extract features with a frozen TorchScript graph of the model "
        "(BatchNorm folded, oneDNN weights prepacked): the same features to 1e-6, up to 1.6x faster "
        "(bench/inference_graph.py); false = the eager model.",
    )
    analyses: list[AnalysisName] = Field(
        default_factory=list,
        description="BagSSL's analyses run at the end of a finished run (bag_curve, whole_vs_mean, locality).",
    )
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @field_validator("aggregation", "probes", "analyses")
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
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seeds data order, patches, augmentation, init and probes."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 autocast on CUDA, fp32 on CPU. bf16 on a CPU that computes it natively "
        "(flags avx512_bf16, amx_bf16): training steps and extraction 1.5x to 2x faster (bench/cpu_precision.py).",
    )
    out_dir: str = Field(
        "runs/bagssl", min_length=1, description="Run directory: config, checkpoints, metrics, summary."
    )
    checkpoint_every: int = Field(1, ge=0, description="Write a checkpoint every k epochs (0 = never).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep on disk.")
    log_every: int = Field(10, ge=1, description="Steps between progress updates.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default.")


def patch_pixels(size: int | float, image_size: int) -> int:
    """Patch side in pixels: an int is already pixels, a float is a fraction of the image side."""
    if isinstance(size, float):
        return max(1, round(size * image_size))
    return int(size)


def tiny_patches(cfg: TrainConfig) -> list[str]:
    """One line for each patch side given in pixels that covers less than TINY_PATCH_AREA of the image.

    Pixels are meant for one image size; on a larger image (an ImageFolder at 224 px for a setting made
    for 28 px) such a patch sees almost nothing and its evaluation grid grows with the square of the side.
    Fractions scale with the image and are never reported.
    """
    img = cfg.image_size
    sides = {"patch.size": cfg.patch.size}
    if cfg.eval.grid_size is not None:
        sides["eval.grid_size"] = cfg.eval.grid_size
    out = []
    for key, px in sides.items():
        area = (px / img) ** 2 if isinstance(px, int) else 1.0
        if area < TINY_PATCH_AREA:
            out.append(
                f"{key}: a {px}-px patch covers {area:.2%} of a {img}-px image (less than "
                f"{TINY_PATCH_AREA:.0%}); give it as a fraction of the side (e.g. {key}={px / img:.3g}) or "
                "check data.image_size"
            )
    return out


class TrainConfig(_Part):
    data: DataConfig = Field(default_factory=DataConfig)
    patch: PatchConfig = Field(default_factory=PatchConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(
        default_factory=BagVICRegConfig,
        description="The loss: bag_vicreg (patches to their bag mean), tcr (EMP-SSL), vicreg (two views).",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    # --- derived values (never stored, always recomputed from the fields) -------------------------
    @property
    def image_size_known(self) -> bool:
        """False for imagefolder without data.image_size until `bagssl_core.data.resolve_image_size`."""
        return (self.data.image_size or NATIVE_IMAGE_SIZE[self.data.name]) is not None

    @property
    def image_size(self) -> int:
        size = self.data.image_size or NATIVE_IMAGE_SIZE[self.data.name]
        if size is None:
            raise ConfigError(
                f"data.image_size: {self.data.name} images keep their own size, which is known once the "
                "files are read (bagssl_core.data.resolve_image_size); set data.image_size to fix it"
            )
        return size

    @property
    def patch_px(self) -> int:
        # Pixels need no image size: an imagefolder config knows them before its files are read.
        size = self.patch.size
        return size if isinstance(size, int) else patch_pixels(size, self.image_size)

    @property
    def in_channels(self) -> int:
        """Channels of the images the backbone takes: 1 for a grayscale dataset kept as is, else 3."""
        return 1 if self.data.name in GRAYSCALE_DATASETS and not self.data.to_rgb else 3

    @property
    def input_size(self) -> int:
        return self.patch.input_size or self.image_size

    @property
    def eval_patch_px(self) -> int:
        size = self.eval.grid_size if self.eval.grid_size is not None else self.patch.size
        return size if isinstance(size, int) else patch_pixels(size, self.image_size)

    @property
    def eval_stride(self) -> int:
        return self.eval.grid_stride or max(1, self.eval_patch_px // 2)

    @property
    def eval_num_patches(self) -> int:
        return self.eval.num_patches or self.patch.num

    def eval_patch_chunk(self, patch_px: int, device_type: str = "cpu") -> int:
        """Most `patch_px`-px patches per forward in feature extraction: eval.patch_chunk, else as many as
        make EVAL_CHUNK_PIXELS (EVAL_CHUNK_PIXELS_CUDA on "cuda") pixels at the larger of their cut-out
        and input sides."""
        pixels = EVAL_CHUNK_PIXELS_CUDA if device_type == "cuda" else EVAL_CHUNK_PIXELS
        return self.eval.patch_chunk or max(1, pixels // max(patch_px, self.input_size) ** 2)

    def effective_lr(self) -> float:
        """lr actually used at the schedule's peak: base_lr * global batch / 256."""
        return self.optim.base_lr * self.data.batch_size / 256

    @field_validator("loss", mode="before")
    @classmethod
    def _default_loss(cls, v: Any) -> Any:
        # A loss section without a name configures the default loss (`loss.inv_weight=10` alone works).
        if isinstance(v, Mapping) and "name" not in v:
            return {"name": DEFAULT_LOSS, **v}
        return v

    def ignored_knobs(self) -> dict[str, str]:
        """Every knob this config's options ignore (set or not), dotted key -> why, from `KNOB_RULES`."""
        return {rule.knob: self._why_ignored(rule) for rule in self._ignoring_rules()}

    def _ignoring_rules(self) -> list[KnobRule]:
        # Without the reasons: writing them (YAML for each option's value) costs ten times the rest of a
        # validation, and a sweep spec's check validates thousands of configs (sweeps.spec).
        return [rule for rule in KNOB_RULES if not rule.used(self)]

    def _why_ignored(self, rule: KnobRule) -> str:
        chosen = ", ".join(f"{o}={show_value(_get_dotted(self, o))}" for o in rule.options)
        return f"ignored with {chosen}; it is used only {rule.when}"

    @model_validator(mode="after")
    def _no_ignored_knob_set(self, info: ValidationInfo) -> TrainConfig:
        """A knob set explicitly (by a file, an override or a sweep axis, even to its default value) while
        the chosen options ignore it is an error: the run would silently not do what the config says."""
        if info.context and info.context.get(_ALLOW_IGNORED):
            return self
        problems = [
            f"{r.knob}: {self._why_ignored(r)}" for r in self._ignoring_rules() if is_set(self, r.knob)
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_serializer(mode="wrap")
    def _dump_without_ignored(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Every dump (`model_dump`, `config_to_yaml`, a checkpoint's config) leaves out the knobs the
        config's options ignore: they play no part in the run, and a dump must load back as it is."""
        data = handler(self)
        for rule in self._ignoring_rules():
            _pop_dotted(data, rule.knob)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        if self.loss.name in BAG_LOSSES and self.patch.num < 2:
            raise ValueError(
                f"patch.num: loss {self.loss.name!r} pulls patches to their bag mean; expected >= 2 patches"
            )
        if self.loss.name == "vicreg" and self.patch.num != 2:
            raise ValueError("patch.num: two-view vicreg uses exactly 2 views; expected 2")
        late = [e for e in self.eval.epochs if not 1 <= e <= self.schedule.epochs]
        if late:
            raise ValueError(
                f"eval.epochs: {late[0]} is not an epoch of this run; expected 1..{self.schedule.epochs} "
                "(schedule.epochs)"
            )
        bad = [s for s in self.eval.multiscale_sizes if not _is_size(s)]
        if bad:
            raise ValueError(f"eval.multiscale_sizes: {bad[0]!r}: {_SIZE_EXPECTED}")
        if not self.image_size_known:
            return self  # checked again once the size is resolved (bagssl_core.data.resolve_image_size)
        img = self.image_size
        if self.patch_px > img:
            raise ValueError(
                f"patch.size: a {self.patch_px}-px patch does not fit a {img}-px image ({self.data.name}); "
                f"expected at most {img} pixels or a fraction <= 1"
            )
        if self.eval_patch_px > img:
            raise ValueError(
                f"eval.grid_size: a {self.eval_patch_px}-px grid patch does not fit a {img}-px image"
            )
        _check_sizes_fit("eval.analysis.scales", self.eval.analysis.scales, img)
        _check_sizes_fit("eval.multiscale_sizes", self.eval.multiscale_sizes, img)
        return self


def _check_sizes_fit(key: str, sizes: list[int | float], img: int) -> None:
    """Each patch side (pixels or a fraction of the image) fits an img-px image."""
    for s in sizes:
        if patch_pixels(s, img) > img:
            raise ValueError(f"{key}: {s!r} does not fit a {img}-px image; expected 1..{img} px or (0, 1]")


# --- knobs that only some options use ------------------------------------------------------------


class KnobRule(NamedTuple):
    """A knob that only some choices of other keys (its options) use.

    Set explicitly while the config's options ignore it, the knob is an error (`TrainConfig` checks every
    rule in one validator); unset, it is left out of every dump of the config.
    """

    knob: str  # dotted TrainConfig path
    options: tuple[str, ...]  # the dotted paths whose values decide, named in the error
    used: Callable[[TrainConfig], bool]  # whether the config's options use the knob
    when: str  # when it is used, in words: "with optim.name=adamw"


def _rules(
    knobs: Iterable[str], options: tuple[str, ...], used: Callable[[TrainConfig], bool], when: str
) -> tuple[KnobRule, ...]:
    return tuple(KnobRule(k, options, used, when) for k in knobs)


def _while(option: str, *values: str) -> tuple[tuple[str, ...], Callable[[TrainConfig], bool], str]:
    """(options, used, when) of knobs used only while `option` (a dotted key) is one of `values`."""
    return (option,), lambda c: _get_dotted(c, option) in values, f"with {option}={' or '.join(values)}"


def _has_bag(cfg: TrainConfig) -> bool:
    return any(s in BAG_SCHEMES for s in cfg.eval.aggregation)


def _analysis(name: str) -> tuple[tuple[str, ...], Callable[[TrainConfig], bool], str]:
    """(options, used, when) of a knob used only while `name` is one of eval.analyses."""
    return ("eval.analyses",), lambda c: name in c.eval.analyses, f"with {name} in eval.analyses"


_BAG = f"a bag scheme ({', '.join(BAG_SCHEMES)}) in eval.aggregation"

KNOB_RULES: tuple[KnobRule, ...] = (
    *_rules(
        ["data.synthetic_train", "data.synthetic_test", "data.synthetic_classes"],
        *_while("data.name", "synthetic"),
    ),
    *_rules(
        ["data.root"],
        ("data.name",),
        lambda c: c.data.name != "synthetic",
        "with any data.name but synthetic",
    ),
    *_rules(["data.download"], *_while("data.name", *sorted(DOWNLOADABLE_DATASETS))),
    *_rules(["data.to_rgb"], *_while("data.name", *sorted(GRAYSCALE_DATASETS))),
    *_rules(["patch.view_scale"], *_while("loss.name", "vicreg")),
    # Colour operations on one channel: `augment` skips them there, as torchvision does.
    *_rules(
        ["patch.aug.saturation", "patch.aug.hue", "patch.aug.grayscale_p"],
        ("data.name", "data.to_rgb"),
        lambda c: c.in_channels == 3,
        "with 3-channel images (an RGB dataset, or data.to_rgb=true)",
    ),
    *_rules(["optim.momentum"], *_while("optim.name", "lars", "sgd")),
    *_rules(["optim.lars_eta"], *_while("optim.name", "lars")),
    *_rules(["optim.betas"], *_while("optim.name", "adamw")),
    *_rules(["eval.patches"], ("eval.aggregation",), _has_bag, f"with {_BAG}"),
    *_rules(
        ["eval.grid_size"],
        ("eval.aggregation",),
        lambda c: _has_bag(c) or "centre" in c.eval.aggregation,
        f"with {_BAG}, or centre",
    ),
    *_rules(
        ["eval.grid_stride"],
        ("eval.patches", "eval.aggregation"),
        lambda c: _has_bag(c) and c.eval.patches == "grid",
        f"with eval.patches=grid and {_BAG}",
    ),
    *_rules(
        ["eval.num_patches"],
        ("eval.patches", "eval.aggregation"),
        lambda c: _has_bag(c) and c.eval.patches == "random",
        f"with eval.patches=random and {_BAG}",
    ),
    *_rules(
        ["eval.multiscale_sizes"],
        ("eval.aggregation",),
        lambda c: "multiscale" in c.eval.aggregation,
        "with multiscale in eval.aggregation",
    ),
    *_rules(
        ["eval.analysis.val_images"],
        ("eval.analyses",),
        lambda c: bool(c.eval.analyses),
        "with some eval.analyses",
    ),
    *_rules(["eval.analysis.bank_images"], *_analysis("bag_curve")),
    *_rules(["eval.analysis.scales"], *_analysis("whole_vs_mean")),
    *_rules(
        ["eval.analysis.train_patches", "eval.analysis.queries", "eval.analysis.neighbours"],
        *_analysis("locality"),
    ),
    *_rules(
        ["eval.knn_k", "eval.knn_temperature"],
        ("eval.probes", "eval.analyses"),
        lambda c: "knn" in c.eval.probes or bool({"bag_curve", "locality"} & set(c.eval.analyses)),
        "with knn in eval.probes, or bag_curve or locality in eval.analyses",
    ),
    *_rules(
        ["eval.linear_epochs", "eval.linear_lr", "eval.linear_batch_size"],
        ("eval.probes",),
        lambda c: "linear" in c.eval.probes,
        "with linear in eval.probes",
    ),
)

# Validation context under which `TrainConfig` lets ignored knobs be set: only `validate_config` uses it,
# to find which knobs of a `defaults` layer the final config ignores.
_ALLOW_IGNORED = "allow_ignored_knobs"


def show_value(value: Any) -> str:
    """A config value as YAML flow style writes it: `[mean_emb, centre]`, `null`, `0.5`."""
    text = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True).strip()
    return text.removesuffix("...").strip()


def _get_dotted(model: BaseModel, key: str) -> Any:
    node: Any = model
    for part in key.split("."):
        node = getattr(node, part)
    return node


def is_set(model: BaseModel, key: str) -> bool:
    """Whether a dotted key was given explicitly (it and every section above it are in `model_fields_set`)."""
    node: Any = model
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def _pop_dotted(tree: dict[str, Any], key: str) -> None:
    """Remove `tree[a][b][c]` for key `a.b.c` if it is there."""
    *sections, leaf = key.split(".")
    node: Any = tree
    for part in sections:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


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
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(
                f"override {item!r}: {key}: an empty name between dots; expected a key like patch.size"
            )
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


def expand_dotted(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `tree` with its dotted keys spelt out as sections: {"patch.size": 8} -> {"patch":
    {"size": 8}}. `merge_overrides` reads dotted keys in the overrides only, so a file whose own keys may be
    dotted is expanded first."""
    return merge_overrides({}, tree)


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
    if not str(path).strip():
        raise ConfigError(f"{path!r}: an empty path; expected a YAML file holding {what}")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; expected a YAML file holding {what}")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{p}: not a regular file; expected a YAML file holding {what}")
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        at = p.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}:{at}: not UTF-8 text (byte {err.start}: {err.reason}); expected a YAML file in UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{p}: cannot read it ({err.strerror or err}); expected a readable YAML file"
        ) from None
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
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    return data, _key_lines(root, str(p)) if root is not None else {}


def _key_lines(
    node: yaml.Node, source: str, prefix: str = "", above: tuple[yaml.Node, ...] = ()
) -> dict[str, int]:
    """The line of every key under `node`; ConfigError for a key given twice in one mapping (YAML keeps the
    last silently) or an alias to a mapping that holds it (an endless config)."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        if any(node is a for a in above):
            key = prefix.rstrip(".")
            raise ConfigError(
                f"{source}:{node.start_mark.line + 1}: {key}: an alias to a mapping that holds it; expected a "
                "config of finite depth"
            )
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            if key in lines:
                raise ConfigError(
                    f"{source}:{k.start_mark.line + 1}: {key}: given twice (first on line {lines[key]}); expected "
                    "each key once"
                )
            lines[key] = k.start_mark.line + 1
            lines.update(_key_lines(v, source, key + ".", (*above, node)))
    return lines


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A TrainConfig YAML file as a plain mapping (see `read_yaml_file`)."""
    return read_yaml_file(path)[0]


def yaml_location(source: str, lines: Mapping[str, int | str] | None, key: str) -> str:
    """`file:line` of a dotted key, or of the nearest enclosing key the file spells out; else just `file`.

    A str in `lines` is a whole location, for a key whose value came from elsewhere than its line in the
    file (a spec's `--set`): the file's line would show the value it replaced.
    """
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        line = (lines or {}).get(".".join(parts[:n]))
        if isinstance(line, str):
            return line
        if line:
            return f"{source}:{line}"
    return source


def override_locations(
    lines: Mapping[str, int | str], keys: Iterable[str], where: str
) -> dict[str, int | str]:
    """A file's key lines (`read_yaml_file`) once overrides replaced `keys`: such a key, and every key under
    it, is located at `where` (`overrides`, `<spec> (--set)`), since its line in the file holds the value it
    replaced (`yaml_location`)."""
    keys = list(keys)
    return {key: line for key, line in lines.items() if not is_under(key, keys)} | dict.fromkeys(keys, where)


def is_under(key: str, keys: Iterable[str]) -> bool:
    """Whether dotted `key` is one of `keys` or inside one of them (`patch.aug.flip_p` is inside `patch`)."""
    return any(key == k or key.startswith(k + ".") for k in keys)


# Problems whose own message is clearer than pydantic's, and those where echoing the input adds nothing:
# the key names it, or the message already says what is wrong with it.
_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required key is missing"}
_NO_INPUT = frozenset({"extra_forbidden", "missing", "value_error"})
# pydantic's phrasings, as this project's "expected ..." (`Input should be a valid integer` -> `expected a
# valid integer`, `String should have at most 100 characters` -> `expected at most 100 characters`).
_LEADS = (
    ("Input should be ", "expected "),
    ("String should match pattern ", "expected a string matching "),
    ("String should have ", "expected "),
    ("List should have ", "expected "),
    ("Dictionary should have ", "expected "),
)


def describe_validation_error(
    err: ValidationError,
    tree: Mapping[str, Any],
    source: str | None = None,
    lines: Mapping[str, int | str] | None = None,
    model: type[BaseModel] | None = None,
    prefix: str = "",
) -> str:
    """One line per problem: `<source>:<line>: <dotted key>: <what was expected> (got <value>)`.

    Args:
        err: what pydantic found wrong with `tree`.
        tree: the mapping that was validated: it tells the keys in an error's location apart from the list
            indices and union tags (`patch.size.int`, `loss.tcr.eps`) pydantic appends to them.
        source: where the tree came from (a file); None leaves it out.
        lines: line of each dotted key in `source` (see `read_yaml_file`), or its location (`yaml_location`);
            None leaves lines out.
        model: the model validated, if any: an unknown key in one member of a tagged union (a knob of
            another loss) is then told with the knobs the chosen member has.
        prefix: where `tree` sits in `source` (`base.` for a sweep spec's base): the keys are printed, and
            looked up in `lines`, with it.
    """
    out: list[str] = []
    for e in err.errors():
        key, tag = _error_key(e, tree)
        msg = _MESSAGES.get(e["type"]) or e["msg"].removeprefix("Value error, ")
        for lead, then in _LEADS:
            if msg.startswith(lead):
                msg = then + msg.removeprefix(lead).partition(" after validation")[0]
                break
        got = e.get("input")
        if e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            key = f"{key}.{str(ctx.get('discriminator', '')).strip(chr(39))}".lstrip(".")
            msg, got = f"expected one of {ctx.get('expected_tags')}", ctx.get("tag")
        elif e["type"] == "extra_forbidden" and tag is not None:
            section = key.rpartition(".")[0]
            knobs = _member_fields(model, section, tag) if model is not None else None
            msg = f"not a knob of {section} {tag!r}" + (f" (its knobs: {', '.join(knobs)})" if knobs else "")
        got_s = "" if e["type"] in _NO_INPUT or isinstance(got, Mapping) else f" (got {got!r})"
        if key:
            where = f"{yaml_location(source, lines, prefix + key)}: " if source else ""
            head = f"{where}{prefix}{key}: "
            # Each member of a union (`patch.size`: an int or a float) reports the same input: one line.
            earlier = next((i for i, line in enumerate(out) if line.startswith(head + "expected ")), None)
            if earlier is not None and msg.startswith("expected ") and out[earlier].endswith(got_s):
                first = out[earlier].removeprefix(head).removesuffix(got_s).split(",")[0]
                out[earlier] = f"{head}{first} or {msg.removeprefix('expected ').split(',')[0]}{got_s}"
                continue
            out.append(f"{head}{msg}{got_s}")
            continue
        # A check over the whole config names its keys itself, one problem a line: `patch.size: ...`.
        for line in f"{msg}{got_s}".splitlines():
            named = line.partition(": ")[0]
            where = f"{yaml_location(source, lines, prefix + named)}: " if source else ""
            out.append(f"{where}{prefix}{line}")
    return "\n".join(dict.fromkeys(out))


def _error_key(error: ErrorDetails, tree: Mapping[str, Any]) -> tuple[str, str | None]:
    """The dotted key an error is about (its location for as long as it follows keys of `tree`), and the
    union tag the location passed on the way, if any (`loss.tcr.eps` -> `loss.eps`, `tcr`)."""
    loc = error["loc"]
    if error["type"] == "missing":
        return ".".join(str(p) for p in loc), None
    keys: list[str] = []
    tag = None
    node: Any = tree
    for i, part in enumerate(loc):
        if not isinstance(node, Mapping):
            break
        if part not in node:
            # A union tag sits between a section and its key: skip it when the next part is a key.
            if i + 1 < len(loc) and loc[i + 1] in node and isinstance(part, str):
                tag = part
                continue
            break
        keys.append(str(part))
        node = node[part]
    return ".".join(keys), tag


def _member_fields(model: type[BaseModel], section: str, tag: str) -> list[str] | None:
    """The fields (but the tag's) of the union member tagged `tag` at dotted `section` of `model`."""
    field: FieldInfo | None = None
    node: Any = model
    for part in section.split("."):
        fields = getattr(node, "model_fields", {})
        if part not in fields:
            return None
        field = fields[part]
        node = field.annotation
    if field is None or not isinstance(field.discriminator, str):
        return None
    for member in _union_members(field):
        if member.model_fields[field.discriminator].default == tag:
            return [f for f in member.model_fields if f != field.discriminator]
    return None


def _union_members(field: FieldInfo) -> tuple[type[BaseModel], ...]:
    """The models of a tagged union field (`loss`), or () for any other field."""
    if not isinstance(field.discriminator, str):
        return ()
    return tuple(
        m for m in typing.get_args(field.annotation) if isinstance(m, type) and issubclass(m, BaseModel)
    )


def validate_config(
    tree: Mapping[str, Any],
    source: str | None = None,
    lines: Mapping[str, int | str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    prefix: str = "",
) -> TrainConfig:
    """TrainConfig from a plain dict; a ConfigError naming the source (and line) and keys on failure.

    Args:
        tree: the keys given explicitly (a file, overrides). One the resulting config's options ignore is
            an error (see `KnobRule`).
        source, lines, prefix: where `tree` came from, for the messages (see `describe_validation_error`).
        defaults: a layer under `tree` that was not written for this config: a preset, a run's stored
            config under new overrides, a base under an evaluation variant. Its knobs that the resulting
            config ignores are dropped, not reported: e.g. the quick preset's `eval.grid_stride` under
            `eval.patches=random`. `validate_config({}, defaults=tree)` accepts any dump of a config.
    """
    _refuse_renamed(tree, source, lines, prefix)
    _refuse_bools(tree, source, lines, prefix)
    if defaults is None:
        return _validate(tree, source, lines, prefix)
    defaults = migrate_saved_config(defaults, source)
    try:
        merged = merge_overrides(defaults, tree)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}" if source else str(err)) from None
    # First pass: which knobs does the resulting config ignore? Those that only `defaults` set go.
    resolved = _validate(merged, source, lines, prefix, {_ALLOW_IGNORED: True})
    given = flatten(tree)
    for rule in resolved._ignoring_rules():
        if rule.knob not in given:
            _pop_dotted(merged, rule.knob)
    return _validate(merged, source, lines, prefix)


def _refuse_bools(
    tree: Mapping[str, Any], source: str | None, lines: Mapping[str, int | str] | None, prefix: str
) -> None:
    """ConfigError for each number knob `tree` gives a boolean (`bool_for_number`); a knob is a number knob
    when its default is a number or a list of them."""
    defaults = config_defaults()
    problems = []
    for key, value in flatten(tree).items():
        default = defaults.get(key)
        items = default if isinstance(default, list) and default else [default]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in items)
        if numeric and bool_for_number(value):
            where = f"{yaml_location(source, lines, prefix + key)}: " if source else ""
            problems.append(f"{where}{prefix}{key}: expected a number, not {show_value(value)}")
    if problems:
        raise ConfigError("\n".join(problems))


# --- knobs renamed since runs were saved with them ----------------------------------------------------

# Old dotted key -> new one. Until each loss got its own knobs (commit 766e226, `loss.name` picking one config
# per loss), one flat loss section held every loss's knobs, and a run saved all of them in its config.yaml
# and checkpoints: the tcr ones under these names.
RENAMED_KNOBS: Mapping[str, str] = MappingProxyType(
    {
        "loss.tcr_eps": "loss.eps",
        "loss.tcr_weight": "loss.coding_rate_weight",
        "loss.tcr_inv_weight": "loss.similarity_weight",
    }
)


def migrate_saved_config(tree: Mapping[str, Any], source: str | None = None) -> Mapping[str, Any]:
    """A config saved under old knob names (`RENAMED_KNOBS`), in today's names; any other tree as it is.

    A loss section holding an old name is the old flat one, with every loss's knobs: the run's own loss keeps
    its knobs (the tcr ones under their new names), and the other losses' knobs, which that run never read,
    are dropped. One warning line names each old key and what became of it. Runs and checkpoints are saved
    for good, so they load; a config written now is told the new names instead (`validate_config`).
    """
    loss = tree.get("loss")
    if not isinstance(loss, Mapping) or not any(f"loss.{k}" in RENAMED_KNOBS for k in loss):
        return tree
    name = loss.get("name", DEFAULT_LOSS)
    own = _member_fields(TrainConfig, "loss", str(name))
    if own is None:
        return tree  # an unknown loss: validation names it
    section: dict[str, Any] = {}
    renamed, dropped = [], []
    for key, value in loss.items():
        new = RENAMED_KNOBS.get(f"loss.{key}", f"loss.{key}").removeprefix("loss.")
        if key == "name" or new in own:
            section[new] = value
            if new != key:
                renamed.append(f"loss.{key} -> loss.{new}")
        else:
            dropped.append(f"loss.{key}" + (f" (now loss.{new})" if new != key else ""))
    parts = [f"renamed {', '.join(renamed)}"] if renamed else []
    if dropped:
        parts.append(f"dropped, as loss {name!r} never read them: {', '.join(dropped)}")
    where = f"{source}: " if source else ""
    _LOG.warning("%sa config saved under old loss knob names: %s", where, "; ".join(parts))
    return {**tree, "loss": section}


def _refuse_renamed(
    tree: Mapping[str, Any], source: str | None, lines: Mapping[str, int | str] | None, prefix: str
) -> None:
    """An old knob name in a config written now (a file, an override, a sweep's base) is an error naming the
    new key: only saved runs are migrated (`migrate_saved_config`)."""
    old = [k for k in flatten(tree) if k in RENAMED_KNOBS]
    if old:
        where = (lambda k: f"{yaml_location(source, lines, prefix + k)}: ") if source else (lambda k: "")
        raise ConfigError(
            "\n".join(
                f"{where(k)}{prefix}{k}: renamed; expected {prefix}{RENAMED_KNOBS[k]} (a knob of loss 'tcr')"
                for k in old
            )
        )


def _validate(
    tree: Mapping[str, Any],
    source: str | None,
    lines: Mapping[str, int | str] | None,
    prefix: str,
    context: dict[str, Any] | None = None,
) -> TrainConfig:
    try:
        return TrainConfig.model_validate(dict(tree), context=context)
    except ValidationError as err:
        raise ConfigError(
            describe_validation_error(err, tree, source, lines, TrainConfig, prefix),
            frozenset(e["type"] for e in err.errors()),
        ) from None


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
    # The preset is a layer of defaults: a knob it sets that the file or overrides switch off is dropped.
    defaults = merge_overrides({}, PRESETS[preset]) if preset is not None else None
    tree: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        tree, lines = read_yaml_file(path)
    if path is not None and {"space", "metric"} <= tree.keys():
        raise ConfigError(
            f"{path}: a sweep spec, not a TrainConfig file; expected a config such as a run's config.yaml "
            f"(the spec's base is one: python -m sweeps.run {path} --dry-run prints it)"
        )
    over = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    source = str(path) if path is not None else ("overrides" if over else preset)
    try:
        # Dotted keys in the file (`patch.size: 8`) mean what they mean in an override or a spec's base.
        tree = merge_overrides(expand_dotted(tree), over)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    # Overrides merge key by key, so exactly their flattened keys no longer hold the file's values.
    return validate_config(tree, source, override_locations(lines, flatten(over), "overrides"), defaults)


def config_to_yaml(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML, loadable by `load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class _Leaf(NamedTuple):
    """One key a YAML file or an override may set."""

    key: str  # dotted path
    default: Any  # as YAML gives it (lists, not tuples)
    description: str
    when: str  # of a knob only some members of a tagged union have: "with loss.name=tcr"; else ""


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterator[_Leaf]:
    """Every leaf key of `model` with its default; a tagged union (`loss`) gives its tag (`loss.name`) and
    the knobs of every member, each once with the members that have it (knobs of all members last)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        members = _union_members(field)
        if members:
            tag = str(field.discriminator)
            default = getattr(field.get_default(call_default_factory=True), tag)
            yield _Leaf(f"{key}.{tag}", default, field.description or "", "")
            found: dict[tuple[str, str], tuple[_Leaf, list[str]]] = {}
            for member in members:
                for leaf in _leaves(member, f"{key}."):
                    if leaf.key != f"{key}.{tag}":
                        found.setdefault((leaf.key, repr(leaf.default)), (leaf, []))[1].append(
                            str(member.model_fields[tag].default)
                        )
            for leaf, tags in sorted(found.values(), key=lambda f: len(f[1]) == len(members)):
                some = len(tags) < len(members)
                yield leaf._replace(when=f"with {key}.{tag}={' or '.join(tags)}" if some else "")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _leaves(field.annotation, f"{key}.")
        else:
            default = to_jsonable_python(field.get_default(call_default_factory=True))
            yield _Leaf(key, default, field.description or "", "")


@functools.cache
def config_defaults() -> Mapping[str, Any]:
    """Every dotted leaf path of TrainConfig (e.g. `patch.size`, and `loss.eps` of the tcr loss) and its
    default, as YAML would give it. A knob of one loss only has that loss's default."""
    return MappingProxyType({leaf.key: leaf.default for leaf in _leaves(TrainConfig)})


def config_reference() -> str:
    """A Markdown table of every TrainConfig key with its default and description (the README's reference).

    A knob that only some options use says when (`KNOB_RULES`, and the losses that have it)."""
    when = {rule.knob: rule.when for rule in KNOB_RULES}
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for leaf in _leaves(TrainConfig):
        only = leaf.when or when.get(leaf.key)
        meaning = f"{leaf.description} Used only {only}." if only else leaf.description
        rows.append(f"| `{leaf.key}` | `{show_value(leaf.default)}` | {meaning} |")
    return "\n".join(rows)
