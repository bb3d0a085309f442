"""Mixture-of-experts rules: the engine's fused MoE, flat tokens, checkpoint module names."""
