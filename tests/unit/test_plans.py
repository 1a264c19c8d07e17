"""``apply_plan`` on meta models, rank by rank, with contexts that have no process group."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS
from torch import nn

import tensorpar.layers.embedding as embedding_mod
import tensorpar.layers.linear as linear_mod
from tensorpar.distributed.groups import ParallelContext
from tensorpar.layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from tensorpar.layers.attention import AttentionBatch
from tensorpar.loading import build_model
from tensorpar.loading.safetensors_source import SafetensorsSource
from tensorpar.models.config import ModelConfig
from tensorpar.models.llama import PLAN, LlamaForCausalLM, RMSNorm
from tensorpar.models.registry import ARCHITECTURES, MODEL_TYPES, model_module
from tensorpar.partition import even_split, head_shard, vocab_shard
from tensorpar.plans import STYLES, apply_plan, tie_embeddings

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")  # the gated-MLP tiny checkpoints without biases

CPU = torch.device("cpu")


def ctx(rank: int, world_size: int) -> ParallelContext:
    return ParallelContext(rank=rank, world_size=world_size, device=CPU, backend="none", group=None)


def config(arch: str) -> ModelConfig:
    return ModelConfig.from_hf(TINY_CONFIGS[arch])


def meta_model(cfg: ModelConfig) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def planned(cfg: ModelConfig, rank: int, tp: int) -> LlamaForCausalLM:
    model = apply_plan(meta_model(cfg), model_module(cfg).PLAN, ctx(rank, tp))
    return tie_embeddings(model) if cfg.tie_word_embeddings else model


def degrees(arch):
    heads = TINY_CONFIGS[arch]["num_attention_heads"]
    return [(arch, tp) for tp in range(1, heads + 1)]


ALL_DEGREES = [c for arch in ARCHS for c in degrees(arch)]


def test_every_architecture_module_has_a_plan_of_known_styles():
    for arch in ARCHITECTURES:
        plan = arch.load().PLAN
        assert set(plan.values()) <= set(STYLES)
        assert list(plan.values()).count("vocab_embedding") == 1 and list(plan.values()).count("vocab_head") == 1
        assert set(getattr(arch.load(), "EXPERT_PLAN", {}).values()) <= {"experts"}
    assert set(MODEL_TYPES) == {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt2", "mixtral",
                                "qwen2_moe", "qwen3_moe"}
    assert model_module(config("qwen2")).PLAN is PLAN
    assert model_module(config("gpt2")).PLAN is not PLAN  # its MLP has no gate


@pytest.mark.parametrize("arch, tp", ALL_DEGREES)
def test_apply_plan_replaces_modules_and_shapes(arch, tp):
    cfg = config(arch)
    d, hidden, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    for rank in range(tp):
        model = planned(cfg, rank, tp)
        shard = head_shard(cfg.num_heads, cfg.num_kv_heads, tp, rank)
        emb = model.model.embed_tokens
        assert type(emb) is VocabParallelEmbedding
        assert emb.span == vocab_shard(cfg.vocab_size, tp, rank)
        assert emb.weight.shape == (len(emb.span), hidden)
        head = model.lm_head
        assert type(head) is ParallelLMHead
        assert head.span == emb.span
        assert head.shard_sizes == [len(vocab_shard(cfg.vocab_size, tp, r)) for r in range(tp)]
        assert head.tied == cfg.tie_word_embeddings
        if cfg.tie_word_embeddings:
            assert head.weight is emb.weight
            assert "lm_head.weight" not in dict(model.named_parameters())  # one parameter, named once
        else:
            assert head.weight is not emb.weight and head.weight.shape == (len(emb.span), hidden)
        assert type(model.model.norm) is RMSNorm and model.model.norm.weight.shape == (hidden,)
        assert len(model.model.layers) == cfg.num_layers
        local_i = len(even_split(inter, tp, rank))
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            assert type(attn.qkv_proj) is ColumnParallelLinear
            assert type(attn.o_proj) is RowParallelLinear
            assert type(mlp.gate_up_proj) is ColumnParallelLinear
            assert type(mlp.down_proj) is RowParallelLinear
            assert type(layer.input_layernorm) is RMSNorm and layer.input_layernorm.weight.shape == (hidden,)
            assert type(layer.post_attention_layernorm) is RMSNorm
            assert attn.num_heads == shard.num_slots
            assert attn.num_kv_heads == shard.num_kv
            assert attn.head_dim == d
            assert attn.qkv_proj.weight.shape == ((shard.num_slots + 2 * shard.num_kv) * d, hidden)
            assert (attn.qkv_proj.bias is not None) == cfg.qkv_bias
            if cfg.qkv_bias:
                assert attn.qkv_proj.bias.shape == ((shard.num_slots + 2 * shard.num_kv) * d,)
            assert attn.o_proj.weight.shape == (hidden, shard.num_slots * d)
            assert (attn.o_proj.bias is not None) == cfg.o_bias
            assert mlp.gate_up_proj.weight.shape == (2 * local_i, hidden)
            assert [s.part for s in mlp.gate_up_proj.segments] == ["gate_proj", "up_proj"]
            assert mlp.down_proj.weight.shape == (hidden, local_i)
        # No plain nn.Linear / nn.Embedding survives: every projection is sharded.
        leftovers = [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
        assert leftovers == []


def part_spans(module, part):
    return [s.span for s in module.segments if s.part == part]


@pytest.mark.parametrize("arch, tp", ALL_DEGREES)
def test_shards_over_ranks_add_up_to_the_full_model(arch, tp):
    cfg = config(arch)
    d, hidden, inter, vocab = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    full = meta_model(cfg)
    full_attn, full_mlp = full.model.layers[0].self_attn, full.model.layers[0].mlp
    rows = {p: [] for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    real = {"qkv": 0, "o": 0, "gate_up": 0, "down": 0, "embed": 0, "head": 0}
    for rank in range(tp):
        model = planned(cfg, rank, tp)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        for p in ("q_proj", "k_proj", "v_proj"):
            rows[p].append(part_spans(attn.qkv_proj, p))
        rows["o_proj"].append(part_spans(attn.o_proj, "o_proj"))
        rows["gate_proj"].append(part_spans(mlp.gate_up_proj, "gate_proj"))
        rows["up_proj"].append(part_spans(mlp.gate_up_proj, "up_proj"))
        rows["down_proj"].append(part_spans(mlp.down_proj, "down_proj"))
        pad_q = sum(len(s.span) for s in attn.qkv_proj.segments if s.part is None)
        pad_o = sum(len(s.span) for s in attn.o_proj.segments if s.part is None)
        shard = head_shard(cfg.num_heads, cfg.num_kv_heads, tp, rank)
        assert pad_q == pad_o == (shard.num_slots - len(shard.q_heads)) * d
        q_rows = attn.qkv_proj.weight.shape[0] - pad_q - 2 * shard.num_kv * d
        real["qkv"] += q_rows * hidden
        real["o"] += attn.o_proj.weight.numel() - pad_o * hidden
        real["gate_up"] += mlp.gate_up_proj.weight.numel()
        real["down"] += mlp.down_proj.weight.numel()
        real["embed"] += model.model.embed_tokens.weight.numel()
        if not cfg.tie_word_embeddings:
            real["head"] += model.lm_head.weight.numel()

    def flat(per_rank):
        return [i for spans in per_rank for s in spans for i in s]

    # Split parts: every global row (or input column) is held by exactly one rank, in order.
    for p, n in (("q_proj", cfg.num_heads * d), ("o_proj", cfg.num_heads * d),
                 ("gate_proj", inter), ("up_proj", inter), ("down_proj", inter)):
        assert flat(rows[p]) == list(range(n)), p
    # K/V are replicated where ranks share a KV head: covered, never missing.
    for p in ("k_proj", "v_proj"):
        assert set(flat(rows[p])) == set(range(cfg.num_kv_heads * d))
    assert real["qkv"] == cfg.num_heads * d * hidden
    assert real["o"] == full_attn.o_proj.weight.numel()
    assert real["gate_up"] == full_mlp.gate_up_proj.weight.numel()
    assert real["down"] == full_mlp.down_proj.weight.numel()
    assert real["embed"] == vocab * hidden
    assert real["head"] == (0 if cfg.tie_word_embeddings else vocab * hidden)


def test_unmatched_pattern_raises():
    cfg = config("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.\*\.self_attn\.nothing"):
        apply_plan(meta_model(cfg), {"model.layers.*.self_attn.nothing": "colwise"}, ctx(0, 2))
    plan = dict(PLAN)
    plan["model.layers.*.mlp.gate_proj"] = "colwise"  # unfused names do not exist in this model
    with pytest.raises(ValueError, match="matches no module"):
        apply_plan(meta_model(cfg), plan, ctx(0, 2))


def test_unknown_style_raises():
    with pytest.raises(ValueError, match="unknown plan style 'diagonal'"):
        apply_plan(meta_model(config("llama")), {"model.layers.*.mlp.down_proj": "diagonal"}, ctx(0, 2))


def test_apply_plan_keeps_a_meta_model_on_meta():
    model = planned(config("llama"), 0, 2)
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"meta"}


# ---------------------------------------------------------------- numerical equivalence


@pytest.fixture(scope="module")
def sources(tiny_checkpoints):
    return {arch: SafetensorsSource(tiny_checkpoints[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def full_models(sources):
    from tensorpar.distributed.groups import single_process_context

    return {arch: build_model(src, single_process_context()) for arch, src in sources.items()}


@pytest.mark.parametrize("arch, tp", [c for c in ALL_DEGREES if c[1] > 1])
def test_sharded_blocks_recombine_to_the_full_blocks(arch, tp, sources, full_models, monkeypatch):
    """Each rank's attention / MLP returns its partial sum when the all-reduce is the identity;
    the partial sums over ranks equal the unsharded block. Embedding partials sum to the table
    lookup; local logits concatenate to the full logits."""
    monkeypatch.setattr(linear_mod, "reduce_from_tp", lambda x, c: x)
    monkeypatch.setattr(embedding_mod, "reduce_from_tp", lambda x, c: x)
    full = full_models[arch]
    cfg = full.config
    assert not cfg.o_bias and not cfg.mlp_bias  # the bias would otherwise be added once per rank
    g = torch.Generator().manual_seed(tp)
    B, S = 2, 18  # longer than the sliding windows of 8 and Phi-3's pretrained 16 positions
    x = torch.randn(B, S, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    batch = AttentionBatch.fresh(B, S, CPU)
    with torch.no_grad():
        ropes = [full.rotary(batch, x.dtype, i) for i in range(cfg.num_layers)]
        want_attn = [layer.self_attn(x, batch, ropes[i], None) for i, layer in enumerate(full.model.layers)]
        want_mlp = [layer.mlp(x) for layer in full.model.layers]
        want_emb = full.model.embed_tokens(ids)
        want_logits = full.logits(x)
        got_attn = [torch.zeros_like(w) for w in want_attn]
        got_mlp = [torch.zeros_like(w) for w in want_mlp]
        got_emb = torch.zeros_like(want_emb)
        got_logits = []
        for rank in range(tp):
            model = build_model(sources[arch], ctx(rank, tp))
            for i, layer in enumerate(model.model.layers):
                got_attn[i] += layer.self_attn(x, batch, ropes[i], None)
                got_mlp[i] += layer.mlp(x)
            got_emb += model.model.embed_tokens(ids)
            got_logits.append(model.lm_head.local_logits(x))
    for got, want in zip(got_attn + got_mlp, want_attn + want_mlp):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_emb, want_emb, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(got_logits, dim=-1), want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [*ARCHS, "gpt2"])
def test_a_packed_step_equals_its_parts_run_alone_and_chunks_equal_a_whole_prefill(arch, tiny_checkpoints):
    """One step packing a decode row, a fresh prompt and a later chunk of another prompt gives each
    row the final hidden state it gets alone; a prompt prefilled in chunks ends where one whole
    prefill does (18 positions: past the sliding windows of 8 and Phi-3's switch to long factors at 16)."""
    from tensorpar.distributed.groups import single_process_context
    from tensorpar.runtime import messages
    from tensorpar.runtime.kv_cache import KVCache

    model = build_model(SafetensorsSource(tiny_checkpoints[arch]), single_process_context())
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (12, 7, 18))

    def run(cache, message):
        batch = messages.to_batch(message.header(), torch.tensor(message.payload()))
        with torch.no_grad():
            return batch.output_tokens(model(batch.ids, batch.attention, cache))  # [rows, hidden]

    blocks_a, blocks_b, blocks_c = [7, 2, 9, 4], [5, 1], [3, 11, 6, 10, 8]  # blocks of 4 positions, scattered

    def new_cache():
        cache = KVCache(model.kv_cache_shape(), 12, 4, torch.float32, CPU)
        cache.zero_through(12)
        run(cache, messages.step([messages.chunk(a, 0, 12, blocks_a, 4)]))  # a: 12 tokens cached, its next token at position 12
        run(cache, messages.step([messages.chunk(c, 0, 5, blocks_c, 4)]))  # c: its first 5 tokens cached
        return cache

    packed = run(new_cache(), messages.step([messages.decode_part([a[0]], [12], [blocks_a], 4), messages.chunk(b, 0, 7, blocks_b, 4),
                                      messages.chunk(c, 5, 18, blocks_c, 4)]))
    alone_cache = new_cache()
    alone = torch.cat([run(alone_cache, messages.step([messages.decode_part([a[0]], [12], [blocks_a], 4)])),
                       run(alone_cache, messages.step([messages.chunk(b, 0, 7, blocks_b, 4)])),
                       run(alone_cache, messages.step([messages.chunk(c, 5, 18, blocks_c, 4)]))])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        whole = model(torch.tensor([c]))[:, -1]  # no cache, one causal pass
    if model.config.whole_prompts_from is not None and len(c) >= model.config.whole_prompts_from:
        assert not torch.allclose(packed[2:], whole, rtol=1e-3, atol=1e-3)  # why such prompts are never chunked
    else:
        torch.testing.assert_close(packed[2:], whole, rtol=1e-5, atol=1e-5)
