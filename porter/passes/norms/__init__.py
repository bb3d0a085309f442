"""Norm rules: the engine's norms, and q/k norms that span the heads split across TP ranks."""
