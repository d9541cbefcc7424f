"""Benchmarks that measure the project side by side with a naive reference in one run
(``python -m jobs.benchmark input train infer gpu``); each part returns a ``report.Bench``."""
