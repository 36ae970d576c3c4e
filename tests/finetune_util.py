"""Helpers for tests that replay llama.cpp's fixture commands (tests/fixtures/llamacpp/runs)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from lorakit.cli import main

FIX = Path(__file__).parent / "fixtures" / "llamacpp"


def make_tree(root: Path) -> Path:
    """models/ and data/ laid out as the fixtures were run, so relative paths (and the samples
    hash, which includes the training-data path as typed) are the same as llama.cpp's."""
    for sub in ("models", "data"):
        shutil.copytree(FIX / sub, root / sub)
    (root / "runs").mkdir()
    return root


def fixture_args(run: str) -> list[str]:
    return shlex.split((FIX / "runs" / run / "cmd.txt").read_text())[1:]


def replay(root: Path, run: str, monkeypatch, extra: list[str] | None = None, args: list[str] | None = None):
    """Run `lorakit finetune` with a fixture's command line from runs/<run>; returns (rc, losses)."""
    rundir = root / "runs" / run
    rundir.mkdir(exist_ok=True)
    monkeypatch.chdir(rundir)
    argv = ["finetune", *(args if args is not None else fixture_args(run)), "--backend", "cpu-torch"]
    argv += ["--log-jsonl", "log.jsonl", *(extra or [])]
    rc = main(argv)
    losses = []
    if (rundir / "log.jsonl").exists():
        losses = [json.loads(line) for line in (rundir / "log.jsonl").read_text().splitlines()]
    return rc, losses


def fixture_losses(run: str) -> list[dict]:
    return json.loads((FIX / "runs" / run / "losses.json").read_text())


def copy_fixture_run(root: Path, run: str) -> None:
    """Put llama.cpp's own output files of a run where a later command expects them."""
    shutil.copytree(FIX / "runs" / run, root / "runs" / run, dirs_exist_ok=True)
