"""Benchmarks: one script per question, each printing its parameters and a JSON result."""
