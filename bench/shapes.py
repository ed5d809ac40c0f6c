"""Model shapes the GPU benchmarks build with random weights (speed does not depend on the weights)."""

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): 30 layers, 9 query heads, 3 KV heads, head_dim 64
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
