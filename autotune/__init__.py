"""The tuning campaign: shape sets from real models (shared with perf/) and, on a GPU, the script that
regenerates the shipped tables ``sparse_triton/tuning/tuned/<gpu>.json``."""
