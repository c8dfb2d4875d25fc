"""Hypothesis fuzzer of core.attention against the float64 reference. See fuzz/README.md."""
