"""State-space rules: Mamba-2 mixers built as the engine's MambaMixer2, and the state-cache interface
(shapes, dtypes, copy functions, HasInnerState / IsAttentionFree / IsHybrid) of the causal LM."""
