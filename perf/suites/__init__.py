"""One module per op family; each is runnable as ``python -m perf.suites.<name> [--quick]``.

Every suite follows the same contract so that ``perf/gpu_check.sh`` can run them all: it accepts the
common arguments from :func:`perf.harness.add_common_args` (``--quick``, ``--out``, ``--budget-s``,
``--warmup-ms``, ``--rep-ms``), writes ``<out>/<gpu-slug>/<suite>.json`` through
:class:`perf.harness.ResultWriter` (with a plot spec for ``perf/plot.py``), prints a compact table last,
and exits non-zero when a sparse_triton result is wrong.
"""
