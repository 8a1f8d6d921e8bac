"""`python -m bagssl_core` as a user runs it: bad input is one message on stderr and exit 2 (no traceback);
a tiny real run writes its run directory and prints validation and test accuracies side by side, and
`eval` reproduces both from the checkpoint.

Every subprocess pays ~5 s of imports, so the module trains once, then runs every other command at the
same time (a few at once) and each test checks one of the results.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from bagssl_core.config import load_config

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
    "eval_missing_checkpoint": (["eval", "no_such_run"], r"^error: no_such_run: no checkpoint here"),
    "eval_nothing_to_probe": (["eval"], r"^error: eval: expected either a CHECKPOINT or --random-init"),
    "val_size_too_large": (
        ["train", "--out", "val_run", "--preset", "none", *TINY, "data.val_size=60"],
        r"^error: data\.val_size: 60 validation images leave 4 of the 64 training images, less than one "
        r"batch \(data\.batch_size=16\); expected at most 48 validation images$",
    ),
    "run_dir_taken": (
        ["train", "--out", "run", "--quiet", "--preset", "none", *TINY],
        r"^error: run: already holds a run; pass --resume to continue it, or another --out$",
    ),
}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bagssl_core", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    (work / "bad.yaml").write_text("data:\n  name: synthetic\n  root: : x\n")
    (work / "empty_root").mkdir()
    tiny = load_config(None, TINY).model_dump(mode="json")
    (work / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    return work


@pytest.fixture(scope="module")
def trained(work: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, bytes]]:
    """The real tiny training run in `work/run`, and the bytes of every file it left there."""
    proc = cli(["train", "--out", "run", "--quiet", "--preset", "none", *TINY], work)
    return proc, files_of(work / "run")


@pytest.fixture(scope="module")
def results(
    work: Path, trained: tuple[subprocess.CompletedProcess[str], dict[str, bytes]]
) -> dict[str, subprocess.CompletedProcess[str]]:
    commands = {name: args for name, (args, _) in BAD_INPUT.items()}
    commands["eval_checkpoint"] = ["eval", "run", "--out", "eval.json"]
    commands["eval_random_init"] = ["eval", "--random-init", "--config", "tiny.yaml", "--out", "random.json"]
    commands["eval_random_init_overrides"] = ["eval", "--random-init", "--out", "random2.json", *TINY]
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
    assert len(lines) == 1, proc.stderr
    assert re.search(BAD_INPUT[case][1], lines[0]), lines[0]


def test_a_run_directory_is_never_overwritten(
    work: Path,
    trained: tuple[subprocess.CompletedProcess[str], dict[str, bytes]],
    results: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    assert results["run_dir_taken"].returncode == 2
    assert files_of(work / "run") == trained[1]


def test_train_writes_a_complete_run_directory(
    work: Path, trained: tuple[subprocess.CompletedProcess[str], dict[str, bytes]]
) -> None:
    proc, files = trained
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
    work: Path,
    trained: tuple[subprocess.CompletedProcess[str], dict[str, bytes]],
    results: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    proc = results["eval_checkpoint"]
    assert proc.returncode == 0, proc.stderr
    report = json.loads((work / "eval.json").read_text())
    summary = json.loads(trained[1]["summary.json"])
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
