"""Model shapes the GPU benchmarks build with random weights (speed does not depend on the weights)."""

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): 30 layers, 9 query heads, 3 KV heads, head_dim 64
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip

# Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json): 16 layers, 32 query heads, 8 KV heads, head_dim 64, llama3 RoPE
LLAMA_32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json): 32 layers, 32 query heads, 8 KV heads, head_dim 128, untied
LLAMA_3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip
