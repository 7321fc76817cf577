"""Benchmarks of trl_gndpo, run from the repository root as modules (``python -m benchmarks.run``); see README.md."""
