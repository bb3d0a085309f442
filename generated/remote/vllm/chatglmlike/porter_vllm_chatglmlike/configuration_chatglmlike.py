"""A ChatGLM-style configuration, written for porter's tests (remote-code style)."""

from transformers import PretrainedConfig


class ChatGLMLikeConfig(PretrainedConfig):
    model_type = "chatglmlike"
    attribute_map = {"max_position_embeddings": "seq_length", "num_hidden_layers": "num_layers"}

    def __init__(
        self,
        num_layers=2,
        padded_vocab_size=1024,
        hidden_size=128,
        ffn_hidden_size=160,
        kv_channels=32,
        num_attention_heads=4,
        seq_length=512,
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        add_qkv_bias=True,
        multi_query_attention=True,
        multi_query_group_num=2,
        rope_ratio=1.0,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.vocab_size = padded_vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.rope_ratio = rope_ratio
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
