"""ops/nm_linear.py: st.nm_linear against F.linear in fp64, its gradients, opcheck and torch.compile."""


import pytest
import torch
import torch.nn.functional as F
from kit import assert_close

import sparse_triton as st


def setup(lead, N, K, n, m, dtype, device, bias=True):
    w_nm = st.nm_compress(torch.randn(N, K, dtype=dtype, device=device), n, m)
    x = torch.randn(*lead, K, dtype=dtype, device=device)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    return x, w_nm, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 8), (2, 3), (3, 5)], ids=lambda v: str(v))
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3), (0,), ()], ids=lambda v: f"lead{v}")
def test_forward_matches_dense(lead, n, m, dtype, device):
    N, K = 24, 70
    x, w_nm, b = setup(lead, N, K, n, m, dtype, device, bias=len(lead) != 1)
    y = st.nm_linear(x, w_nm, b)
    assert y.shape == (*lead, N) and y.dtype == dtype
    ref = F.linear(x.double(), w_nm.to_dense().double(), None if b is None else b.double())
    assert_close(y, ref, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (3, 5)], ids=lambda v: str(v))
def test_gradients_match_dense(n, m, dtype, device):
    N, K = 40, 100
    x, w_nm, b = setup((3, 5), N, K, n, m, dtype, device)
    x.requires_grad_(True)
    b.requires_grad_(True)
    values = w_nm.values.detach().requires_grad_(True)
    w_nm = st.NMTensor(values, w_nm.indices, w_nm.shape, n, m)
    y = st.nm_linear(x, w_nm, b)
    dy = torch.randn_like(y)
    gx, gv, gb = torch.autograd.grad(y, (x, values, b), dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w_nm.to_dense().detach().double().requires_grad_(True)
    b64 = b.detach().double().requires_grad_(True)
    rx, rw, rb = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), dy.double())
    assert_close(gx, rx, N)
    assert_close(gv, w_nm.gather(rw), 15)  # reduction over the 15 tokens
    assert_close(gb, rb, 15)
    assert gv.shape == values.shape


def test_gradient_only_where_required(device):
    x, w_nm, b = setup((4,), 16, 32, 2, 4, torch.float32, device)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(st.nm_linear(x, w_nm, b).sum(), (x,))
    assert gx.shape == x.shape
    assert w_nm.values.grad is None


def test_non_contiguous_input(device):
    x, w_nm, b = setup((6, 64), 32, 64, 2, 4, torch.float32, device)
    xt = x.transpose(0, 1)  # [64, 6, K] view, not contiguous
    xs = torch.randn(6, 128, device=device)[:, ::2]  # strided along K
    for v in (xt, xs):
        assert not v.is_contiguous()
        torch.testing.assert_close(st.nm_linear(v, w_nm, b), st.nm_linear(v.contiguous(), w_nm, b), rtol=0, atol=0)


def test_non_contiguous_values(device):
    x, w_nm, _ = setup((5,), 16, 64, 2, 4, torch.float32, device)
    v = w_nm.values.t().contiguous().t()  # same values, column-major
    w2 = st.NMTensor(v, w_nm.indices, w_nm.shape, 2, 4)
    torch.testing.assert_close(st.nm_linear(x, w2), st.nm_linear(x, w_nm), rtol=0, atol=0)


def test_matches_masked_dense_model_all_zero_and_all_kept(device):
    x = torch.randn(3, 32, device=device)
    zero = st.nm_compress(torch.zeros(8, 32, device=device), 2, 4)
    assert torch.equal(st.nm_linear(x, zero), torch.zeros(3, 8, device=device))
    dense_nm = st.nm_prune(torch.randn(8, 32, device=device), 2, 4)
    full = st.nm_compress(dense_nm, 2, 4, strict=True)  # every kept slot already holds a non-zero
    assert_close(st.nm_linear(x, full), F.linear(x.double(), dense_nm.double()), 32)


def _op_args(device, dtype=torch.float32):
    x, w_nm, b = setup((6,), 32, 64, 2, 4, dtype, device)
    return x, w_nm.values, w_nm.indices, b, 2, 4, 64


def test_opcheck(device):
    x, values, indices, b, n, m, K = _op_args(device)
    torch.library.opcheck(torch.ops.sparse_triton.nm_linear_fwd.default, (x, values, indices, b, n, m, K))
    torch.library.opcheck(torch.ops.sparse_triton.nm_linear_fwd.default, (x, values, indices, None, n, m, K))
    dy = torch.randn(6, 32, device=device)
    torch.library.opcheck(torch.ops.sparse_triton.nm_linear_bwd_dx.default, (dy, values, indices, n, m, K))
    torch.library.opcheck(torch.ops.sparse_triton.nm_linear_bwd_dvalues.default, (dy, x, indices, n, m, K))
    w = torch.randn(12, 40, device=device)
    torch.library.opcheck(torch.ops.sparse_triton.nm_prune_compress.default, (w, 2, 4))


def test_torch_compile_fullgraph(device):
    x, w_nm, b = setup((3, 4), 32, 64, 2, 4, torch.float32, device)
    layer = st.nn.SparseLinear.from_dense(torch.nn.Linear(32, 48).to(device), st.NMSparsity(2, 4))
    x.requires_grad_(True)

    def f(x, values, indices, b):
        y = st.nm_linear(x, st.NMTensor(values, indices, (32, 64), 2, 4), b)
        return layer(torch.relu(y)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w_nm.values, w_nm.indices, b)
    (gx,) = torch.autograd.grad(out, (x,))
    x2 = x.detach().requires_grad_(True)
    ref = f(x2, w_nm.values, w_nm.indices, b)
    (rx,) = torch.autograd.grad(ref, (x2,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)


def test_sparse_linear_under_autocast(device):
    layer = st.nn.SparseLinear.from_dense(torch.nn.Linear(64, 32), st.NMSparsity(2, 4)).to(device)
    x = torch.randn(5, 64, device=device, requires_grad=True)
    dtype = torch.float16  # not bf16: the interpreter computes bf16 wrongly (bf16 is covered by the GPU tier)
    with torch.autocast(device_type=device, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    dense = torch.nn.functional.linear(x.detach().to(dtype).double(), layer.weight.detach().to(dtype).double(),
                                       layer.bias.detach().to(dtype).double())
    assert ((y.double() - dense).norm() / dense.norm()).item() < 1e-2


def test_bf16_on_cpu_runs_the_reference(device, monkeypatch):
    # The interpreter computes bf16 wrongly, so CPU bf16 must never reach an interpreted kernel.
    if device == "cpu":
        from sparse_triton.kernels import nm_matmul, nm_prune

        def refuse(*args, **kwargs):
            raise AssertionError("bf16 on CPU reached a Triton kernel")

        for mod, name in ((nm_matmul, "nm_matmul_fwd"), (nm_matmul, "nm_matmul_bwd_dx"),
                          (nm_matmul, "nm_decompress"), (nm_prune, "nm_prune_compress"), (nm_prune, "nm_gather")):
            monkeypatch.setattr(mod, name, refuse)
    x, w_nm, b = setup((6,), 32, 64, 2, 4, torch.bfloat16, device)
    x.requires_grad_(True)
    values = w_nm.values.detach().requires_grad_(True)
    w_nm = st.NMTensor(values, w_nm.indices, w_nm.shape, 2, 4)
    ref = F.linear(x.detach().double(), w_nm.to_dense().detach().double(), b.double())
    y = st.nm_linear(x, w_nm, b)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2
    y.float().sum().backward()
    assert x.grad is not None and values.grad is not None


def test_cpu_without_interpreter_runs_the_reference():
    import os
    import subprocess
    import sys

    code = (
        "import torch, sparse_triton as st\n"
        "from sparse_triton.kernels import nm_matmul, nm_prune\n"
        "def refuse(*a, **k):\n"
        "    raise AssertionError('a Triton kernel ran on CPU without TRITON_INTERPRET')\n"
        "nm_matmul.nm_matmul_fwd = nm_matmul.nm_matmul_bwd_dx = nm_matmul.nm_decompress = refuse\n"
        "nm_prune.nm_prune_compress = nm_prune.nm_gather = refuse\n"
        "w = st.nm_compress(torch.randn(32, 64), 2, 4)\n"
        "w.values.requires_grad_(True)\n"
        "x = torch.randn(5, 64, requires_grad=True)\n"
        "y = st.nm_linear(x, w)\n"
        "y.sum().backward()\n"
        "assert w.values.grad is not None and x.grad is not None\n"
        "assert torch.allclose(y, torch.nn.functional.linear(x, w.to_dense()), atol=1e-5)\n"
        "print('reference ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "reference ok" in out.stdout, out.stderr[-2000:]


def test_tf32_set_through_the_new_api(device, set_tf32):
    # Reading the legacy allow_tf32 flag raises once TF32 was set through fp32_precision; the ops
    # must read the setting without mixing the two APIs.
    from sparse_triton.kernels._launch import tf32_enabled

    set_tf32(True)
    assert tf32_enabled()
    x, w_nm, b = setup((12,), 32, 64, 2, 4, torch.float32, device)
    y = st.nm_linear(x, w_nm, b)
    ref = F.linear(x.double(), w_nm.to_dense().double(), b.double())
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3  # TF32 on a GPU, exact on CPU
    set_tf32(False)
    assert not tf32_enabled()


@pytest.mark.parametrize("how", ["set_float32_matmul_precision", "fp32_precision", "allow_tf32"])
def test_tf32_read_on_every_api(how):
    # Each way a user turns TF32 on is seen; run in a fresh interpreter, since torch refuses to read the
    # legacy flag once the new API was used in the same process.
    import subprocess
    import sys

    setting = {"set_float32_matmul_precision": "torch.set_float32_matmul_precision('high')",
               "fp32_precision": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
               "allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True"}[how]
    code = ("import torch\nfrom sparse_triton.kernels._launch import tf32_enabled\n"
            "assert not tf32_enabled()\n" + setting + "\nassert tf32_enabled()\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]

