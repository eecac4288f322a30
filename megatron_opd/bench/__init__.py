"""Benchmarks (``opd bench ...``): whole runs timed in steady state, figures printed last."""
