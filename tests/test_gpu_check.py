"""`tests/gpu/check.sh --dry-run`: the GPU check's script and wheel set, proven on CPU.

The wheels are fetched for this machine's Python (the real run carries CPython 3.12 ones) and
installed the way the GPU machine installs them, with this environment's own copies of what the
GPU image lacks hidden, so a wheel missing from `fetch-wheels.sh` fails here as it would there.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench_kernels import LLAMA3_8B, TINY

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "tests" / "gpu"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("whl")
    version = ".".join(platform.python_version_tuple()[:2])
    subprocess.run([GPU / "fetch-wheels.sh", "--dest", dest, "--python-version", version],
                   check=True, timeout=180, env=os.environ | {"PYTHON": sys.executable})
    return dest


def dry_run(out: Path, wheels: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable}
    env.pop("OUT", None)
    return subprocess.run([GPU / "check.sh", "--dry-run", "--out", out, "--wheels", wheels, *args],
                          env=env, capture_output=True, text=True, timeout=480)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_passes_every_stage_and_reports_every_target_figure(tmp_path, wheels):
    done = dry_run(tmp_path, wheels)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    stages = {s["stage"]: s["status"] for s in jsonl(tmp_path / "stages.jsonl")}
    assert stages == {"wheels": "ok", "tests": "ok", "kernels": "ok", "throughput": "ok"}
    # A real run's kernel rows carry the same ids, so the same keys.
    rows = {r["row"] for r in jsonl(tmp_path / "kernels.jsonl")}
    assert rows >= {"ceilings"} | {a[0] for a in LLAMA3_8B.attention}
    assert [a[0] for a in TINY.attention] == [a[0] for a in LLAMA3_8B.attention]
    summary = jsonl(tmp_path / "summary.jsonl")
    assert len(summary) == 13  # every target of tests/gpu/summary.py
    for row in summary:
        if row["key"] == "graph_capture_s":  # no CUDA graphs on CPU; the key is still there
            assert row["value"] is None
        else:
            assert isinstance(row["value"], float) and row["value"] > 0, row
    assert "DRY RUN" in done.stdout and re.search(r"tests: [1-9]\d* passed, 0 failed", done.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["check.log", "env.jsonl", "stages.jsonl", "tests.xml", "kernels.jsonl",
         "throughput.jsonl", "summary.jsonl"])


def test_a_wheel_missing_from_the_set_fails_the_dry_run(tmp_path, wheels):
    partial = tmp_path / "whl"
    shutil.copytree(wheels, partial)
    for wheel in partial.glob("starlette-*.whl"):
        wheel.unlink()
    done = dry_run(tmp_path / "out", partial, "--only", "kernels")
    assert done.returncode != 0
    assert "No module named 'starlette'" in done.stdout
    assert jsonl(tmp_path / "out" / "stages.jsonl")[0]["status"] == "failed"


def test_only_runs_the_named_stage(tmp_path, wheels):
    done = dry_run(tmp_path, wheels, "--only", "kernels")
    assert done.returncode == 0, done.stdout[-4000:]
    assert [s["stage"] for s in jsonl(tmp_path / "stages.jsonl")] == ["wheels", "kernels"]
    assert not (tmp_path / "throughput.jsonl").exists()
