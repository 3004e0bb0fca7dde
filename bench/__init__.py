"""fasttrain's benchmark harness, run as ``python -m bench`` (see bench/README.md).

A suite is a module ``bench/<family>.py`` with ``BASELINE`` (the provider speedups are relative
to; a tuple lists fallbacks) and ``run(ctx: bench.common.Context)``, a generator of lists of
rows (one list per workload, one row per provider x mode), which the harness writes out as they
come.
"""
SUITES = ("adamw", "varlen_attn", "lora", "e2e")
