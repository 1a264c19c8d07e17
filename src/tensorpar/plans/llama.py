"""The Llama-family plan (also Mistral, Qwen2, SmolLM): module path pattern -> style.

Data flow per layer: the replicated hidden state enters column-parallel QKV and gate/up
("all-to-sharded"), attention and the activation run on local heads / local intermediate
columns, and row-parallel o_proj / down_proj all-reduce back to a replicated hidden state
("sharded-to-all"). Two all-reduces per layer. Norms are replicated.
"""

LLAMA_PLAN: dict[str, str] = {
    "model.embed_tokens": "vocab_embedding",
    "model.layers.*.self_attn.qkv_proj": "colwise_heads",
    "model.layers.*.self_attn.o_proj": "rowwise_heads",
    "model.layers.*.mlp.gate_up_proj": "colwise",
    "model.layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}
