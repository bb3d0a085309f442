"""Rotary position rules: the engine's get_rope, partial and one-tensor rotary, position factors."""
