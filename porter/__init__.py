"""porter: port Hugging Face causal LMs to inference-engine model code."""

__version__ = "0.1.0"
