"""Benchmarks: side-by-side ratios, printed as JSON (`make bench`)."""
