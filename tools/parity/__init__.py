"""Parity with the official implementation: the fixture reader, the bf16 check, drift figures."""
