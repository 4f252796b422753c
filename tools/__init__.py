"""Developer tooling over the package: test checkpoints, benchmark, GPU check, parity figures."""
