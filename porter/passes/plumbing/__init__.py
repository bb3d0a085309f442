"""Plumbing rules: signatures, dataflow, outputs, positions and prefixes threaded through, the
causal-LM interface and the engine imports."""
