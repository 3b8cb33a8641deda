"""Benchmarks of this code on this machine, run as `python -m bench NAME` from the repository root
(bench/ is not installed); their numbers go to bench/results/ (JSON and markdown). One module per
benchmark; what more than one of them uses lives in bench/common/, and no benchmark imports another."""
