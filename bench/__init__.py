"""Benchmarks of the stack against what users would run instead; not tests (`python -m bench`)."""
