"""Benchmark harness, apart from the model core: timing (``timing``), the forms a model is timed in, ours
and timm's (``forms``), CPU deployment forms (``runtimes``), what ``effvit bench`` runs (``throughput``)
and weights with realistic BN statistics for benchmarks and tests (``weights``). Importing or calling it
leaves process-wide settings as they were."""
