"""Helpers the tests share (imported as ``from helpers import ...``; fixtures stay in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from tensorpar.runtime.sampler import Sampled
from tensorpar.runtime.scheduler import SCORE, Scheduler, StepPlan

VOCAB = 50  # the hand-made model's vocabulary


def next_token(token: int) -> int:
    """The hand-made model: the token after ``token`` is ``(token + 1) % VOCAB``, with certainty."""
    return (token + 1) % VOCAB


def outcome(plan: StepPlan) -> list:
    """What the sampler would choose from the hand-made model's output for ``plan``: per row the
    next token with log-probability 0 (and itself as the top alternative where asked); for a
    scoring plan, each prompt token's log-probability 0 (the first None)."""
    if plan.kind == SCORE:
        prompt = plan.scoring[0].prompt_token_ids
        return [(prompt[0], None, [])] + [(t, 0.0, []) for t in prompt[1:]]
    return [None if seq is None else Sampled(next_token(row[-1]), 0.0,
                                             [(next_token(row[-1]), 0.0)] if seq.params.logprobs else [])
            for seq, row in zip(plan.rows, plan.message.ids)]


def step(sched: Scheduler) -> StepPlan | None:
    """One plan, scheduled and updated with its hand-made outcome."""
    plan = sched.schedule()
    if plan is not None:
        sched.update(plan, outcome(plan))
    return plan


def run_until_idle(sched: Scheduler, each=None, max_plans: int = 10_000) -> list[StepPlan]:
    """Every plan until nothing is left to do (``each(plan)`` after each); the plans, in order."""
    plans = []
    while sched.has_work():
        plan = step(sched)
        if plan is not None:
            plans.append(plan)
        if each is not None:
            each(plan)
        assert len(plans) < max_plans, "the scheduler makes no progress"
    return plans


# Tiny configs chosen to exercise the shard arithmetic: uneven head splits, KV-head replication
# (MQA on 4 ranks), uneven vocabulary and intermediate splits, biases, tied and untied heads,
# llama3 RoPE scaling, a sliding window shorter than the test sequences, and a checkpoint sharded
# over several files; and one of each other architecture: Qwen3 (q/k norms, head_dim of its own),
# Gemma 3 (local layers with a window of 8 and their own base, a global layer with linear
# scaling, query_pre_attn_scalar), Phi-3 (fused checkpoint tensors, LongRoPE switching at 16
# positions) and GPT-2 (Conv1D, learned positions, LayerNorm, biases).
TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=250, hidden_size=48, intermediate_size=88, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "mistral": dict(
        model_type="mistral", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, sliding_window=8,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=301, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_sliding_window=False,
    ),
    "llama7": dict(  # 7 layers: uneven pipeline stages (2 + 2 + 2 + 1, 2 + 2 + 1 + 1 + 1)
        model_type="llama", vocab_size=199, hidden_size=48, intermediate_size=64, num_hidden_layers=7,
        num_attention_heads=6, num_key_value_heads=3, head_dim=8, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=True, bos_token_id=None, eos_token_id=None,
    ),
    "qwen3": dict(
        model_type="qwen3", vocab_size=211, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, head_dim=12, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "gemma3": dict(
        model_type="gemma3_text", vocab_size=230, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    ),
    "phi3": dict(
        model_type="phi3", vocab_size=199, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        original_max_position_embeddings=16, tie_word_embeddings=False,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
                      "long_factor": [2.0 + 0.5 * i for i in range(4)]},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "gpt2": dict(
        model_type="gpt2", vocab_size=190, n_embd=36, n_layer=2, n_head=6, n_positions=128,
        bos_token_id=None, eos_token_id=None,
    ),
    # Mixtures of experts: 8 and 6 experts, so that 3 and 4 expert sets are uneven.
    "mixtral": dict(
        model_type="mixtral", vocab_size=240, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False, sliding_window=None,
    ),
    "qwen2_moe": dict(
        model_type="qwen2_moe", vocab_size=240, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=256, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
        tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(  # layer 1 keeps a dense MLP (mlp_only_layers)
        model_type="qwen3_moe", vocab_size=240, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=True,
    ),
}

SHARDED = {"qwen2"}  # written over several safetensors files with an index

def write_tiny_checkpoint(arch: str, path: Path, seed: int = 0) -> Path:
    """A random model of ``arch`` saved by transformers as a safetensors directory (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[arch])
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights make logits differ clearly between tokens
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:  # Gemma's norms scale by 1 + w
                p.copy_((0 if arch == "gemma3" else 1) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.save_pretrained(path, max_shard_size="40KB" if arch in SHARDED else "1GB")
    return path

def smollm2_path() -> Path:
    from tensorpar.loading import resolve_model

    return resolve_model("smollm2-135m")

def num_heads(arch: str) -> int:
    cfg = TINY_CONFIGS[arch]
    return cfg.get("num_attention_heads") or cfg["n_head"]

def hf_reference(path: Path):
    """The transformers model for a checkpoint (directory or GGUF file), float32, eval mode."""
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()

def hf_logits_and_greedy(path: Path, prompts: list[list[int]], new_tokens: int):
    """transformers on ``path``: per prompt its logits [len, vocab] and ``new_tokens`` greedy
    tokens (generated with transformers' KV cache, as a user would)."""
    model = hf_reference(path)
    logits, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            greedy.append(new[0, len(p):].tolist())
    return logits, greedy

def greedy_reference(gguf: Path, prompts: list[str], new_tokens: int):
    """transformers on a GGUF file: its model, and per prompt (prompt ids, ``new_tokens`` greedy
    tokens); no prompt may reach EOS sooner."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = hf_reference(gguf)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
            out.append((ids[0].tolist(), gen[0, ids.shape[1]:].tolist()))
            assert len(out[-1][1]) == new_tokens, f"{p!r} reaches EOS within {new_tokens} tokens"
    return model, out

def write_chat_checkpoint(path: Path, arch: str = "llama") -> Path:
    """A tiny random ``arch`` model with SmolLM2's real tokenizer and chat template (vocabulary 49152)."""
    from transformers import AutoTokenizer

    cfg = dict(TINY_CONFIGS[arch], vocab_size=49152, bos_token_id=1, eos_token_id=2, max_position_embeddings=8192)
    TINY_CONFIGS.setdefault(f"{arch}-chat", cfg)
    write_tiny_checkpoint(f"{arch}-chat", path)
    gguf = smollm2_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path

def cli(*args: str, timeout: float = 240, **kw):
    """Run the installed ``tensorpar`` command as a user would; fail the test if it hangs."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("tensorpar")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, **kw)

def rank_processes() -> list:
    """Live processes named ``tensorpar-rN`` (spawned ranks name themselves so)."""
    import psutil

    out = []
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("tensorpar-r"):
            out.append(p)
    return out
