"""Developer scripts (test checkpoint generator, tools). Importable so tests can reuse them."""
