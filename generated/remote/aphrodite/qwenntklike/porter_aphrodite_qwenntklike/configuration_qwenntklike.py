"""A Qwen-1-style configuration with a trained length (`seq_length`) past which the model stretches
its context by dynamic NTK and logn attention, written for porter's tests (remote-code style)."""

from transformers import PretrainedConfig


class QWenNtkLikeConfig(PretrainedConfig):
    model_type = "qwenntklike"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        layer_norm_epsilon=1e-6,
        rotary_emb_base=10000,
        seq_length=96,
        max_position_embeddings=512,
        use_dynamic_ntk=True,
        use_logn_attn=True,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_emb_base = rotary_emb_base
        self.seq_length = seq_length
        self.max_position_embeddings = max_position_embeddings
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
