"""Tests for hybriddiff.cli (in-process `run`, no compilation): the command line, its error paths and
the `prepare` command. Training through the CLI is tested in test_train_loop.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybriddiff import cli
from hybriddiff.data import read_manifest

CONFIG = str(Path(cli.__file__).resolve().parent.parent / "configs" / "demo.py")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.run(["hybriddiff", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_commands_and_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["hybriddiff", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("train", "prepare", "--workdir", "--coordinator_address", "--config.data.path"):
        assert word in text


@pytest.mark.parametrize("args, message", [
    ((), "expected one command from ('train', 'prepare', 'sample', 'eval', 'demo', 'plot'), got []"),
    (("predict", f"--config={CONFIG}"),
     "expected one command from ('train', 'prepare', 'sample', 'eval', 'demo', 'plot'), got ['predict']"),
    (("train", "--workdir=w"), "--config=configs/x.py is required"),
    (("train", "--config=missing.py", "--workdir=w"), "cannot load --config='missing.py'"),
    (("train", f"--config={CONFIG}", "--config.train.nope=1"), "invalid --config override"),
    (("train", f"--config={CONFIG}", "--config.train.batch_size=abc"),
     "flag --config.train.batch_size=abc"),
    (("train", f"--config={CONFIG}", "--num_processes=two"), "flag --num_processes=two"),
])
def test_malformed_command_lines_exit_2(capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                        message: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err and "usage: hybriddiff" in err


@pytest.mark.parametrize("args, message", [
    (("train",), "train needs --workdir"),
    (("prepare",), "prepare needs --workdir or --output"),
    (("train", "--workdir={w}", "--config.hyperschedule.kind=block", "--config.hyperschedule.width=5"),
     "hyperschedule.width=5 does not divide data.seq_len=128"),
    (("train", "--workdir={w}", "--config.train.batch_size=12"),
     "train.batch_size=12 is not divisible by the data-parallel size data*fsdp=8"),
    (("train", "--workdir={w}", "--coordinator_address=127.0.0.1:1234"),
     "coordinator_address, num_processes and process_id must be given together"),
    (("train", "--workdir={w}", "--config.data.source=text"), "data.path=''"),
    (("prepare", "--output={w}", "--config.data.path={w}/missing"), "does not exist"),
    (("prepare", "--output={w}", "--config.data.tokenizer=sentencepiece:many"),
     "data.tokenizer='sentencepiece:many'"),
])
def test_rejected_configs_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 args: tuple[str, ...], message: str) -> None:
    filled = [a.replace("{w}", str(tmp_path)) for a in args]
    code, _, err = run(capsys, filled[0], f"--config={CONFIG}", "--noprogress", *filled[1:])
    assert code == 1
    assert f"hybriddiff {filled[0]}: error:" in err and message in err


def test_prepare_writes_both_splits_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "prepare", f"--config={CONFIG}", f"--workdir={tmp_path}", "--noprogress")
    assert code == 0, err
    train, valid = read_manifest(tmp_path / "data" / "train"), read_manifest(tmp_path / "data" / "validation")
    assert f"train: {train.num_documents} documents, {train.num_tokens} tokens" in out
    assert f"validation: {valid.num_documents} documents, {valid.num_tokens} tokens" in out
    assert "vocab_size (N): 259" in out and train.tokenizer["kind"] == "bytes"
    assert train.num_documents > valid.num_documents >= 1
    before = (tmp_path / "data" / "train" / "manifest.json").stat().st_mtime_ns
    assert run(capsys, "prepare", f"--config={CONFIG}", f"--workdir={tmp_path}", "--noprogress")[0] == 0
    assert (tmp_path / "data" / "train" / "manifest.json").stat().st_mtime_ns == before  # nothing redone
    code, _, err = run(capsys, "prepare", f"--config={CONFIG}", f"--workdir={tmp_path}", "--noprogress",
                       "--config.data.validation_fraction=0.2")
    assert code == 1 and "was prepared with different settings (source differ)" in err


def test_prepare_trains_a_sentencepiece_tokenizer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "prepared"
    code, out, err = run(capsys, "prepare", f"--config={CONFIG}", f"--output={out_dir}", "--noprogress",
                         "--config.data.tokenizer=sentencepiece:512")
    assert code == 0, err
    manifest = read_manifest(out_dir / "train")
    assert manifest.tokenizer["kind"] == "sentencepiece" and manifest.vocab_size == 512
    assert Path(manifest.tokenizer["path"]) == out_dir / "sentencepiece_512.model"
    assert json.loads((out_dir / "validation" / "manifest.json").read_text())["settings"]["tokenizer"] \
        == manifest.tokenizer
    assert "vocab_size (N): 512" in out
