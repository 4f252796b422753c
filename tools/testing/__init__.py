"""Helpers for tests and the storm: Cog's real server, forged images, a predictor whose engine stops."""
