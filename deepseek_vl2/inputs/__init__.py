"""Inputs: image loading, tiling, the chat template and the processor that turns a conversation into model inputs."""
