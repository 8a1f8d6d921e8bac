"""`python -m bagssl_core` as a user runs it: bad input is one message on stderr and exit 2 (no traceback);
a tiny real run writes its run directory and prints validation and test accuracies side by side, `eval`
reproduces both from the checkpoint, and `--resume` continues a run from its own config (refusing a
different one) or reports a run that has ended.

Every subprocess pays ~5 s of imports, so the module trains once, then runs every other command at the
same time (a few at once) and each test checks one of the results.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml
from torchvision.io import write_png

from bagssl_core.config import load_config
from bagssl_core.metrics import TIMING_METRICS

TINY = [
    "data.name=synthetic",
    "data.synthetic_train=64",
    "data.synthetic_test=32",
    "data.batch_size=16",
    "patch.num=2",
    "patch.size=16",
    "patch.input_size=16",
    "model.projector=[32,32]",
    "eval.probes=[knn]",
    "run.threads=1",
    "schedule.epochs=1",
]

# A directory no process can create, root included: /proc takes no new entries.
NO_DIR = "/proc/bagssl-no-such-dir"
A_FILE = b"a file that a bad --out must leave as it is\n"

# name -> (arguments, run in the module's work directory; what the single stderr line must match)
BAD_INPUT: dict[str, tuple[list[str], str]] = {
    "unknown_key": (["train", "patch.sise=8"], r"^error: overrides: patch\.sise: unknown key$"),
    "wrong_type": (["train", "patch.num=abc"], r"^error: overrides: patch\.num: expected a valid integer"),
    "patch_too_large": (["train", "patch.size=40"], r"patch\.size: a 40-px patch does not fit a 28-px image"),
    "malformed_yaml": (["train", "--config", "bad.yaml"], r"^error: bad\.yaml:3: not valid YAML"),
    "missing_config": (["train", "--config", "missing.yaml"], r"^error: missing\.yaml: no such file$"),
    "missing_dataset": (
        ["train", "--out", "cifar_run", "data.name=cifar10", "data.root=empty_root"],
        r"^error: cifar10: not found .* in empty_root; set data\.download=true",
    ),
    # Decoded in a DataLoader worker, which re-raises the error with its own traceback in the message.
    "corrupt_image_in_a_worker": (
        [
            "train",
            "--out",
            "corrupt_run",
            "--preset",
            "none",
            "data.name=imagefolder",
            "data.root=corrupt_tree",
            "data.num_workers=1",
            "data.image_size=16",
            "data.batch_size=2",
            "data.val_size=1",
            "patch.num=2",
            "patch.size=8",
            "patch.input_size=8",
            "model.projector=[16,16]",
            "eval.probes=[knn]",
            "schedule.epochs=1",
            "run.threads=1",
        ],
        r"^error: imagefolder: cannot decode corrupt_tree/train/a/\d\.png: ",
    ),
    "eval_missing_checkpoint": (["eval", "no_such_run"], r"^error: no_such_run: no checkpoint here"),
    "eval_nothing_to_probe": (["eval"], r"^error: eval: expected either a CHECKPOINT or --random-init"),
    "eval_a_foreign_state": (
        ["eval", "foreign"],
        r"^error: foreign/state\.pt: not a bagssl checkpoint \(no model, epoch, config\); expected the state\.pt "
        r"that train writes$",
    ),
    "eval_a_torn_state": (["eval", "torn"], r"^error: torn/state\.pt: cannot load checkpoint \(.+\)$"),
    "eval_another_model": (
        ["eval", "run", "model.projector=[64,64]"],
        r"^error: eval: model\.projector: the checkpoint's model is fixed; expected overrides of how it is probed",
    ),
    "eval_config_without_random_init": (
        ["eval", "run", "--config", "tiny.yaml"],
        r"^error: eval: --config: read with --random-init only",
    ),
    "eval_a_file_not_a_checkpoint": (
        ["eval", "a_file"],
        r"^error: a_file: not a checkpoint; expected a run directory, a checkpoint directory or its state\.pt$",
    ),
    "val_size_too_large": (
        ["train", "--out", "val_run", "--preset", "none", *TINY, "data.val_size=60"],
        r"^error: data\.val_size: 60 validation images leave 4 of the 64 training images, less than one "
        r"batch \(data\.batch_size=16\); expected at most 48 validation images$",
    ),
    "run_dir_taken": (
        ["train", "--out", "run", "--quiet", "--preset", "none", *TINY],
        r"^error: run: already holds a run; pass --resume to continue it, or another --out$",
    ),
    "resume_nothing": (
        ["train", "--out", "nothing", "--resume"],
        r"^error: --resume: nothing/config\.yaml: no such file; expected the directory of a run to continue$",
    ),
    "empty_out": (["train", "--out", ""], r"^error: --out: an empty path; expected the run's directory"),
    "empty_config": (["train", "--config", ""], r"^error: '': an empty path; expected a YAML file"),
    "config_not_a_file": (
        ["train", "--config", "/dev/null"],
        r"^error: /dev/null: not a regular file; expected a YAML",
    ),
    # Sizes whose tensors alone exceed this machine's memory: refused up front, not by torch's allocator.
    "images_beyond_memory": (
        ["train", "--out", "huge_images", "data.image_size=100000"],
        r"^error: data\.image_size: this run needs at least [\d.]+ TiB at once, more than the [\d.]+ GiB of "
        r"memory this machine has: [\d.]+ TiB for the 3,600 train images of fashion_mnist at 100000x100000 px "
        r"\(1 channel, uint8\); expected a smaller data\.image_size \(got 100000\)",
    ),
    "patches_beyond_memory": (
        ["train", "--out", "huge_patches", "patch.num=10000000"],
        r"^error: data\.batch_size, patch\.num, model\.projector: this run needs at least [\d.]+ TiB at once.*; "
        r"[\d.]+ TiB for one batch of patches \(128 images a rank x patch\.num=10000000 x 3x14x14 px, float32\)",
    ),
    "projector_beyond_memory": (
        ["train", "--out", "huge_projector", "model.projector=[1000000,1000000]"],
        r"^error: model\.projector: this run needs at least [\d.]+ TiB at once, .*: [\d.]+ TiB for the model's "
        r"weights and gradients \(1,000,526,168,832 parameters, float32\);.* expected a narrower model\.projector",
    ),
    # argparse's own errors, one line as well
    "unknown_flag": (
        ["train", "--bogus"],
        r"^error: python -m bagssl_core train: unrecognized arguments: --bogus; see python -m bagssl_core train "
        r"--help$",
    ),
    "unknown_command": (
        ["fit"],
        r"^error: python -m bagssl_core: argument command: invalid choice: 'fit'",
    ),
    # An empty --out would be the working directory.
    "eval_empty_out": (
        ["eval", "run", "--out", ""],
        r"^error: --out: an empty path; expected the path of a file",
    ),
    "baselines_empty_out": (
        ["baselines", "--out", ""],
        r"^error: --out: an empty path; expected the path of a",
    ),
    "analyze_empty_out": (
        ["analyze", "run", "--out", ""],
        r"^error: --out: an empty path; expected a directory$",
    ),
    # data.* may change how a checkpoint is probed, but not the channels its first layer takes.
    "eval_other_channels": (
        ["eval", "run", "data.name=fashion_mnist", "data.to_rgb=false"],
        r"^error: eval: data\.name=fashion_mnist, data\.to_rgb=false: images of 1 channel, but the checkpoint's "
        r"backbone takes 3; expected data overrides that keep its input channels$",
    ),
    "bad_choice": (
        ["baselines", "--preset", "bogus"],
        r"^error: python -m bagssl_core baselines: argument --preset: invalid choice: 'bogus'",
    ),
    # Where a command will write is checked before it trains or probes (bagssl_core.outputs).
    "out_dir_under_a_file": (
        ["train", "--out", "a_file/run"],
        r"^error: --out: cannot write to a_file/run: a_file is a file, not a directory; expected a directory "
        r"this user can create and write$",
    ),
    "out_dir_that_cannot_exist": (
        ["train", f"run.out_dir={NO_DIR}/run"],
        rf"^error: run\.out_dir: cannot write to {NO_DIR}/run \(.+ in /proc\); expected a directory",
    ),
    "eval_out_a_directory": (
        ["eval", "run", "--out", "empty_root"],
        r"^error: --out: empty_root is a directory; expected the path of a file to write$",
    ),
    "baselines_out_that_cannot_exist": (
        ["baselines", "--out", f"{NO_DIR}/baselines.json"],
        rf"^error: --out: cannot write to {NO_DIR} \(.+ in /proc\); expected a directory",
    ),
    # A run's own files are never another command's output.
    "out_dir_in_a_checkpoint": (
        ["train", "--out", "run/checkpoints/epoch_0001", "--preset", "none", *TINY],
        r"^error: run/checkpoints/epoch_0001: part of the checkpoint at run/checkpoints/epoch_0001; expected a "
        r"directory outside a run's own files$",
    ),
    "eval_out_over_the_checkpoint": (
        ["eval", "run", "--out", "run/checkpoints/epoch_0001/state.pt"],
        r"^error: --out: run/checkpoints/epoch_0001/state\.pt is part of the checkpoint at "
        r"run/checkpoints/epoch_0001; expected a path outside a run's own files$",
    ),
    "baselines_out_over_a_run_file": (
        ["baselines", "--out", "run/summary.json", "--config", "tiny.yaml"],
        r"^error: --out: run/summary\.json is part of the run at run; expected a path outside a run's own files$",
    ),
    "analyze_out_under_a_file": (
        ["analyze", "run", "--out", "a_file/analyses"],
        r"^error: --out: cannot write to a_file/analyses: a_file is a file, not a directory",
    ),
}
# Found once the run has started: the data's INFO lines (loaded splits) come before the error's.
FOUND_ONCE_RUNNING = frozenset({"corrupt_image_in_a_worker"})
# Resuming the finished tiny run: name -> arguments.
RESUME = {
    # nothing but the run directory: the run's own config
    "resume_ended": ["train", "--out", "run", "--resume"],
    # the run's own config again, on another number of threads (a key of the run's environment)
    "resume_same_config": ["train", "--out", "run", "--resume", "--preset", "none", *TINY, "run.threads=2"],
    # a config that builds the same model but is not the run's: refused, every differing key named
    "resume_other_config": ["train", "--out", "run", "--resume", "--preset", "none", *TINY, "eval.knn_k=5"],
    "resume_overrides": ["train", "--out", "run", "--resume", "patch.size=8", "optim.name=adamw"],
}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bagssl_core", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def mtimes_of(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


class Trained(NamedTuple):
    """The tiny run in `work/run`: its `train` process, and the bytes and times of what it left there."""

    proc: subprocess.CompletedProcess[str]
    files: dict[str, bytes]
    mtimes: dict[str, int]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    (work / "bad.yaml").write_text("data:\n  name: synthetic\n  root: : x\n")
    (work / "empty_root").mkdir()
    (work / "a_file").write_bytes(A_FILE)
    (work / "foreign").mkdir()
    torch.save({"weights": torch.zeros(2)}, work / "foreign" / "state.pt")  # a torch file, not a checkpoint
    (work / "torn").mkdir()
    (work / "torn" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    for split, cls in itertools.product(("train", "val"), "ab"):  # every train/a image is cut short
        (work / "corrupt_tree" / split / cls).mkdir(parents=True)
        for i in range(3):
            png = work / "corrupt_tree" / split / cls / f"{i}.png"
            write_png(torch.full((3, 16, 16), 100 if cls == "a" else 200, dtype=torch.uint8), str(png))
            if (split, cls) == ("train", "a"):
                png.write_bytes(png.read_bytes()[:60])  # the header, so its size still reads
    tiny = load_config(None, TINY).model_dump(mode="json")
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    return work


@pytest.fixture(scope="module")
def trained(work: Path) -> Trained:
    proc = cli(["train", "--out", "run", "--quiet", "--preset", "none", *TINY], work)
    return Trained(proc, files_of(work / "run"), mtimes_of(work / "run"))


@pytest.fixture(scope="module")
def results(work: Path, trained: Trained) -> dict[str, subprocess.CompletedProcess[str]]:
    commands = {name: args for name, (args, _) in BAD_INPUT.items()} | RESUME
    commands["eval_checkpoint"] = ["eval", "run", "--out", "eval.json"]
    commands["eval_random_init"] = ["eval", "--random-init", "--config", "tiny.yaml", "--out", "random.json"]
    commands["eval_random_init_overrides"] = ["eval", "--random-init", "--out", "random2.json", *TINY]
    # Options and overrides in any order, as the usage lines write them.
    commands["eval_override_after_out"] = ["eval", "run", "--out", "centre.json", "eval.aggregation=[centre]"]
    commands["train_overrides_around_options"] = [
        "train", "--preset", "none", *TINY[:5], "--out", "mixed", "--quiet", *TINY[5:], "run.seed=3",
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(cli, args, work) for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_message_and_exit_2(
    case: str, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = results[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    if case in FOUND_ONCE_RUNNING:
        lines = [line for line in lines if not line.startswith("INFO ")]
    assert len(lines) == 1, proc.stderr
    assert re.search(BAD_INPUT[case][1], lines[0]), lines[0]


def test_options_and_overrides_may_come_in_any_order(
    work: Path, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """`eval RUN --out F key=value` and overrides on both sides of an option: argparse alone gives the
    overrides positional only the values before the first option, and refused the rest."""
    for case in ("eval_override_after_out", "train_overrides_around_options"):
        assert results[case].returncode == 0, results[case].stderr[-2000:]
    probes = [k for k in json.loads((work / "centre.json").read_text()) if "/knn_" in k]
    assert probes and all(k.endswith("/centre") for k in probes)
    saved = yaml.safe_load((work / "mixed" / "config.yaml").read_text())
    assert saved["run"]["seed"] == 3 and saved["data"]["name"] == "synthetic" and saved["patch"]["num"] == 2


# Refused from the command line and the files it names alone: no dataset to read, no checkpoint to load.
REFUSED_BEFORE_TORCH = (
    "unknown_key",
    "eval_empty_out",
    "baselines_empty_out",
    "wrong_type",
    "patch_too_large",
    "malformed_yaml",
    "missing_config",
    "eval_missing_checkpoint",
    "eval_nothing_to_probe",
    "eval_a_file_not_a_checkpoint",
    "eval_another_model",
    "eval_config_without_random_init",
    "empty_out",
    "empty_config",
    "config_not_a_file",
    "resume_nothing",
    "out_dir_under_a_file",
    "out_dir_that_cannot_exist",
    "eval_out_a_directory",
    "baselines_out_that_cannot_exist",
)


def _main_in_a_fresh_interpreter(argvs: list[list[str]], cwd: Path) -> tuple[list[int], bool, str, str]:
    """Run `main(argv)` for each argv, one after another, in one new Python process, as `python -m
    bagssl_core` would each: (exit codes, whether torch was imported by the end, stdout, stderr)."""
    script = (
        "import json, sys\n"
        "from bagssl_core.__main__ import main\n"
        "codes = [main(args) for args in json.loads(sys.argv[1])]\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *printed, last = proc.stdout.splitlines(keepends=True)  # the script's own line comes last
    got = json.loads(last)
    return got["codes"], got["torch"], "".join(printed), proc.stderr


def test_an_output_path_that_cannot_be_written_leaves_what_is_there_alone(
    work: Path, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    assert (work / "a_file").read_bytes() == A_FILE
    assert list((work / "empty_root").iterdir()) == []
    assert not Path(NO_DIR).exists()


def test_bad_input_that_needs_no_data_is_refused_before_torch_is_imported(work: Path) -> None:
    """The message comes in a fraction of a second, not after the seconds torch and torchvision take to
    import."""
    argvs = [BAD_INPUT[case][0] for case in REFUSED_BEFORE_TORCH]
    codes, torch_imported, _, stderr = _main_in_a_fresh_interpreter(argvs, work)
    assert codes == [2] * len(argvs) and not torch_imported, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(argvs), stderr
    for case, line in zip(REFUSED_BEFORE_TORCH, errors, strict=True):
        assert re.search(BAD_INPUT[case][1], line), (case, line)


def test_resuming_an_ended_run_is_answered_without_importing_torch(work: Path, trained: Trained) -> None:
    """Its results come from the run directory alone (summary.json), as at the run's end."""
    argvs = [RESUME["resume_ended"], RESUME["resume_same_config"]]
    codes, torch_imported, stdout, stderr = _main_in_a_fresh_interpreter(argvs, work)
    assert codes == [0, 0] and not torch_imported, stderr
    assert stdout == trained.proc.stdout * 2
    assert stderr.count("run: the run has already ended; nothing to resume, nothing changed") == 2


def test_a_run_directory_is_never_overwritten(
    work: Path, trained: Trained, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """Neither a new run, nor any `--resume` of the ended run (refused or not), nor an output aimed at the run's
    own files changes a file there."""
    assert results["run_dir_taken"].returncode == 2
    assert files_of(work / "run") == trained.files
    assert mtimes_of(work / "run") == trained.mtimes


def test_train_writes_a_complete_run_directory(work: Path, trained: Trained) -> None:
    proc, files, _ = trained
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert {
        "config.yaml",
        "provenance.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/epoch_0001/state.pt",
        "checkpoints/epoch_0001/config.yaml",
    } <= set(files)
    assert load_config(work / "run" / "config.yaml") == load_config(None, TINY)
    assert {"git_commit", "git_dirty", "python", "version/torch"} <= set(json.loads(files["provenance.json"]))
    summary = json.loads(files["summary.json"])
    assert summary["status"] == "finished" and summary["epochs"] == 1
    for split in ("val", "test"):
        value = summary[f"{split}/knn_top1/mean_emb"]
        assert summary[f"{split}/knn_top1_lo/mean_emb"] <= value <= summary[f"{split}/knn_top1_hi/mean_emb"]
    assert (summary["val/n_images"], summary["test/n_images"]) == (6, 32)  # 10% of 64 training images
    (line,) = files["metrics.jsonl"].decode().splitlines()
    assert json.loads(line) == {k: v for k, v in summary.items() if k not in ("status", "epochs")}
    assert "status: finished after 1 epochs; run directory: run" in proc.stdout
    assert_probe_table(proc.stdout, summary)


def assert_probe_table(stdout: str, metrics: dict[str, float]) -> None:
    """The printed table: val and test columns side by side, each accuracy with its interval."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("scheme"))
    assert lines[header].split() == ["scheme", "probe", "stat", "val", "(n=6)", "test", "(n=32)"]
    row = lines[header + 1]
    cell = "{:.2f} [{:.1f}, {:.1f}]"
    for split in ("val", "test"):
        names = [f"{split}/knn_top1{bound}/mean_emb" for bound in ("", "_lo", "_hi")]
        assert cell.format(*(metrics[n] for n in names)) in row, row
    assert row.split()[:3] == ["mean_emb", "knn", "top1"]


def test_eval_reproduces_the_runs_probe(
    work: Path, trained: Trained, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = results["eval_checkpoint"]
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "eval.json").read_text())
    summary = json.loads(trained.files["summary.json"])
    assert (report["checkpoint"], report["epoch"]) == ("run", 1)
    probes = {k: v for k, v in summary.items() if "/" in k and not k.startswith("train/")}
    assert len(probes) == 2 * (2 * 3 + 1)  # val and test: knn top1, top5 with their bounds, n_images
    assert {k: report[k] for k in probes} == probes
    assert_probe_table(proc.stdout, report)


def test_eval_random_init_from_a_config_file(
    work: Path, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = results["eval_random_init"]
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "random.json").read_text())
    assert (report["checkpoint"], report["epoch"]) == ("random-init", 0)
    assert (
        0.0 <= report["val/knn_top1/mean_emb"] <= 100.0 and 0.0 <= report["test/knn_top1/mean_emb"] <= 100.0
    )


def test_eval_random_init_with_overrides(
    work: Path, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = results["eval_random_init_overrides"]
    assert proc.returncode == 0, proc.stderr
    assert {"val/knn_top1/mean_emb", "test/knn_top1/mean_emb"} <= set(
        json.loads((work / "random2.json").read_text())
    )


# --- --resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["resume_ended", "resume_same_config"])
def test_resuming_an_ended_run_prints_its_results(
    case: str, trained: Trained, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    """It changes no file (test_a_run_directory_is_never_overwritten), whatever config the run had."""
    proc = results[case]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run: the run has already ended; nothing to resume, nothing changed" in proc.stderr
    assert proc.stdout == trained.proc.stdout  # the same probe table and status line as at the end


@pytest.mark.parametrize(
    ("case", "differences"),
    [
        ("resume_other_config", ["eval.knn_k: run has 20, given 5"]),
        (
            "resume_overrides",
            [
                "patch.size: run has 16, given 8",
                "optim.name: run has lars, given adamw",
                "optim.momentum: run has 0.9, given (not used)",
                "optim.lars_eta: run has 0.02, given (not used)",
                "optim.betas: run has (not used), given [0.9, 0.999]",
            ],
        ),
    ],
)
def test_resume_refuses_a_config_that_is_not_the_runs(
    case: str, differences: list[str], results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    proc = results[case]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first, *listed = proc.stderr.strip().splitlines()
    assert first.startswith("error: --resume: the given config differs from the run's (run/config.yaml)")
    assert "only data.num_workers, data.root, run.device, run.out_dir, run.threads may change" in first
    assert sorted(line.strip() for line in listed) == sorted(differences)


def without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def test_resume_continues_an_interrupted_run_from_its_own_config(work: Path) -> None:
    """A 2-epoch run cut back to the state a crash after epoch 1 leaves, then `--resume` with nothing but
    the directory: it trains epoch 2 from the run's config.yaml (not the quick preset's) and ends exactly
    where the uninterrupted run ended."""
    out = work / "cut"
    whole = cli(["train", "--out", "cut", "--quiet", "--preset", "none", *TINY, "schedule.epochs=2"], work)
    assert whole.returncode == 0, whole.stderr
    summary = json.loads((out / "summary.json").read_text())
    epochs = (out / "metrics.jsonl").read_text().splitlines()
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    (out / "metrics.jsonl").write_text(epochs[0] + "\n")

    proc = cli(["train", "--out", "cut", "--resume", "--quiet"], work)
    assert proc.returncode == 0, proc.stderr
    assert "status: finished after 2 epochs; run directory: cut" in proc.stdout
    assert without_timing(json.loads((out / "summary.json").read_text())) == without_timing(summary)
    resumed = (out / "metrics.jsonl").read_text().splitlines()
    assert [without_timing(json.loads(line)) for line in resumed] == [
        without_timing(json.loads(line)) for line in epochs
    ]


def _image_tree(root: Path, classes: str, prefix: str = "", side: int = 16) -> None:
    for split, cls in itertools.product(("train", "val"), classes):
        (root / split / cls).mkdir(parents=True)
        for i in range(3):
            value = 60 + 60 * classes.index(cls) + 5 * i
            image = torch.full((3, side, side), value, dtype=torch.uint8)
            write_png(image, str(root / split / cls / f"{prefix}{i}.png"))


def test_a_data_root_holding_other_images_is_refused_by_resume_and_analyze(work: Path) -> None:
    """data.root may move a run's images, never change them: a checkpoint keeps its data's identity
    (classes, image count, a fingerprint of names and labels), and `train --resume` and `analyze` compare."""
    _image_tree(work / "two", "ab")
    _image_tree(work / "three", "abc")
    _image_tree(work / "renamed", "ab", prefix="x")  # the same classes and count, other images
    _image_tree(work / "bigger", "ab", side=32)  # the same names, re-encoded at another size
    shutil.copytree(work / "two", work / "moved")
    settings = [
        "data.name=imagefolder", "data.batch_size=2", "data.val_size=1", "patch.num=2", "patch.size=8",
        "patch.input_size=8", "model.projector=[16,16]", "eval.probes=[knn]", "run.threads=1",
    ]  # fmt: skip
    args = ["train", "--out", "if_run", "--quiet", "--preset", "none", *settings, "data.root=two"]
    trained = cli([*args, "schedule.epochs=2"], work)
    assert trained.returncode == 0, trained.stderr
    (work / "if_run" / "summary.json").unlink()  # cut back to a crash after epoch 1
    shutil.rmtree(work / "if_run" / "checkpoints" / "epoch_0002")
    lines = (work / "if_run" / "metrics.jsonl").read_text().splitlines()
    (work / "if_run" / "metrics.jsonl").write_text(lines[0] + "\n")

    checkpoint = "the checkpoint at if_run/checkpoints/epoch_0001"
    refused = {
        "resume_three": (
            ["train", "--out", "if_run", "--resume", "--quiet", "data.root=three"],
            f"data.root: three: not the imagefolder data {checkpoint} was trained on (2 classes (a, b) then, 3 "
            "classes (a, b, c) now; 5 training images then, 8 now)",
        ),
        "analyze_renamed": (
            [
                "analyze",
                "if_run",
                "data.root=renamed",
                "--only",
                "bag_curve",
                "--out",
                "an_renamed",
                "eval.analysis.val_images=2",
                "eval.analysis.bank_images=4",
            ],
            "data.root: renamed: not the imagefolder data the checkpoint at if_run was trained on (other training "
            "images or labels)",
        ),
        "analyze_bigger": (
            [
                "analyze",
                "if_run",
                "data.root=bigger",
                "--only",
                "bag_curve",
                "--out",
                "an_bigger",
                "eval.analysis.val_images=2",
                "eval.analysis.bank_images=4",
            ],
            "data.root: bigger: not the imagefolder data the checkpoint at if_run was trained on (images of "
            "16x16 px then, 32x32 px now)",
        ),
    }
    for name, (command, message) in refused.items():
        proc = cli(command, work)
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("INFO ")]
        assert proc.returncode == 2 and errors == [
            f"error: {message}; expected the same images (data.root may move them, not change them)"
        ], (name, proc.stderr)
    assert not (work / "an_renamed").exists()
    moved = cli(["train", "--out", "if_run", "--resume", "--quiet", "data.root=moved"], work)
    assert moved.returncode == 0, moved.stderr
    assert "status: finished after 2 epochs" in moved.stdout


def with_old_loss_names(tree: dict[str, Any]) -> dict[str, Any]:
    """A tcr config as a run saved it before each loss had its own knobs (config_to_yaml at commit
    766e226^): one flat loss section with every loss's knobs, the tcr ones under their old names."""
    loss = tree["loss"]
    old = {
        "name": "tcr",
        "inv_weight": 25.0,
        "var_weight": 25.0,
        "cov_weight": 1.0,
        "tcr_eps": loss["eps"],
        "tcr_weight": loss["coding_rate_weight"],
        "tcr_inv_weight": loss["similarity_weight"],
        "gather_distributed": loss["gather_distributed"],
    }
    return {**tree, "loss": old}


def test_a_run_saved_under_the_old_tcr_names_resumes_and_evaluates(work: Path) -> None:
    """A tcr run interrupted after epoch 1 whose config.yaml and checkpoint carry the old knob names:
    `--resume` and `eval` load it with one warning line naming old and new keys, and use its values (a
    non-default eps and similarity weight): the resumed run ends exactly where the uninterrupted one did,
    and `eval` of the epoch-1 checkpoint reproduces that epoch's validation probe."""
    import torch  # only this test rewrites a checkpoint

    knobs = [
        "loss.name=tcr",
        "loss.eps=0.3",
        "loss.similarity_weight=150",
        "schedule.epochs=2",
        "eval.every=1",
    ]
    whole = cli(["train", "--out", "old_names", "--quiet", "--preset", "none", *TINY, *knobs], work)
    assert whole.returncode == 0, whole.stderr
    out = work / "old_names"
    summary = json.loads((out / "summary.json").read_text())
    epochs = (out / "metrics.jsonl").read_text().splitlines()
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    (out / "metrics.jsonl").write_text(epochs[0] + "\n")
    ckpt = out / "checkpoints" / "epoch_0001"
    for path in (out / "config.yaml", ckpt / "config.yaml"):
        path.write_text(
            yaml.safe_dump(with_old_loss_names(yaml.safe_load(path.read_text())), sort_keys=False)
        )
    state = torch.load(ckpt / "state.pt", weights_only=True)
    torch.save({**state, "config": with_old_loss_names(state["config"])}, ckpt / "state.pt")
    assert "tcr_eps: 0.3" in (out / "config.yaml").read_text()

    with ThreadPoolExecutor(max_workers=2) as pool:
        evaluated = pool.submit(cli, ["eval", str(ckpt.relative_to(work)), "--out", "old_eval.json"], work)
        resumed = pool.submit(cli, ["train", "--out", "old_names", "--resume", "--quiet"], work)
        proc, ev = resumed.result(), evaluated.result()
    renamed = (
        "a config saved under old loss knob names: renamed loss.tcr_eps -> loss.eps, loss.tcr_weight -> "
        "loss.coding_rate_weight, loss.tcr_inv_weight -> loss.similarity_weight; dropped, as loss 'tcr' "
        "never read them: loss.inv_weight, loss.var_weight, loss.cov_weight"
    )
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "old loss knob names" in line] == [
        f"WARNING bagssl_core.config: old_names/config.yaml: {renamed}"
    ]
    assert without_timing(json.loads((out / "summary.json").read_text())) == without_timing(summary)
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == {
        "name": "tcr",
        "eps": 0.3,
        "coding_rate_weight": 1.0,
        "similarity_weight": 150.0,
        "gather_distributed": True,
    }

    assert ev.returncode == 0, ev.stderr
    assert [line for line in ev.stderr.splitlines() if "old loss knob names" in line] == [
        f"WARNING bagssl_core.config: old_names/checkpoints/epoch_0001 + overrides: {renamed}"
    ]
    report = json.loads((work / "old_eval.json").read_text())
    first = json.loads(epochs[0])
    val = {k: v for k, v in first.items() if k.startswith("val/")}
    assert val and {k: report[k] for k in val} == val
