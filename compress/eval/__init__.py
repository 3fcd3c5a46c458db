"""Measuring a model artifact: task metrics, latency, memory, and the benchmark report that compares variants."""
