"""fasttrain's benchmark harness, run as ``python -m bench`` (see bench/README.md).

A suite is a module ``bench/<family>.py`` with ``BASELINE`` (the provider speedups are relative
to; a tuple lists fallbacks) and ``run(ctx: bench.common.Context) -> list[dict]`` (one row per
provider x workload).
"""
SUITES = ("adamw", "varlen_attn", "lora", "e2e")
