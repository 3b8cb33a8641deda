"""Benchmarks of this code on this machine: train, sample and vqvae, run by scripts/bench.py; their
numbers go to bench/results/ (JSON and markdown)."""
