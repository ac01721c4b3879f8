"""The wheel carries the shipped tuning tables, and an installed wheel finds and loads them."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUNED = "sparse_triton/tuning/tuned"
KEY = "dtype=fp16|nm=2:4|N=64|K=64|M=16|bias=0"
TABLE = {
    "format": 1,
    "meta": {"gpu": "Test GPU", "capability": [9, 0], "triton": "3.6.0", "torch": "2.13.0", "sparse_triton": "0.1.0"},
    "entries": {"nm_linear_fwd": {KEY: {"name": "dense", "impl": "dense", "ms": 1.0}}},
}

# Runs from the extracted wheel alone: the checkout is neither on PYTHONPATH nor the working directory.
PROBE = f"""
import json, sys
from pathlib import Path
import sparse_triton
from sparse_triton import tuning
root = Path(sys.argv[1]).resolve()
assert root in Path(sparse_triton.__file__).resolve().parents, sparse_triton.__file__
table = tuning.load_shipped("test-gpu")
print(json.dumps({{"slugs": tuning.shipped_slugs(), "keys": len(table), "path": str(table.path),
                  "entry": table.get("nm_linear_fwd", {KEY!r})}}))
"""


def _run(cmd, **kwargs) -> str:
    """stdout of ``cmd``; on failure the assertion shows its stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd[1:4]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_ships_and_loads_tuning_tables(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "sparse_triton", src / "sparse_triton", ignore=shutil.ignore_patterns("__pycache__"))
    (src / TUNED / "test-gpu.json").write_text(json.dumps(TABLE))

    dist = tmp_path / "dist"
    # Absolute paths: pip reads a bare relative name as a project to fetch from an index.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(dist), str(src)], timeout=300)
    (wheel,) = dist.glob("sparse_triton-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        site = tmp_path / "site"
        zf.extractall(site)
    assert f"{TUNED}/test-gpu.json" in names
    shipped = sorted(p.name for p in (REPO / TUNED).glob("*.json"))
    assert not [n for n in shipped if f"{TUNED}/{n}" not in names], f"tables missing from the wheel: {shipped}"

    env = {**os.environ, "PYTHONPATH": str(site)}
    out = _run([sys.executable, "-c", PROBE, str(site)], cwd=tmp_path, env=env, timeout=120)
    got = json.loads(out.strip().splitlines()[-1])
    assert "test-gpu" in got["slugs"]
    assert sorted(got["slugs"]) == sorted(["test-gpu", *(Path(n).stem for n in shipped)])
    assert got["keys"] == 1
    assert Path(got["path"]).resolve() == (site / TUNED / "test-gpu.json").resolve()
    assert got["entry"] == {"name": "dense", "impl": "dense", "ms": 1.0}
