"""MLP rules: fused gate/up projection and the engine's activations."""
