"""The model: config, checkpoint loading, SigLIP vision tower, projector and the DeepSeek-V2 MoE language model."""
