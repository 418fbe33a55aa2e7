"""Benchmarks: `make bench` measures the LLM service against raw transformers and its peers (see run.py)."""
