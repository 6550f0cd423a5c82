"""Deployment: exports of the fused model (the benchmark harness is effvit.bench)."""
