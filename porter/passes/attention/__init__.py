"""Rules that turn HF attention into the engine's: the attention call, q/k/v, heads, ALiBi."""
