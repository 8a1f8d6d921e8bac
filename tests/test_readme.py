"""The README's config reference is generated from TrainConfig: it must not drift from the code."""

from pathlib import Path

from bagssl_core.config import PRESETS, config_reference

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_config_reference_matches_trainconfig() -> None:
    for line in config_reference().splitlines():
        assert line in README, f"README config reference is stale: {line}"


def test_readme_lists_the_quick_preset() -> None:
    for key in PRESETS["quick"]:
        assert f"| `{key}` |" in README


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python -m pytest" in README and "python -m pytest" in ci
