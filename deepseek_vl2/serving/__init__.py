"""Serving DeepSeek-VL2 behind Cog: input checks, failure messages, the batched streaming
service and the bridge to Cog's server (predict.py is the glue that declares the inputs)."""
