"""Cleanup rules: HF-only imports, decorators, base classes, checks, dropout, dead code."""
