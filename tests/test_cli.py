"""``python -m sparse_triton {info, tune}``: what it prints and how it fails.

Whole-process behaviour (exit codes, messages without a traceback, imports through PYTHONPATH) runs the
CLI in a fresh interpreter; each start imports torch (~2.5 s), so those tests are ``slow`` and the key
listings that need no process of their own call ``main`` in-process.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import sparse_triton
from sparse_triton import __main__ as cli
from sparse_triton.tuning import load_shipped, presets, shipped_dir, shipped_slugs

REPO = Path(__file__).resolve().parents[1]
LLAMA3_8B = {"4096x4096", "1024x4096", "14336x4096", "4096x14336"}
LLM_BUCKETS = {1, 4, 16, 64, 256, 1024, 4096, 16384}
LINE = re.compile(r"^(nm_linear_fwd|nm_linear_bwd_dx) +(\w+) +(\d+:\d+) +(\d+x\d+) M=(\d+)( \+bias)?$")

MODEL_MODULE = """
import torch
import sparse_triton


def build():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    return sparse_triton.sparsify(model, sparse_triton.NMSparsity(2, 4))


def dense():
    return torch.nn.Sequential(torch.nn.Linear(64, 32))


def broken():
    raise RuntimeError("no weights here\\nsecond line")


def number():
    return 42
"""


def _cli(tmp_path, *args, env=None):
    """Run ``python -m sparse_triton *args`` from the repo root with the user cache under ``tmp_path``."""
    full = dict(os.environ)  # TRITON_INTERPRET and the rest as in this process
    full["SPARSE_TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), str(REPO), full.get("PYTHONPATH")) if p)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "sparse_triton", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=120)


def _keys(stdout: str) -> list[tuple]:
    """(op, dtype, pattern, NxK, M, bias) of each key line; asserts the closing count line matches."""
    lines = stdout.strip().splitlines()
    assert lines and lines[-1] == f"{len(lines) - 1} keys", lines[-1:]
    keys = []
    for line in lines[:-1]:
        m = LINE.match(line)
        assert m, f"not a key line: {line!r}"
        op, tag, nm, shape, M, bias = m.groups()
        keys.append((op, tag, nm, shape, int(M), bias is not None))
    assert len(set(keys)) == len(keys), "a key is listed twice"
    return keys


def _dry_run(capsys, *args) -> list[tuple]:
    assert cli.main(["tune", *args, "--dry-run"]) == 0
    return _keys(capsys.readouterr().out)


@pytest.fixture
def model_module(tmp_path):
    (tmp_path / "cli_test_model.py").write_text(MODEL_MODULE)
    (tmp_path / "cli_test_model_import_fails.py").write_text("raise ValueError('bad config')\n")
    return "cli_test_model"


# ---------------------------------------------------------------------------------------------------- subprocess


@pytest.mark.slow
def test_info(tmp_path):
    r = _cli(tmp_path, "info")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"sparse_triton {sparse_triton.__version__}  torch {torch.__version__}  triton {triton.__version__}" in out
    assert re.search(r"^device: +\S", out, re.M)
    interp = "on" if os.environ.get("TRITON_INTERPRET") == "1" else "off"
    assert re.search(rf"^interpreter: +{interp}\b", out, re.M)
    assert re.search(rf"^user cache: +{re.escape(str(tmp_path / 'cache'))}/", out, re.M)
    tables = ", ".join(f"{s} ({len(load_shipped(s))} keys)" for s in shipped_slugs()) or "none"
    assert f"shipped tables:  {tables}  [{shipped_dir()}]" in out.splitlines()
    assert not (tmp_path / "cache").exists(), "info wrote into the user cache"


@pytest.mark.slow
def test_tune_help(tmp_path):
    r = _cli(tmp_path, "tune", "--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--preset", "--model", "--dtype", "--shapes", "--tokens", "--training", "--dry-run"):
        assert flag in r.stdout
    assert "llama3-8b" in r.stdout


@pytest.mark.slow
def test_tune_dry_run_preset(tmp_path):
    r = _cli(tmp_path, "tune", "--preset", "llama3-8b", "--dry-run")
    assert r.returncode == 0, r.stderr
    keys = _keys(r.stdout)
    assert len(keys) == 4 * 8
    assert {(shape, M) for *_, shape, M, _ in keys} == {(s, M) for s in LLAMA3_8B for M in LLM_BUCKETS}
    assert {k[:3] for k in keys} == {("nm_linear_fwd", "fp16", "2:4")}
    assert "nm_linear_fwd     fp16 2:4   14336x4096 M=256" in r.stdout.splitlines()


@pytest.mark.slow
def test_tune_dry_run_model(tmp_path, model_module):
    r = _cli(tmp_path, "tune", "--model", f"{model_module}:build", "--dry-run", "--tokens", "1")
    assert r.returncode == 0, r.stderr
    keys = _keys(r.stdout)
    # both layers with their bias, in the model's own dtype (fp32 weights: tf32 or fp32 per the TF32 setting)
    assert sorted((shape, M, bias) for *_, shape, M, bias in keys) == [("16x32", 1, True), ("32x64", 1, True)]
    assert {k[:3] for k in keys} in ({("nm_linear_fwd", "fp32", "2:4")}, {("nm_linear_fwd", "tf32", "2:4")})


MODEL_ERRORS = [  # (spec, message): one line on stderr naming the spec and the reason, exit status 2
    pytest.param("cli_test_model:dense", "sparsify", id="model-without-sparselinear"),
    pytest.param("nosuchmod:x", "cannot import 'nosuchmod'", id="model-not-importable"),
    pytest.param("cli_test_model_import_fails:x", "cannot import 'cli_test_model_import_fails' (ValueError: bad "
                 "config)", id="module-raises-on-import"),
    pytest.param("cli_test_model:nosuch", "has no attribute 'nosuch'", id="missing-attribute"),
    pytest.param("cli_test_model:broken", "calling broken() raised RuntimeError: no weights here",
                 id="builder-raises"),
    pytest.param("cli_test_model:number", "number gave type int, expected an nn.Module", id="not-a-module"),
    pytest.param("cli_test_model", "expected MODULE:ATTR", id="no-colon"),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", [p for p in MODEL_ERRORS if p.id in (
    "model-without-sparselinear", "model-not-importable", "builder-raises")])  # the rest run in-process only
def test_tune_model_errors(tmp_path, model_module, spec, message):
    r = _cli(tmp_path, "tune", "--model", spec, "--dry-run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m sparse_triton tune: error: --model {spec}: "), lines
    assert message in lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("spec, message", MODEL_ERRORS)
def test_tune_model_errors_in_process(capsys, model_module, monkeypatch, tmp_path, spec, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["tune", "--model", spec, "--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m sparse_triton tune: error: --model {spec}: "), lines
    assert message in lines[0]
    assert captured.out == ""


@pytest.mark.slow
def test_tune_without_gpu(tmp_path):
    # CUDA hidden, so this holds on a GPU machine too (and never starts a real tuning run there).
    r = _cli(tmp_path, "tune", "--preset", "llama3-8b", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "needs a CUDA GPU" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------- in-process


def test_dry_run_in_process(capsys):
    keys = _dry_run(capsys, "--preset", "llama3-8b")
    assert len(keys) == 32
    assert {(shape, M) for *_, shape, M, _ in keys} == {(s, M) for s in LLAMA3_8B for M in LLM_BUCKETS}
    assert not any(bias for *_, bias in keys)


def test_dry_run_training_adds_input_gradient(capsys):
    keys = _dry_run(capsys, "--preset", "llama3-8b", "--training")
    assert len(keys) == 64
    fwd = {k[1:] for k in keys if k[0] == "nm_linear_fwd"}
    dx = {k[1:] for k in keys if k[0] == "nm_linear_bwd_dx"}
    assert len(fwd) == len(dx) == 32
    assert fwd == dx  # the same shapes and buckets (no bias in either: the llama linears have none)


def test_dry_run_vit_has_bias_and_one_bucket(capsys):
    keys = _dry_run(capsys, "--preset", "vit-l")
    assert sorted(k[3] for k in keys) == sorted(s.dims for s in presets.VIT_L_MLP)
    assert all(bias for *_, bias in keys)
    assert {k[4] for k in keys} == {16384}


def test_dry_run_tokens_are_bucketed(capsys):
    keys = _dry_run(capsys, "--shapes", "4096x4096", "--tokens", "1", "3", "5")
    assert [(k[3], k[4]) for k in keys] == [("4096x4096", 1), ("4096x4096", 4), ("4096x4096", 8)]


def test_dry_run_patterns_and_dtypes_multiply(capsys):
    keys = _dry_run(capsys, "--shapes", "256x128", "--pattern", "2:4", "1:4", "--dtype", "fp16", "bf16",
                    "--tokens", "16")
    assert sorted((k[1], k[2]) for k in keys) == [("bf16", "1:4"), ("bf16", "2:4"), ("fp16", "1:4"), ("fp16", "2:4")]


@pytest.mark.parametrize("args, message", [
    pytest.param(["--shapes", "12"], "expected OUTxIN", id="shape-not-NxK"),
    pytest.param(["--shapes", "0x64"], "must be positive", id="shape-zero"),
    pytest.param(["--shapes", "64x64", "--pattern", "3:5"], "pattern '3:5'", id="pattern-m-not-power-of-two"),
    pytest.param(["--shapes", "64x64", "--pattern", "4:4"], "pattern '4:4'", id="pattern-n-not-below-m"),
    pytest.param(["--shapes", "64x64", "--tokens", "0"], "expected a positive integer", id="tokens-zero"),
    pytest.param(["--preset", "llama3-7b"], "invalid choice", id="unknown-preset"),
])
def test_bad_arguments_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", *args, "--dry-run"])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_tune_needs_a_source(capsys):
    assert cli.main(["tune", "--dry-run"]) == 2
    assert "give --preset, --model or --shapes" in capsys.readouterr().err
