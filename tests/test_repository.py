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
    assert "mitoseg train --config sample_daw" in commands[0]  # a built-in config: works from any directory
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    script = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_CMD='(.*)'$", script, flags=re.M)
    assert match, "no TEST_CMD line in .ci/run"
    assert match.group(1) == quick_start_commands()[1]


def test_quick_start_config_and_its_data_are_shipped():
    from mitoseg.config import builtin_configs

    config = quick_start_commands()[0].split("--config ", 1)[1].split()[0]
    assert config in builtin_configs()  # inside the package, so a pip user has it too
    for name in ("train_image.tif", "train_label.tif", "val_image.tif", "val_label.tif"):
        assert (ROOT / "sample_data" / name).is_file()


def test_configs_have_one_source_of_truth():
    """The repository's configs/ is the package's mitoseg/configs/ (a link), never a second copy."""
    top = ROOT / "configs"
    if top.exists():
        assert top.is_symlink() and top.resolve() == (ROOT / "mitoseg" / "configs").resolve()


def test_no_document_points_at_a_missing_file_or_config():
    """Every docs/*.md and README link to a local file resolves, and every `--config NAME` is a built-in
    config or a file of the repository."""
    from mitoseg.config import builtin_configs

    names = set(builtin_configs())
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: link to missing {target}"
        for config in re.findall(r"--config ([\w./-]+)", text):
            if config.split(".")[0].split("|")[0].isupper() or config == "my.yaml":  # NAME, PATH.yaml, your file
                continue
            assert config in names or (ROOT / config).is_file(), f"{doc.name}: --config {config}"
