"""The commands of README.md: the first two lines are what `.ci/run` does, every `hybriddiff`
command parses with the current command line and its config validates, every `launch/` line runs
as a dry run, every benchmark flag exists. (Each command also has an end-to-end test elsewhere:
test_demo, test_cli_plot, test_cli, test_cli_sample_eval, test_launch.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hybriddiff import cli
from hybriddiff.training import config as config_lib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def bash_lines() -> list[list[list[str]]]:
    """Every line of the ```bash blocks as its ``&&``-separated commands (argument lists),
    comments stripped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            parts: list[list[str]] = [[]]
            for word in words:
                if word == "&&":
                    parts.append([])
                else:
                    parts[-1].append(word)
            if words:
                lines.append(parts)
    return lines


def commands(program: str) -> list[list[str]]:
    """The README's invocations of ``program`` as argument lists."""
    return [words for line in bash_lines() for words in line if words[0] == program]


def test_the_first_two_commands_install_demo_and_test_as_ci_does() -> None:
    first, second = bash_lines()[:2]
    assert first == [["pip", "install", "-e", "."], ["hybriddiff", "demo"]]
    install, test = second
    assert install == ["pip", "install", "-e", ".[test]"]
    ci = [shlex.split(line, comments=True) for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ["python3", "-m", "pip", "install", "-q", "-e", ".[test]"] in ci
    assert test in ci


@pytest.mark.parametrize("words", commands("hybriddiff"), ids=shlex.join)
def test_hybriddiff_commands_parse_and_validate(words: list[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # --config=configs/... is relative to the checkout
    parsed = cli._parse(words)
    if parsed.command in cli._RUN_COMMANDS:
        options = cli._sampling_options(parsed.options)
        assert options["num_samples"] >= 1
        if parsed.command == "eval":
            cli._zero_shot(parsed.options)
    elif parsed.config is not None:
        config_lib.validate(parsed.config, num_devices=8, num_processes=1)
    if parsed.command == "demo":
        assert not parsed.options["quick"] and parsed.workdir is None


def test_readme_covers_every_command() -> None:
    used = {words[1] for words in commands("hybriddiff")}
    assert used == set(cli.COMMANDS)


@pytest.mark.parametrize("words", commands("launch/create.sh") + commands("launch/train.sh"),
                         ids=shlex.join)
def test_launch_lines_are_dry_runs_that_succeed(words: list[str]) -> None:
    assert words[-1] == "--dry-run"
    result = subprocess.run(["bash", *words], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "gcloud compute tpus tpu-vm" in result.stdout


def test_benchmark_lines_use_existing_flags() -> None:
    lines = [words for words in commands("python3") if words[1].startswith("benchmarks/")]
    assert {words[1] for words in lines} == {f"benchmarks/{p.name}"
                                             for p in (REPO / "benchmarks").glob("*.py")}
    for words in lines:
        result = subprocess.run([sys.executable, *words[1:2], "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for flag in words[2:]:
            assert flag in result.stdout, (words, flag)
