"""The repository's promises about itself: the README's Quick start and CI run the same line."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```\n(.*?)```", section, flags=re.S)]


def test_quick_start_holds_exactly_two_one_line_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert "mitoseg train --config configs/" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    script = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_CMD='(.*)'$", script, flags=re.M)
    assert match, "no TEST_CMD line in .ci/run"
    assert match.group(1) == quick_start_commands()[1]


def test_quick_start_config_and_its_data_are_shipped():
    config = quick_start_commands()[0].split("--config ", 1)[1].split()[0]
    assert (ROOT / config).is_file()
    for name in ("train_image.tif", "train_label.tif", "val_image.tif", "val_label.tif"):
        assert (ROOT / "sample_data" / name).is_file()
