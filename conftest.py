"""Makes the repository root importable for the tests (``deepseek_vl2``, ``scripts``, ``predict``)."""
