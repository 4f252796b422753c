"""DeepSeek-VL2 inference in plain PyTorch: processor, model, generation, grounding."""

__version__ = "0.1.0"
