"""Baselines measured in one harness: HERON's device step against CSE-FSL, SplitFed (V1, V2),
FedAvg and a frozen device (`heron profile`, `heron bench`).

Kept import-free on purpose: `python -m baselines.profile` runs a measured child process,
and anything imported here would count in that child's peak memory.
"""
