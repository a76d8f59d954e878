"""What the tests and the benchmarks share: a real ddim-serve process on loopback."""
