"""Deployment: exports of the fused model and the benchmark harness."""
