"""Tests for launch/: shellcheck, the README's dry-run transcripts, option errors, the commands
actually run (with a fake gcloud), resume's branches, and the remote commands run locally."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
README = LAUNCH / "README.md"
SCRIPTS = ("create.sh", "setup.sh", "prepare.sh", "train.sh", "resume.sh", "delete.sh")
BASH = shutil.which("bash")

LOCATION = ["--name=hd-test", "--zone=us-central2-b"]
REPO_URL = "--repo=https://github.com/OWNER/hybriddiff.git"
ARGS = {
    "create.sh": LOCATION + ["--accelerator=v4-32", "--spot"],
    "setup.sh": LOCATION + [REPO_URL, "--ref=v1.0"],
    "prepare.sh": LOCATION + ["--config=configs/lm1b_bd3.py", "--data=gs://my-bucket/data/lm1b",
                              "--", "--config.data.path=/mnt/raw data"],
    "train.sh": LOCATION + ["--config=configs/lm1b_bd3.py", "--workdir=gs://my-bucket/runs/a",
                            "--data=gs://my-bucket/data/lm1b", "--env=XLA_FLAGS=--a --b", "--",
                            "--config.train.batch_size=64", "--config.note=it's"],
    "resume.sh": LOCATION + ["--accelerator=v4-32", "--spot", REPO_URL, "--ref=v1.0",
                             "--config=configs/lm1b_bd3.py", "--workdir=gs://my-bucket/runs/a",
                             "--data=gs://my-bucket/data/lm1b"],
    "delete.sh": LOCATION,
}

# A stand-in for gcloud: appends its argv (JSON) to $FAKE_GCLOUD_LOG; `describe` prints
# $FAKE_TPU_STATE, or fails like gcloud when the state is MISSING / DENIED.
FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    state = os.environ.get("FAKE_TPU_STATE", "READY")
    if state == "MISSING":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found")
    if state == "DENIED":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) PERMISSION_DENIED: no access")
    print(state)
"""


def _write_executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture(autouse=True)
def _no_real_gcloud(tmp_path, monkeypatch):
    """Every script run by a test finds a gcloud that fails loudly, unless the test installs the
    recording fake (fake_gcloud) in front of it: no test can reach the real Google Cloud CLI."""
    guard = tmp_path / "guard"
    guard.mkdir()
    _write_executable(guard / "gcloud",
                      "#!/bin/sh\necho 'test error: gcloud was run' >&2\nexit 97\n")
    monkeypatch.setenv("PATH", f"{guard}:{os.environ['PATH']}")


@pytest.fixture
def fake_gcloud(tmp_path):
    """(env, log path): PATH starts with a directory whose gcloud is FAKE_GCLOUD."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log))
    return env, log


def _logged(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def _run(script: str, args: list[str], env: dict | None = None, cwd: Path = REPO):
    return subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def _with_dry_run(args: list[str]) -> list[str]:
    """``args`` with --dry-run added before any '--' (what follows '--' goes to the trainer)."""
    split = args.index("--") if "--" in args else len(args)
    return [*args[:split], "--dry-run", *args[split:]]


def _dry(script: str, args: list[str]) -> list[str]:
    result = _run(script, _with_dry_run(args))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _gcloud_lines(lines: list[str]) -> list[list[str]]:
    """The gcloud commands of a dry run, parsed like a shell would (comments dropped)."""
    return [shlex.split(line)[1:] for line in lines if not line.startswith("#")]


def _remote_command(words: list[str]) -> str:
    (command,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
    return command


# ----------------------------------------------------------------------------------------------
# Static checks.


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install -y shellcheck)")
    result = subprocess.run(["shellcheck", "-x", *sorted(str(p) for p in LAUNCH.glob("*.sh"))],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_remote_commands_are_clean_bash():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install -y shellcheck)")
    tarball_setup = LOCATION + ["--tarball=src.tar.gz"]
    commands = []
    for script, args in [*ARGS.items(), ("setup.sh", tarball_setup)]:
        commands += [_remote_command(w) for w in _gcloud_lines(_dry(script, args)) if "ssh" in w]
    assert len(commands) == 6  # setup x2, prepare, train, resume (setup + train)
    for command in commands:
        result = subprocess.run(["shellcheck", "--shell=bash", "-"], input=command,
                                capture_output=True, text=True)
        assert result.returncode == 0, command + "\n" + result.stdout


# ----------------------------------------------------------------------------------------------
# The README.


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def _readme_transcripts() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of every `$ launch/...` line in ```console blocks."""
    transcripts = []
    for block in _readme_blocks("console"):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, *output = chunk.rstrip("\n").split("\n")
            transcripts.append((command, output))
    return transcripts


def test_readme_transcripts_are_the_dry_run_output():
    transcripts = _readme_transcripts()
    documented = {shlex.split(c)[0].removeprefix("launch/") for c, _ in transcripts}
    assert documented == set(SCRIPTS)
    for command, expected in transcripts:
        words = shlex.split(command)
        assert "--dry-run" in words, command
        result = _run(words[0].removeprefix("launch/"), words[1:])
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == expected, command


def test_readme_recipe_commands_are_accepted():
    commands = [line for block in _readme_blocks("bash") for line in block.splitlines()
                if line.startswith("launch/")]
    assert len(commands) >= 12
    for command in commands:
        words = shlex.split(command)
        result = _run(words[0].removeprefix("launch/"), _with_dry_run(words[1:]))
        assert result.returncode == 0, f"{command}: {result.stderr}"
        assert result.stdout.startswith("gcloud compute tpus tpu-vm ")


# ----------------------------------------------------------------------------------------------
# Help and errors.


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    for flag in ("--help", "-h"):
        result = _run(script, [flag])
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"Usage: launch/{script} [OPTIONS]")
        for option in ("--name=NAME", "--zone=ZONE", "--dry-run", "--help"):
            assert option in result.stdout


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("create.sh", ["--zone=us-central2-b", "--accelerator=v4-8"],
         "missing required option --name"),
        ("create.sh", ["--name=a1", "--accelerator=v4-8"], "missing required option --zone"),
        ("create.sh", LOCATION, "missing required option --accelerator"),
        ("create.sh", [*LOCATION, "--accelerator=tpu8"], "--accelerator=tpu8 is not valid"),
        ("create.sh", [*LOCATION, "--accelerator=v3-8"],
         "--accelerator=v3-8 has no default runtime; pass --version"),
        ("create.sh", [*LOCATION, "--accelerator=v4-8", "--spot", "--preemptible"],
         "--spot and --preemptible are mutually exclusive"),
        ("create.sh", ["--name=Bad_Name", "--zone=us-central2-b", "--accelerator=v4-8"],
         "--name=Bad_Name is not valid"),
        ("create.sh", ["--name=a1", "--zone=uscentral", "--accelerator=v4-8"],
         "--zone=uscentral is not valid"),
        ("create.sh", [*LOCATION, "--accelerator=v4-8", "--project=X"], "--project=X is not valid"),
        ("create.sh", [*LOCATION, "--accelerator=v4-8", "--bogus"], "unknown option --bogus"),
        ("create.sh", [*LOCATION, "--accelerator=v4-8", "--spot=yes"],
         "option --spot takes no value"),
        ("create.sh", ["--name=a1", "--zone"], "option --zone needs a value"),
        ("create.sh", ["--name", "--zone=us-central2-b"], "option --name needs a value"),
        ("create.sh", ["--name="], "option --name needs a non-empty value"),
        ("create.sh", [*LOCATION, "a1"], "unexpected argument 'a1'"),
        ("create.sh", [*LOCATION, "--", "x"], "create.sh takes no arguments after '--'"),
        ("setup.sh", LOCATION, "missing required option --repo=URL or --tarball=FILE"),
        ("setup.sh", [*LOCATION, REPO_URL, "--tarball=a.tar.gz"],
         "--repo and --tarball are mutually exclusive"),
        ("setup.sh", [*LOCATION, "--repo=ftp://host/r.git"],
         "--repo=ftp://host/r.git is not valid"),
        ("setup.sh", [*LOCATION, REPO_URL, "--ref=-x"], "--ref=-x is not valid"),
        ("setup.sh", [*LOCATION, REPO_URL, "--python=3.10"], "--python=3.10 is not valid"),
        ("setup.sh", [*LOCATION, "--tarball=src.zip"], "--tarball=src.zip is not valid"),
        ("prepare.sh", [*LOCATION, "--data=gs://my-bucket/d"], "missing required option --config"),
        ("prepare.sh", [*LOCATION, "--config=configs/x.py"], "missing required option --data"),
        ("prepare.sh", [*LOCATION, "--config=configs/x.py", "--data=data/lm1b"],
         "--data=data/lm1b is not valid: expected a Cloud Storage URL gs://BUCKET/PATH"),
        ("prepare.sh", [*LOCATION, "--config=configs/x.py", "--data=gs://my-bucket/d",
                        "--mount-root=mnt/gcs"],
         "--mount-root=mnt/gcs is not valid: expected an absolute directory"),
        ("prepare.sh", [*LOCATION, "--config=configs/x.json", "--data=gs://my-bucket/d"],
         "--config=configs/x.json is not valid"),
        ("train.sh", [*LOCATION, "--config=configs/x.py"], "missing required option --workdir"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=runs/a"],
         "--workdir=runs/a is not valid"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=s3://x"],
         "--workdir=s3://x is not valid: expected a Cloud Storage URL gs://BUCKET/PATH (mounted "
         "with gcsfuse on the workers) or an absolute path on the workers"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=gs://my-bucket/../a"],
         "--workdir=gs://my-bucket/../a must not contain '.' or '..' path components"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=gs://my-bucket/a",
                      "--mount-root=/mnt/../gcs"], "--mount-root=/mnt/../gcs is not valid"),
        ("train.sh", [*LOCATION, "--config=configs/../x.py", "--workdir=gs://my-bucket/a"],
         "--config=configs/../x.py must not contain '..'"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=gs://my-bucket/a",
                      "--env=NOVALUE"], "--env=NOVALUE is not valid: expected KEY=VALUE"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=gs://my-bucket/a",
                      "--data=s3://b/d"], "--data=s3://b/d is not valid"),
        ("resume.sh", [*LOCATION, REPO_URL, "--config=configs/x.py", "--workdir=gs://my-bucket/a"],
         "missing required option --accelerator"),
        ("resume.sh", [*LOCATION, "--accelerator=v4-8", "--config=configs/x.py",
                       "--workdir=gs://my-bucket/a"], "missing required option --repo=URL"),
        ("resume.sh", [*LOCATION, "--accelerator=v4-8", REPO_URL, "--config=configs/x.py",
                       "--workdir=s3://x"], "--workdir=s3://x is not valid"),
        ("train.sh", [*LOCATION, "--config=configs/x.py", "--workdir=gs://my-bucket/a", "--",
                      "--config.seed=1", "--dry-run"],
         "--dry-run must come before '--' (what follows '--' goes to hybriddiff)"),
        ("delete.sh", ["--name=a1"], "missing required option --zone"),
        ("delete.sh", [*LOCATION, "--spot"], "unknown option --spot for delete.sh"),
    ],
)
def test_bad_arguments_fail_naming_the_option(script, args, message):
    for dry_run in (False, True):
        result = _run(script, _with_dry_run(args) if dry_run else args)
        assert result.returncode == 2
        assert result.stdout == ""
        assert f"error: {message}" in result.stderr


def test_missing_tarball_fails_only_when_running(tmp_path, fake_gcloud):
    env, log = fake_gcloud
    args = [*LOCATION, "--tarball=missing.tar.gz"]
    assert _run("setup.sh", [*args, "--dry-run"], cwd=tmp_path).returncode == 0
    result = _run("setup.sh", args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "error: --tarball=missing.tar.gz: no such file" in result.stderr
    assert _logged(log) == []


def test_dry_run_works_without_gcloud_and_running_needs_it(tmp_path):
    bin_dir = tmp_path / "bin"  # only the two tools the scripts use besides bash builtins
    bin_dir.mkdir()
    for tool in ("dirname", "basename"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = dict(os.environ, PATH=str(bin_dir))
    for script, args in ARGS.items():
        result = _run(script, _with_dry_run(args), env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("gcloud compute tpus tpu-vm ")
    for script in ("create.sh", "resume.sh"):
        result = _run(script, ARGS[script], env=env)
        assert result.returncode == 2
        assert "error: gcloud not found on PATH" in result.stderr


# ----------------------------------------------------------------------------------------------
# What runs is what the dry run prints.


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "prepare.sh", "train.sh", "delete.sh"])
def test_running_executes_exactly_the_printed_commands(script, fake_gcloud):
    env, log = fake_gcloud
    printed = _gcloud_lines(_dry(script, ARGS[script]))
    result = _run(script, ARGS[script], env=env)
    assert result.returncode == 0, result.stderr
    assert _logged(log) == printed
    assert [line.removeprefix("+ ") for line in result.stderr.splitlines()] == \
        _dry(script, ARGS[script])


def test_tarball_setup_copies_then_installs(tmp_path, fake_gcloud):
    env, log = fake_gcloud
    (tmp_path / "src.tar.gz").write_bytes(b"")
    args = [*LOCATION, "--tarball=src.tar.gz", "--project=my-project"]
    result = _run("setup.sh", args, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scp, ssh = _logged(log)
    assert scp == ["compute", "tpus", "tpu-vm", "scp", "src.tar.gz",
                   "hd-test:hybriddiff-src.tar.gz", "--zone=us-central2-b",
                   "--project=my-project", "--worker=all"]
    assert ssh[:8] == ["compute", "tpus", "tpu-vm", "ssh", "hd-test", "--zone=us-central2-b",
                       "--project=my-project", "--worker=all"]
    assert 'tar -xzf "$HOME/hybriddiff-src.tar.gz"' in _remote_command(ssh)


# ----------------------------------------------------------------------------------------------
# Resume.


def test_resume_dry_run_is_describe_then_the_other_scripts():
    lines = _dry("resume.sh", ARGS["resume.sh"])
    comments = [line for line in lines if line.startswith("#")]
    assert comments == [
        "# if the state is PREEMPTED, TERMINATED, STOPPED or SUSPENDED:",
        "# if the TPU VM was deleted or does not exist:",
        "# in every case:",
    ]
    describe = ["compute", "tpus", "tpu-vm", "describe", "hd-test", "--zone=us-central2-b",
                "--format=value(state)"]
    train_args = [a for a in ARGS["resume.sh"] if a not in ("--accelerator=v4-32", "--spot",
                                                             REPO_URL, "--ref=v1.0")]
    expected = ([describe] + _gcloud_lines(_dry("delete.sh", LOCATION))
                + _gcloud_lines(_dry("create.sh", ARGS["create.sh"]))
                + _gcloud_lines(_dry("setup.sh", ARGS["setup.sh"]))
                + _gcloud_lines(_dry("train.sh", train_args)))
    assert _gcloud_lines(lines) == expected


@pytest.mark.parametrize(
    ("state", "steps"),
    [
        ("READY", ["describe", "train"]),
        ("PREEMPTED", ["describe", "delete", "create", "setup", "train"]),
        ("TERMINATED", ["describe", "delete", "create", "setup", "train"]),
        ("MISSING", ["describe", "create", "setup", "train"]),
    ],
)
def test_resume_branches(state, steps, fake_gcloud):
    env, log = fake_gcloud
    env["FAKE_TPU_STATE"] = state
    result = _run("resume.sh", ARGS["resume.sh"], env=env)
    assert result.returncode == 0, result.stderr
    logged = _logged(log)
    named = []
    for words in logged:
        verb = words[3]
        if verb == "ssh":
            verb = "setup" if "uv venv" in _remote_command(words) else "train"
        named.append(verb)
    assert named == steps
    printed = _gcloud_lines(_dry("resume.sh", ARGS["resume.sh"]))
    for verb, words in zip(named, logged):  # every command run is one the dry run printed
        assert words in printed, verb


@pytest.mark.parametrize(("state", "message"), [
    ("CREATING", "TPU VM hd-test is CREATING; rerun when it is READY or PREEMPTED"),
    ("DENIED", "could not describe TPU VM hd-test: ERROR: (gcloud.compute.tpus.tpu-vm.describe) "
               "PERMISSION_DENIED"),
])
def test_resume_stops_on_other_states(state, message, fake_gcloud):
    env, log = fake_gcloud
    env["FAKE_TPU_STATE"] = state
    result = _run("resume.sh", ARGS["resume.sh"], env=env)
    assert result.returncode == 2
    assert f"error: {message}" in result.stderr
    assert [w[3] for w in _logged(log)] == ["describe"]


# ----------------------------------------------------------------------------------------------
# Buckets: mounted with gcsfuse on the workers; the trainer gets the mounted paths.


def _with_options(args: list[str], *options: str) -> list[str]:
    """``args`` with ``options`` added before any '--'."""
    split = args.index("--") if "--" in args else len(args)
    return [*args[:split], *options, *args[split:]]


def _mounts(command: str) -> list[tuple[str, str, str]]:
    """(flags, bucket, mount point) of every gcsfuse call of a remote command, in order."""
    return re.findall(r"gcsfuse ((?:--\S+ ?)*) (\S+) (\S+);", command)


def _trainer_words(command: str) -> list[str]:
    """The words of the `hybriddiff train` call of a remote train command."""
    start = command.index("setsid nohup ") + len("setsid nohup ")
    return shlex.split(command[start:command.index(" > ", start)])[1:]


@pytest.mark.parametrize(
    ("storage", "mounts", "workdir", "prepared_dir"),
    [
        (["--workdir=gs://my-bucket/runs/a", "--data=gs://my-bucket/data/lm1b"],
         [("my-bucket", "/mnt/gcs/my-bucket")], "/mnt/gcs/my-bucket/runs/a",
         "/mnt/gcs/my-bucket/data/lm1b"),
        (["--workdir=gs://runs-bucket/r/", "--data=gs://data.bucket/d", "--mount-root=/gcs"],
         [("runs-bucket", "/gcs/runs-bucket"), ("data.bucket", "/gcs/data.bucket")],
         "/gcs/runs-bucket/r", "/gcs/data.bucket/d"),
        (["--workdir=gs://my-bucket"], [("my-bucket", "/mnt/gcs/my-bucket")], "/mnt/gcs/my-bucket",
         None),
        (["--workdir=/mnt/nfs/runs/a", "--data=gs://my-bucket/d"],
         [("my-bucket", "/mnt/gcs/my-bucket")], "/mnt/nfs/runs/a", "/mnt/gcs/my-bucket/d"),
        (["--workdir=/mnt/nfs/runs/a", "--data=/mnt/nfs/data/lm1b"], [], "/mnt/nfs/runs/a",
         "/mnt/nfs/data/lm1b"),
    ],
)
def test_train_mounts_each_bucket_once_and_passes_mounted_paths(storage, mounts, workdir,
                                                                prepared_dir):
    (ssh,) = _gcloud_lines(_dry("train.sh", [*LOCATION, "--config=configs/lm1b_bd3.py", *storage]))
    assert "--worker=all" in ssh  # every host mounts the buckets and trains
    command = _remote_command(ssh)
    found = _mounts(command)
    assert [(bucket, point) for _, bucket, point in found] == mounts
    for flags, _, point in found:
        assert "--implicit-dirs" in flags.split()
        assert f"if ! mountpoint -q {point}; then" in command  # skipped when already mounted
        assert command.index(point) < command.index("setsid nohup")
    expected = ["train", "--config=configs/lm1b_bd3.py", f"--workdir={workdir}"]
    if prepared_dir:
        expected.append(f"--config.data.prepared_dir={prepared_dir}")
    assert _trainer_words(command) == expected
    assert "gs://" not in command


def test_prepare_mounts_the_data_bucket_on_worker_0_and_writes_through_it():
    (ssh,) = _gcloud_lines(_dry("prepare.sh", _with_options(ARGS["prepare.sh"],
                                                            "--mount-root=/data/gcs")))
    assert "--worker=0" in ssh
    command = _remote_command(ssh)
    assert [(b, m) for _, b, m in _mounts(command)] == [("my-bucket", "/data/gcs/my-bucket")]
    assert "--output=/data/gcs/my-bucket/data/lm1b" in shlex.split(command)
    assert "gs://" not in command


def test_setup_installs_gcsfuse_from_googles_apt_repository():
    (ssh,) = _gcloud_lines(_dry("setup.sh", ARGS["setup.sh"]))
    command = _remote_command(ssh)
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" in command
    assert re.search(r"apt-get [^;]*install -y [^;]*gcsfuse;", command)
    assert command.index("gcsfuse") < command.index("pip install")


# ----------------------------------------------------------------------------------------------
# The remote commands, run on this machine with stand-ins for the TPU VM's tools. Every stand-in
# appends what it was asked to do to $FAKE_CALLS; sudo runs its command as this user, except tee
# (which records its input) and apt-get (recorded only), so nothing outside tmp_path is written.

FAKE_CURL = """#!/usr/bin/env bash
url=${!#}
case $url in
  */agent-worker-number) [[ -n ${FAKE_WORKER_ID:-} ]] || exit 22; echo "$FAKE_WORKER_ID" ;;
  */worker-network-endpoints) [[ -n ${FAKE_ENDPOINTS:-} ]] || exit 22; echo "$FAKE_ENDPOINTS" ;;
  https://packages.cloud.google.com/apt/doc/apt-key.gpg) echo "FAKE KEY" ;;
  *) exit 22 ;;
esac
"""
FAKE_SUDO = """#!/usr/bin/env bash
echo "sudo $*" >> "$FAKE_CALLS"
case $1 in
  tee) sed 's/^/  > /' >> "$FAKE_CALLS" ;;
  apt-get) ;;
  *) exec "$@" ;;
esac
"""
FAKE_LSB_RELEASE = """#!/usr/bin/env bash
[[ $1 == -cs ]] && echo jammy
"""
# gcsfuse "mounts" by leaving a marker that mountpoint finds; it fails without the mount point.
FAKE_GCSFUSE = """#!/usr/bin/env bash
echo "gcsfuse $*" >> "$FAKE_CALLS"
touch "${!#}/.fake-mount"
"""
FAKE_MOUNTPOINT = """#!/usr/bin/env bash
[[ $1 == -q && -e $2/.fake-mount ]]
"""
FAKE_TRAINER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_TRAINER_OUT"], "w") as out:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(),
               "env": {k: os.environ.get(k) for k in
                       ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "XLA_FLAGS")}}, out)
print("training")
"""


def _remote_home(tmp_path: Path, fake_gcloud) -> tuple[dict, Path]:
    env, _ = fake_gcloud
    home = tmp_path / "home"
    (home / "hybriddiff").mkdir(parents=True)
    venv_bin = home / "hybriddiff-venv" / "bin"
    venv_bin.mkdir(parents=True)
    _write_executable(venv_bin / "hybriddiff", FAKE_TRAINER)
    bin_dir = Path(env["PATH"].split(":")[0])
    for name, text in (("curl", FAKE_CURL), ("sudo", FAKE_SUDO), ("lsb_release", FAKE_LSB_RELEASE),
                       ("gcsfuse", FAKE_GCSFUSE), ("mountpoint", FAKE_MOUNTPOINT)):
        _write_executable(bin_dir / name, text)
    env = dict(env, HOME=str(home), FAKE_TRAINER_OUT=str(tmp_path / "trainer.json"),
               FAKE_CALLS=str(tmp_path / "calls.txt"))
    return env, home


def _calls(env: dict) -> list[str]:
    path = Path(env["FAKE_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def _run_remote(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, "-c", command], capture_output=True, text=True, env=env,
                          timeout=60)


def _wait_for(path: Path) -> dict:
    for _ in range(200):
        if path.exists() and path.stat().st_size:
            return json.loads(path.read_text())
        time.sleep(0.025)
    raise AssertionError(f"{path} was not written")


@pytest.mark.parametrize(
    ("worker_id", "endpoints", "hostnames"),
    [
        ("1", "w-0:0:10.0.0.1,w-1:1:10.0.0.2", "10.0.0.1,10.0.0.2"),  # name:id:ip triples
        ("0", "host-a,host-b", "host-a,host-b"),  # plain host names
        ("", "", None),  # no TPU metadata: one process, worker 0
    ],
)
def test_remote_train_command_mounts_then_starts_the_trainer(tmp_path, fake_gcloud, worker_id,
                                                            endpoints, hostnames):
    env, home = _remote_home(tmp_path, fake_gcloud)
    env.update(FAKE_WORKER_ID=worker_id, FAKE_ENDPOINTS=endpoints)
    env.pop("TPU_WORKER_ID", None)
    env.pop("TPU_WORKER_HOSTNAMES", None)
    root = tmp_path / "mnt"
    (ssh,) = _gcloud_lines(_dry("train.sh", _with_options(ARGS["train.sh"],
                                                          f"--mount-root={root}")))
    command = _remote_command(ssh)
    result = _run_remote(command, env)
    assert result.returncode == 0, result.stderr
    worker = worker_id or "0"
    log = home / "hybriddiff-logs" / f"train-worker{worker}.log"
    assert f"worker {worker} (" in result.stdout and str(log) in result.stdout
    mount = root / "my-bucket"
    uid, gid = os.getuid(), os.getgid()
    assert _calls(env) == [f"sudo mkdir -p {mount}", f"sudo chown {uid}:{gid} {mount}",
                           f"gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket {mount}"]
    assert (mount.stat().st_uid, mount.stat().st_gid) == (uid, gid)
    seen = _wait_for(tmp_path / "trainer.json")
    assert seen["argv"] == ["train", "--config=configs/lm1b_bd3.py",
                            f"--workdir={mount}/runs/a",
                            f"--config.data.prepared_dir={mount}/data/lm1b",
                            "--config.train.batch_size=64", "--config.note=it's"]
    assert seen["cwd"] == str(home / "hybriddiff")
    assert seen["env"] == {"TPU_WORKER_ID": worker_id if hostnames else None,
                           "TPU_WORKER_HOSTNAMES": hostnames, "XLA_FLAGS": "--a --b"}
    assert _logged(Path(env["FAKE_GCLOUD_LOG"])) == []  # no copies: all goes through the mount
    pid_file = home / "hybriddiff-logs" / "train.pid"
    assert pid_file.read_text().strip().isdigit()
    for _ in range(200):
        if "training" in log.read_text():
            break
        time.sleep(0.025)
    assert log.read_text() == "training\n"

    # A second start while the recorded process is alive is refused.
    pid_file.write_text(f"{os.getpid()}\n")
    again = _run_remote(command, env)
    assert again.returncode == 1
    assert f"worker {worker}: training already runs (pid {os.getpid()})" in again.stderr

    # A restart after the run ended trains again without mounting the bucket a second time.
    pid_file.unlink()
    (tmp_path / "trainer.json").unlink()
    restart = _run_remote(command, env)
    assert restart.returncode == 0, restart.stderr
    assert _wait_for(tmp_path / "trainer.json")["argv"] == seen["argv"]
    assert [c for c in _calls(env) if c.startswith("gcsfuse")] == [
        f"gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket {mount}"]


def test_remote_prepare_command_mounts_then_prepares_into_the_bucket(tmp_path, fake_gcloud):
    env, home = _remote_home(tmp_path, fake_gcloud)
    root = tmp_path / "mnt"
    (ssh,) = _gcloud_lines(_dry("prepare.sh", _with_options(ARGS["prepare.sh"],
                                                            f"--mount-root={root}")))
    result = _run_remote(_remote_command(ssh), env)
    assert result.returncode == 0, result.stderr
    mount = root / "my-bucket"
    assert _calls(env)[-1] == f"gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket {mount}"
    seen = _wait_for(tmp_path / "trainer.json")
    assert seen["argv"] == ["prepare", "--config=configs/lm1b_bd3.py",
                            f"--output={mount}/data/lm1b", "--config.data.path=/mnt/raw data"]
    assert seen["cwd"] == str(home / "hybriddiff")
    assert _logged(Path(env["FAKE_GCLOUD_LOG"])) == []


def test_remote_setup_command_installs_gcsfuse_once_then_from_the_tarball(tmp_path, fake_gcloud):
    env, home = _remote_home(tmp_path, fake_gcloud)
    bin_dir = Path(env["PATH"].split(":")[0])
    (bin_dir / "gcsfuse").unlink()
    if shutil.which("gcsfuse", path=env["PATH"]):
        pytest.skip("gcsfuse is installed on this machine: the install step would be skipped")
    with tarfile.open(home / "hybriddiff-src.tar.gz", "w:gz") as archive:
        source = tmp_path / "setup.cfg"
        source.write_text("[metadata]\nname = hybriddiff\n")
        archive.add(source, arcname="setup.cfg")
    (home / "hybriddiff" / "stale.txt").write_text("old checkout")
    # uv makes a venv whose python records its arguments.
    _write_executable(bin_dir / "uv", """#!/usr/bin/env bash
echo "uv $*" >> "$FAKE_CALLS"
mkdir -p "${!#}/bin"
printf '#!/usr/bin/env bash\\necho "python $*" >> "$FAKE_CALLS"\\n' > "${!#}/bin/python"
chmod +x "${!#}/bin/python"
""")
    setup = [*LOCATION, "--tarball=src.tar.gz", "--python=3.11"]
    (ssh,) = _gcloud_lines(_dry("setup.sh", setup))[1:]
    result = _run_remote(_remote_command(ssh), env)
    assert result.returncode == 0, result.stderr
    venv = home / "hybriddiff-venv"
    install = [
        f"uv venv --allow-existing --seed --python 3.11 {venv}",
        "python -m pip install -U jax[tpu]",
        f"python -m pip install -e {home / 'hybriddiff'}",
    ]
    calls = _calls(env)
    assert calls[-3:] == install
    apt = calls[:-3]
    assert apt[:4] == ["sudo tee /usr/share/keyrings/cloud.google.asc", "  > FAKE KEY",
                       "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
                       "  > deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
                       "https://packages.cloud.google.com/apt gcsfuse-jammy main"]
    assert [c.split()[:2] + c.split()[-1:] for c in apt[4:]] == [
        ["sudo", "apt-get", "-q"], ["sudo", "apt-get", "gcsfuse"]]
    assert "update" in apt[4].split() and "install" in apt[5].split()
    assert sorted(p.name for p in (home / "hybriddiff").iterdir()) == ["setup.cfg"]

    # With gcsfuse installed, a rerun only updates hybriddiff.
    _write_executable(bin_dir / "gcsfuse", FAKE_GCSFUSE)
    Path(env["FAKE_CALLS"]).unlink()
    rerun = _run_remote(_remote_command(ssh), env)
    assert rerun.returncode == 0, rerun.stderr
    assert _calls(env) == install
