"""TrainConfig: YAML files and dotted overrides, the errors that name the key (and file and line), the
cross-field checks, one config per loss, knobs the chosen options ignore, the YAML round trip and the
derived values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bagssl_core.aggregate import SCHEMES
from bagssl_core.config import (
    BAG_SCHEMES,
    EVAL_CHUNK_PIXELS,
    EVAL_CHUNK_PIXELS_CUDA,
    KNOB_RULES,
    PRESETS,
    TINY_PATCH_AREA,
    BagVICRegConfig,
    ConfigError,
    KnobRule,
    TrainConfig,
    config_defaults,
    config_reference,
    config_to_yaml,
    flatten,
    load_config,
    parse_overrides,
    parse_value,
    set_dotted,
    show_value,
    tiny_patches,
    validate_config,
)


def config_error(overrides: list[str], path: Path | None = None, preset: str | None = None) -> str:
    """The message of the ConfigError that loading `path` with `overrides` (over `preset`) must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, preset)
    return str(info.value)


# --- loading and overriding --------------------------------------------------------------------------


def test_yaml_file_sets_fields_and_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  name: cifar10\n  batch_size: 64\n"
        "patch:\n  size: 8\n  num: 4\n  aug:\n    flip_p: 0.0\n"
        "eval:\n  aggregation: [mean_emb, centre]\n"
    )
    cfg = load_config(path)
    assert (cfg.data.name, cfg.data.batch_size, cfg.patch.size, cfg.patch.num) == ("cifar10", 64, 8, 4)
    assert cfg.patch.aug.flip_p == 0.0
    assert cfg.eval.aggregation == ["mean_emb", "centre"]
    assert cfg.loss.inv_weight == 25.0  # untouched fields keep their defaults

    cfg = load_config(path, ["patch.size=12", "loss.inv_weight=10"])
    assert cfg.patch.size == 12 and cfg.patch.num == 4 and cfg.loss.inv_weight == 10.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8", 8),
        ("0.5", 0.5),
        ("true", True),
        ("[mean_emb, centre]", ["mean_emb", "centre"]),
        ("[64,32]", [64, 32]),
        ("null", None),
        ("cifar10", "cifar10"),
        ("", ""),
    ],
)
def test_parse_value_gives_natural_types(text: str, expected: object) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_dotted_overrides_get_natural_types() -> None:
    cfg = load_config(
        None,
        [
            "patch.size=8",
            "loss.var_weight=0.5",
            "data.download=true",
            "model.projector=[64, 32]",
            "eval.aggregation=[mean_emb,max_emb]",
            "patch.aug.blur_sigma=[0.5, 1.5]",
            "data.image_size=null",
        ],
    )
    assert cfg.patch.size == 8 and type(cfg.patch.size) is int  # pixels, not a fraction
    assert cfg.loss.var_weight == 0.5
    assert cfg.data.download is True
    assert cfg.model.projector == [64, 32]
    assert cfg.eval.aggregation == ["mean_emb", "max_emb"]
    assert cfg.patch.aug.blur_sigma == (0.5, 1.5)
    assert cfg.data.image_size is None

    frac = load_config(None, ["patch.size=0.5"])
    assert frac.patch.size == 0.5 and type(frac.patch.size) is float  # a fraction of the side
    # A mapping of overrides carries its values as they are.
    assert load_config(None, {"patch.size": 8, "eval.aggregation": ["centre"]}).eval.aggregation == ["centre"]


def test_override_syntax_errors() -> None:
    assert parse_overrides(["a.b=1", " c = x "]) == {"a.b": 1, "c": "x"}
    for bad in ["patchsize", "=8"]:
        with pytest.raises(ConfigError, match="expected key=value"):
            parse_overrides([bad])
    tree = {"patch": {"size": 8}}
    with pytest.raises(ConfigError, match=r"patch\.size: is a value, not a section"):
        set_dotted(tree, "patch.size.px", 1)


# --- errors that name the key ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("patch.sise=8", r"^overrides: patch\.sise: unknown key$"),
        ("pach.size=8", r"^overrides: pach: unknown key$"),
        ("patch.aug.flip=0.1", r"patch\.aug\.flip: unknown key"),
        ("patch.num=abc", r"patch\.num: expected a valid integer.*\(got 'abc'\)"),
        # a union's members (patch.size: pixels or a fraction) report one line
        (
            "patch.size=abc",
            r"^overrides: patch\.size: expected a valid integer or a valid number \(got 'abc'\)$",
        ),
        ("data.batch_size=1.5", r"data\.batch_size: expected a valid integer.*\(got 1\.5\)"),
        ("optim.name=adam", r"optim\.name: expected 'lars', 'sgd' or 'adamw' \(got 'adam'\)"),
        ("eval.aggregation=[mean_emb,foo]", r"eval\.aggregation: expected 'mean_emb'.*\(got 'foo'\)"),
        ("eval.aggregation=[centre,centre]", r"eval\.aggregation: expected each name once"),
        ("patch.size=0.0", r"patch\.size: expected pixels \(an int >= 1\) or a fraction"),
        ("patch.size=-3", r"patch\.size: expected pixels"),
        ("model.projector=[8,0]", r"model\.projector: expected positive widths"),
        ("loss.inv_weight=-1", r"loss\.inv_weight: expected greater than or equal to 0"),
        # infinities fail only later (an endless warm-up, an overflow); NaN as well
        (
            "schedule.warmup_epochs=.inf",
            r"^overrides: schedule\.warmup_epochs: expected a finite number \(got inf\)$",
        ),
        ("optim.base_lr=.nan", r"optim\.base_lr: expected a finite number \(got nan\)"),
        ("patch.aug.blur_sigma=[0.1,.inf]", r"patch\.aug\.blur_sigma: expected a finite number \(got inf\)"),
        (
            "patch..size=3",
            r"^override 'patch\.\.size=3': patch\.\.size: an empty name between dots; expected a key",
        ),
        (".patch.size=3", r"^override '\.patch\.size=3': \.patch\.size: an empty name between dots"),
        # YAML's true is not 1 for a number knob (pydantic would read it so: a 1-px patch)
        ("patch.size=true", r"^overrides: patch\.size: expected a number, not true$"),
        ("model.projector=[64,true]", r"^overrides: model\.projector: expected a number, not \[64, true\]$"),
        ("loss.inv_weight=false", r"^overrides: loss\.inv_weight: expected a number, not false$"),
        # numpy's generators take seeds in [0, 2**32)
        ("run.seed=-1", r"run\.seed: expected greater than or equal to 0 \(got -1\)"),
        ("run.seed=4294967296", r"run\.seed: expected less than or equal to 4294967295"),
    ],
)
def test_bad_override_names_the_key(override: str, expected: str) -> None:
    assert re.search(expected, config_error([override]))


def test_unknown_key_in_a_file_names_the_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("patch:\n  sise: 8\n")
    assert config_error([], path) == f"{path}:2: patch.sise: unknown key"


def test_bad_values_in_a_file_name_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {name: fashion_mnist}\npatch:\n  num: abc\neval:\n  aggregation: [mean_emb, foo]\n"
    )
    assert config_error([], path).splitlines() == [
        f"{path}:3: patch.num: expected a valid integer, unable to parse string as an integer (got 'abc')",
        f"{path}:5: eval.aggregation: expected 'mean_emb', 'mean_proj', 'max_emb', 'centre', 'whole' or "
        "'multiscale' (got 'foo')",
    ]
    # A value from the file keeps its line beside an unrelated override; one an override gave is located
    # there, not at the file line holding the value it replaced.
    assert config_error(["patch.num=4"], path) == (
        f"{path}:5: eval.aggregation: expected 'mean_emb', 'mean_proj', 'max_emb', 'centre', 'whole' or "
        "'multiscale' (got 'foo')"
    )
    assert config_error(["eval.aggregation=[mean_emb]", "patch={num: xyz}"], path) == (
        "overrides: patch.num: expected a valid integer, unable to parse string as an integer (got 'xyz')"
    )


def test_a_file_section_over_a_preset_keeps_the_presets_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("patch:\n  num: 4\n  aug: {flip_p: 0.0}\nschedule.epochs: 2\n")
    cfg = load_config(path, preset="quick")
    assert (cfg.patch.num, cfg.patch.aug.flip_p, cfg.schedule.epochs) == (4, 0.0, 2)
    assert (cfg.patch.size, cfg.patch.input_size, cfg.schedule.warmup_epochs) == (14, 14, 0.5)  # the preset's


# --- cross-field checks ----------------------------------------------------------------------------

MULTISCALE = "eval.aggregation=[multiscale]"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["patch.size=40"], r"patch\.size: a 40-px patch does not fit a 28-px image \(fashion_mnist\)"),
        (["data.name=cifar10", "patch.size=40"], r"patch\.size: a 40-px patch does not fit a 32-px image"),
        (["data.image_size=12"], r"patch\.size: a 16-px patch does not fit a 12-px image"),
        (["patch.num=1"], r"patch\.num: loss 'bag_vicreg' .*expected >= 2 patches"),
        (["loss.name=tcr", "patch.num=1"], r"patch\.num: loss 'tcr' .*expected >= 2 patches"),
        (["loss.name=vicreg"], r"patch\.num: two-view vicreg uses exactly 2 views"),
        (["loss.name=vicreg", "patch.num=3"], r"patch\.num: two-view vicreg uses exactly 2 views"),
        (["eval.grid_size=40"], r"eval\.grid_size: a 40-px grid patch does not fit a 28-px image"),
        (["eval.grid_size=0.0"], r"eval\.grid_size: expected pixels"),
        (
            [MULTISCALE, "eval.multiscale_sizes=[0.5,40]"],
            r"eval\.multiscale_sizes: 40 does not fit a 28-px image",
        ),
        (
            [MULTISCALE, "eval.multiscale_sizes=[1.5]"],
            r"eval\.multiscale_sizes: 1\.5: expected pixels \(an int >= 1\) or a fraction",
        ),
        (
            [MULTISCALE, "eval.multiscale_sizes=[0]"],
            r"eval\.multiscale_sizes: 0: expected pixels \(an int >= 1\) or a fraction",
        ),
    ],
)
def test_cross_field_checks(overrides: list[str], expected: str) -> None:
    assert re.search(expected, config_error(overrides))


def test_cross_field_checks_accept_the_edges() -> None:
    load_config(None, ["patch.size=28"])  # a patch as large as the image
    load_config(None, ["patch.size=1.0"])  # the whole side as a fraction
    load_config(None, ["loss.name=vicreg", "patch.num=2"])
    load_config(None, ["loss.name=tcr", "patch.num=2"])
    load_config(None, [MULTISCALE, "eval.multiscale_sizes=[1, 28, 0.1]"])


# --- files -------------------------------------------------------------------------------------------


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  name: synthetic\n  root: : x\n")
    msg = config_error([], path)
    assert msg.startswith(f"{path}:3: not valid YAML")


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert config_error([], empty) == f"{empty}: the file is empty; expected a mapping of config sections"
    listing = tmp_path / "list.yaml"
    listing.write_text("- patch\n- size\n")
    assert config_error([], listing).startswith(
        f"{listing}: expected a mapping of config sections at the top level"
    )
    missing = tmp_path / "missing.yaml"
    assert config_error([], missing) == f"{missing}: no such file"


def test_a_directory_or_a_file_not_in_utf8(tmp_path: Path) -> None:
    assert config_error([], tmp_path) == (
        f"{tmp_path}: is a directory; expected a YAML file holding a mapping of config sections"
    )
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  name: synthetic\n# café\n".encode("latin-1"))
    assert config_error([], latin) == (
        f"{latin}:3: not UTF-8 text (byte 29: invalid continuation byte); expected a YAML file in UTF-8"
    )


def test_a_sweep_spec_given_as_a_config_is_told_so(tmp_path: Path) -> None:
    spec = tmp_path / "smoke.yaml"
    spec.write_text("name: s\nbase: {}\nspace: {patch.size: {choice: [8]}}\nmetric: val/knn_top1/mean_emb\n")
    assert config_error([], spec) == (
        f"{spec}: a sweep spec, not a TrainConfig file; expected a config such as a run's config.yaml (the "
        f"spec's base is one: python -m sweeps.run {spec} --dry-run prints it)"
    )


def test_a_dotted_key_in_a_file_is_the_same_key(tmp_path: Path) -> None:
    """As in an override or a spec's base: `patch.size: 12` is `patch: {size: 12}`, and a typo in one is
    still located at its line."""
    path = tmp_path / "dotted.yaml"
    path.write_text("patch.size: 12\npatch: {num: 3}\n")
    cfg = load_config(path)
    assert (cfg.patch.size, cfg.patch.num) == (12, 3)
    path.write_text("patch.size: 12\npatch.sise: 3\n")
    assert config_error([], path) == f"{path}:2: patch.sise: unknown key"


def test_a_key_given_twice_or_an_endless_alias(tmp_path: Path) -> None:
    twice = tmp_path / "twice.yaml"
    twice.write_text("patch:\n  size: 8\nschedule: {epochs: 1}\npatch:\n  num: 4\n")
    assert (
        config_error([], twice) == f"{twice}:4: patch: given twice (first on line 1); expected each key once"
    )
    endless = tmp_path / "endless.yaml"
    endless.write_text("data: {name: synthetic}\npatch: &p {size: 8, aug: *p}\n")
    assert config_error([], endless) == (
        f"{endless}:2: patch.aug: an alias to a mapping that holds it; expected a config of finite depth"
    )
    shared = tmp_path / "shared.yaml"  # an alias used twice, holding no ancestor of its own, is fine
    shared.write_text("patch: {aug: &a {brightness: 0.2}}\n")
    load_config(shared)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "data.name=cifar10",
            "patch.size=0.25",
            "patch.input_size=16",
            "patch.aug.blur_sigma=[0.2, 1.0]",
            "model.projector=[64, 32]",
            "loss.name=tcr",
            "optim.grad_clip=1.5",
            "eval.aggregation=[mean_emb,whole,multiscale]",
            "eval.multiscale_sizes=[8, 0.5]",
            "run.seed=3",
        ],
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert type(again.patch.size) is float and type(again.eval.multiscale_sizes[0]) is int
    path.write_text(config_to_yaml(TrainConfig()))
    assert load_config(path) == TrainConfig()


# --- derived values ----------------------------------------------------------------------------------


def test_image_size_follows_the_dataset_unless_resized() -> None:
    assert TrainConfig().image_size == 28  # fashion_mnist
    assert load_config(None, ["data.name=cifar10"]).image_size == 32
    assert load_config(None, ["data.name=stl10"]).image_size == 96
    assert load_config(None, ["data.name=stl10", "data.image_size=64"]).image_size == 64


def test_imagefolder_size_is_left_to_its_files_until_resolved() -> None:
    """Without data.image_size an imagefolder config is valid before its files are read (a sweep's driver
    may not see them); what needs the size says which key to set (bagssl_core.data resolves it)."""
    cfg = load_config(None, ["data.name=imagefolder", "patch.size=0.5", "eval.grid_size=12"])
    assert not cfg.image_size_known and cfg.eval_patch_px == 12
    with pytest.raises(ConfigError, match=r"data\.image_size: imagefolder images keep their own size"):
        _ = cfg.patch_px  # a fraction of an unknown side
    sized = load_config(None, ["data.name=imagefolder", "data.image_size=64", "patch.size=0.5"])
    assert sized.image_size_known and sized.patch_px == 32


def test_tiny_pixel_patches_are_reported() -> None:
    """A pixel patch under TINY_PATCH_AREA (1%) of the image's area: issue 9's quick preset (14-px
    patches) on 224-px images is 0.39%. One line per key, naming it, the image size and the fraction."""
    assert TINY_PATCH_AREA == 0.01
    big = load_config(None, ["data.image_size=224"], preset="quick")
    (line,) = tiny_patches(big)
    assert line.startswith("patch.size: a 14-px patch covers 0.39% of a 224-px image (less than 1%)")
    assert "patch.size=0.0625" in line
    assert tiny_patches(load_config(None, [], preset="quick")) == []  # 14 px of 28 px: 25%
    assert tiny_patches(load_config(None, ["data.image_size=224", "patch.size=0.0625"])) == []  # a fraction
    both = load_config(None, ["data.name=stl10", "patch.size=8", "eval.grid_size=9"])  # 0.69% and 0.88%
    assert [x.split(":")[0] for x in tiny_patches(both)] == ["patch.size", "eval.grid_size"]
    assert tiny_patches(load_config(None, ["data.name=stl10", "patch.size=10"])) == []  # 1.09%


def test_eval_patch_chunk_bounds_pixels_per_forward() -> None:
    cfg = load_config(None, [], preset="quick")  # 14-px input
    assert cfg.eval.patch_chunk is None and EVAL_CHUNK_PIXELS == 2**18
    assert cfg.eval_patch_chunk(7) == 1337 and cfg.eval_patch_chunk(21) == 594  # 2**18 // 21**2
    assert load_config(None, ["data.image_size=224"]).eval_patch_chunk(16) == 5  # input = the image
    assert load_config(None, ["eval.patch_chunk=64"]).eval_patch_chunk(100) == 64
    # A GPU forwards 16x the pixels at once (bench/eval_chunk.py); an explicit eval.patch_chunk still wins.
    assert EVAL_CHUNK_PIXELS_CUDA == 2**22 and cfg.eval_patch_chunk(7, "cuda") == 21399  # 2**22 // 14**2
    assert cfg.eval_patch_chunk(7, "mps") == 1337  # any device but CUDA keeps the CPU's bound
    assert load_config(None, ["eval.patch_chunk=64"]).eval_patch_chunk(100, "cuda") == 64
    assert "eval.patch_chunk: expected greater than or equal to 1" in config_error(["eval.patch_chunk=0"])


def test_patch_px_for_pixels_and_fractions() -> None:
    assert load_config(None, ["patch.size=8"]).patch_px == 8
    assert load_config(None, ["patch.size=0.25"]).patch_px == 7  # 0.25 * 28
    assert load_config(None, ["patch.size=0.3"]).patch_px == 8  # round(8.4)
    assert load_config(None, ["data.name=cifar10", "patch.size=0.5"]).patch_px == 16
    assert load_config(None, ["patch.size=0.01"]).patch_px == 1  # never 0 pixels


def test_input_size_eval_patches_and_stride() -> None:
    cfg = load_config(None, ["patch.size=12"])
    assert cfg.input_size == 28  # None = the image size
    assert (cfg.eval_patch_px, cfg.eval_stride, cfg.eval_num_patches) == (12, 6, 16)
    cfg = load_config(None, ["patch.input_size=32", "eval.grid_size=0.5", "eval.grid_stride=5"])
    assert (cfg.input_size, cfg.eval_patch_px, cfg.eval_stride) == (32, 14, 5)
    assert load_config(None, ["eval.patches=random", "eval.num_patches=4"]).eval_num_patches == 4
    assert load_config(None, ["patch.size=1"]).eval_stride == 1  # half of 1 px rounds up to a 1-px step


def test_effective_lr_scales_with_the_global_batch() -> None:
    cfg = load_config(None, ["optim.base_lr=0.3", "data.batch_size=512"])
    assert cfg.effective_lr() == pytest.approx(0.6)
    assert load_config(None, ["optim.base_lr=0.2", "data.batch_size=64"]).effective_lr() == pytest.approx(
        0.05
    )
    assert cfg.optim.base_lr == 0.3  # the swept value is never overwritten


def test_config_defaults_are_the_dotted_leaves() -> None:
    paths = config_defaults()
    assert {
        "patch.size",
        "loss.inv_weight",
        "eval.aggregation",
        "patch.aug.flip_p",
        "run.seed",
    } <= paths.keys()
    assert (paths["patch.size"], paths["eval.aggregation"], paths["patch.aug.blur_sigma"]) == (
        16,
        ["mean_emb"],
        [0.1, 2.0],
    )
    assert "patch" not in paths and "patch.aug" not in paths  # sections are not leaves
    for path in paths:  # every leaf is a key a YAML file or an override may set
        section, *rest = path.split(".")
        assert section in TrainConfig.model_fields and rest


def test_config_defaults_know_the_knobs_of_every_loss() -> None:
    paths = config_defaults()
    assert (paths["loss.name"], paths["loss.inv_weight"], paths["loss.eps"]) == ("bag_vicreg", 25.0, 0.2)
    assert {"loss.coding_rate_weight", "loss.similarity_weight", "loss.gather_distributed"} <= paths.keys()
    assert not any(p.startswith("loss.tcr_") for p in paths)


# --- the loss: one config per loss, each with its own knobs --------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["loss.name=tcr", "patch.num=2", "loss.inv_weight=3"],
            "overrides: loss.inv_weight: not a knob of loss 'tcr' "
            "(its knobs: eps, coding_rate_weight, similarity_weight, gather_distributed)",
        ),
        (
            ["loss.eps=0.3"],
            "overrides: loss.eps: not a knob of loss 'bag_vicreg' "
            "(its knobs: inv_weight, var_weight, cov_weight, gather_distributed)",
        ),
        (
            ["loss.name=simclr"],
            "overrides: loss.name: expected one of 'bag_vicreg', 'tcr', 'vicreg' (got 'simclr')",
        ),
        (["loss.name=tcr", "loss.eps=0"], "overrides: loss.eps: expected greater than 0 (got 0)"),
    ],
)
def test_a_knob_of_another_loss_is_an_error_naming_the_loss_and_its_knobs(
    overrides: list[str], expected: str
) -> None:
    assert config_error(overrides) == expected


def test_a_loss_section_without_a_name_configures_the_default_loss(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.inv_weight=10"])
    assert (cfg.loss.name, cfg.loss) == ("bag_vicreg", BagVICRegConfig(inv_weight=10))
    path = tmp_path / "tcr.yaml"
    path.write_text("patch: {num: 4}\nloss:\n  name: tcr\n  eps: 0.5\n  var_weight: 2\n")
    assert config_error([], path) == (
        f"{path}:5: loss.var_weight: not a knob of loss 'tcr' "
        "(its knobs: eps, coding_rate_weight, similarity_weight, gather_distributed)"
    )


# --- knobs renamed since runs were saved with them ----------------------------------------------------

# The loss section as a run saved it before each loss had its own knobs (config_to_yaml at commit
# 766e226^, `loss.name=tcr loss.tcr_eps=0.3 loss.tcr_inv_weight=150`): one flat section with every loss's
# knobs, the tcr ones under their old names.
OLD_TCR_LOSS = {
    "name": "tcr",
    "inv_weight": 25.0,
    "var_weight": 25.0,
    "cov_weight": 1.0,
    "tcr_eps": 0.3,
    "tcr_weight": 1.0,
    "tcr_inv_weight": 150.0,
    "gather_distributed": True,
}


def saved_before_the_rename(loss: dict[str, object]) -> dict[str, object]:
    """Today's dump of a config, with the loss section as the old code saved it."""
    tree = load_config(None, ["data.name=synthetic", "patch.num=4"]).model_dump(mode="json")
    return {**tree, "loss": loss}


def test_a_saved_config_with_the_old_tcr_names_loads_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="bagssl_core.config"):
        cfg = validate_config({}, "runs/old/config.yaml", defaults=saved_before_the_rename(OLD_TCR_LOSS))
    assert cfg.loss.model_dump() == {
        "name": "tcr",
        "eps": 0.3,
        "coding_rate_weight": 1.0,
        "similarity_weight": 150.0,
        "gather_distributed": True,
    }
    assert [r.getMessage() for r in caplog.records] == [
        "runs/old/config.yaml: a config saved under old loss knob names: renamed loss.tcr_eps -> loss.eps, "
        "loss.tcr_weight -> loss.coding_rate_weight, loss.tcr_inv_weight -> loss.similarity_weight; "
        "dropped, as loss 'tcr' never read them: loss.inv_weight, loss.var_weight, loss.cov_weight"
    ]
    # Saved again, it has today's names and loads without a word.
    caplog.clear()
    assert validate_config({}, "again", defaults=cfg.model_dump(mode="json")) == cfg
    assert caplog.records == []


def test_a_saved_bag_vicreg_config_drops_the_old_tcr_knobs_it_never_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = {**OLD_TCR_LOSS, "name": "bag_vicreg", "inv_weight": 10.0}
    with caplog.at_level("WARNING", logger="bagssl_core.config"):
        cfg = validate_config({}, "ckpt", defaults=saved_before_the_rename(old))
    assert cfg.loss == BagVICRegConfig(inv_weight=10.0)
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        "ckpt: a config saved under old loss knob names: dropped, as loss 'bag_vicreg' never read them: "
        "loss.tcr_eps (now loss.eps), loss.tcr_weight (now loss.coding_rate_weight), "
        "loss.tcr_inv_weight (now loss.similarity_weight)"
    )


def test_an_old_name_in_a_config_written_now_is_an_error_naming_the_new_key(tmp_path: Path) -> None:
    assert config_error(["loss.name=tcr", "patch.num=4", "loss.tcr_eps=0.3"]) == (
        "overrides: loss.tcr_eps: renamed; expected loss.eps (a knob of loss 'tcr')"
    )
    path = tmp_path / "old.yaml"
    path.write_text("patch: {num: 4}\nloss:\n  name: tcr\n  tcr_inv_weight: 150\n")
    assert config_error([], path) == (
        f"{path}:4: loss.tcr_inv_weight: renamed; expected loss.similarity_weight (a knob of loss 'tcr')"
    )
    # Under a saved run's config, too: only the stored layer is migrated.
    with pytest.raises(ConfigError, match=r"^overrides: loss\.tcr_eps: renamed; expected loss\.eps"):
        validate_config(
            {"loss": {"tcr_eps": 0.1}}, "overrides", defaults=saved_before_the_rename(OLD_TCR_LOSS)
        )


# --- knobs the chosen options ignore -----------------------------------------------------------------

# Configs that switch options; every rule of KNOB_RULES must find one of them that ignores its knob.
OPTION_SETS = [
    [],
    ["optim.name=adamw"],
    ["optim.name=sgd"],
    ["loss.name=tcr", "patch.num=2"],
    ["data.name=synthetic"],
    ["data.name=cifar10"],
    ["data.name=imagefolder"],
    ["data.to_rgb=false"],
    ["eval.patches=random"],
    ["eval.aggregation=[whole]"],
    ["eval.probes=[knn]"],
    ["eval.probes=[linear]"],
]


@pytest.mark.parametrize("rule", KNOB_RULES, ids=lambda r: r.knob)
def test_a_knob_set_while_its_options_ignore_it_is_an_error(rule: KnobRule) -> None:
    """Even set to its default value: the config would claim a setting the run does not have."""
    ignoring = [o for o in OPTION_SETS if rule.knob in load_config(None, o).ignored_knobs()]
    assert ignoring, f"no config of OPTION_SETS ignores {rule.knob}"
    using = [o for o in OPTION_SETS if rule.knob not in load_config(None, o).ignored_knobs()]
    setting = f"{rule.knob}={show_value(config_defaults()[rule.knob])}"
    for options in ignoring:
        msg = config_error([*options, setting])
        assert msg.startswith(f"overrides: {rule.knob}: ignored with "), msg
        assert all(f"{o}=" in msg for o in rule.options), msg
        assert msg.endswith(f"; it is used only {rule.when}"), msg
    for options in using:
        load_config(None, [*options, setting])


def test_every_ignored_knob_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "adamw.yaml"
    path.write_text("optim:\n  name: adamw\n  momentum: 0.9\n  lars_eta: 0.02\n")
    assert config_error([], path).splitlines() == [
        f"{path}:3: optim.momentum: ignored with optim.name=adamw; it is used only with optim.name=lars or sgd",
        f"{path}:4: optim.lars_eta: ignored with optim.name=adamw; it is used only with optim.name=lars",
    ]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: " ".join(o) or "defaults")
def test_a_dump_leaves_out_the_ignored_knobs_and_loads_back(options: list[str], tmp_path: Path) -> None:
    cfg = load_config(None, options)
    dumped = flatten(cfg.model_dump(mode="json"))
    assert cfg.ignored_knobs() and not set(cfg.ignored_knobs()) & set(dumped)
    assert validate_config(cfg.model_dump()) == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_a_preset_is_a_layer_of_defaults() -> None:
    """The quick preset's eval.grid_stride is not the user's choice: switching the grid off drops it."""
    for name in PRESETS:
        load_config(preset=name)
    cfg = load_config(None, ["eval.patches=random"], preset="quick")
    assert (cfg.eval.patches, cfg.eval.grid_stride) == ("random", None)
    assert cfg.eval.linear_epochs == 10  # the preset's knobs the config uses stay
    assert config_error(["eval.patches=random", "eval.grid_stride=7"], preset="quick").startswith(
        "overrides: eval.grid_stride: ignored with eval.patches=random"
    )


def test_a_stored_config_is_a_layer_of_defaults_under_new_overrides() -> None:
    stored = load_config(None, ["eval.grid_stride=4", "optim.name=sgd", "optim.momentum=0.8"]).model_dump()
    cfg = validate_config({"eval": {"patches": "random"}, "optim": {"name": "adamw"}}, defaults=stored)
    assert (cfg.eval.grid_stride, cfg.optim.momentum) == (None, 0.9)  # dropped: defaults again
    with pytest.raises(ConfigError, match=r"eval\.grid_stride: ignored with eval\.patches=random"):
        validate_config({"eval": {"patches": "random", "grid_stride": 4}}, defaults=stored)


def test_bag_schemes_are_the_schemes_that_read_the_evaluation_bag() -> None:
    assert set(BAG_SCHEMES) == {name for name, s in SCHEMES.items() if s.view == "bag"}


def test_the_reference_says_which_loss_and_option_use_a_knob() -> None:
    ref = config_reference()
    assert (
        "| `loss.eps` | `0.2` | Distortion eps^2 of the coding rate (EMP-SSL --eps). Used only with loss.name=tcr. |"
        in ref
    )
    assert (
        "| `loss.inv_weight` | `25.0` | lambda: invariance weight. Used only with loss.name=bag_vicreg or vicreg. |"
        in ref
    )
    assert (
        "| `optim.betas` | `[0.9, 0.999]` | Adam betas (beta1, beta2). Used only with optim.name=adamw. |"
        in ref
    )
    assert [line.split("`")[1] for line in ref.splitlines()[2:]] == list(config_defaults())
