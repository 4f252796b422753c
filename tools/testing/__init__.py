"""Helpers for tests and the soak: Cog's real server, the soak, forged images."""
