"""Tensor-parallel layer rules: parallel linears and the vocab-parallel embedding."""
