"""Config field names shared by convert and by verify's reference side. Standard library only: the
reference side runs in venvs of other transformers releases, which have none of porter's conversion
dependencies (libcst, ruff)."""

# what configs that do not say `num_hidden_layers` call their layer count (remote code: ChatGLM's
# num_layers, MPT's n_layers, GPT-2-style n_layer)
LAYER_COUNT_NAMES = ("num_layers", "n_layers", "n_layer")
