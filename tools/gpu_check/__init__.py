"""The prepared GPU check: preflight, parity, speed and Cog stages, run by gpu_check.sh."""
