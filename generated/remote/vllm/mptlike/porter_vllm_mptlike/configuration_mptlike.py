"""An MPT-style configuration, written for porter's tests (remote-code style)."""

from typing import Optional

from transformers import PretrainedConfig


class MPTConfig(PretrainedConfig):
    model_type = "mptlike"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }

    def __init__(
        self,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        expansion_ratio: int = 4,
        max_seq_len: int = 512,
        vocab_size: int = 1024,
        no_bias: bool = True,
        clip_qkv: Optional[float] = 0.5,
        alibi_bias_max: int = 8,
        layer_norm_epsilon: float = 1e-5,
        init_std: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.expansion_ratio = expansion_ratio
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.no_bias = no_bias
        self.clip_qkv = clip_qkv
        self.alibi_bias_max = alibi_bias_max
        self.layer_norm_epsilon = layer_norm_epsilon
        self.init_std = init_std
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
