"""Performance benchmarks of xrapture (not part of the package)."""
