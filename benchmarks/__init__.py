"""Benchmarks: llmgateway against the upstream directly and LiteLLM's proxy, side by side.

Run from the repository root with the project venv: ``python -m benchmarks run`` (README.md here).
"""
