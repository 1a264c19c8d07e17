"""GGUF files of Llama 3 (RoPE scaling as llama.cpp's ``rope_freqs`` divisors, Q/K rows permuted),
Qwen2, Qwen3 and GPT-2 (Conv1D weights transposed, Q/K/V fused in ``attn_qkv``), written from tiny
random checkpoints the way llama.cpp's converter writes them: logits and greedy tokens at TP 1..3
equal transformers' on the original safetensors weights. (Gemma 3's GGUF is the real 270M file:
``test_gemma3_270m.py``.)"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_CONFIGS, hf_reference
from gguf_tiny import write_gguf

from tensorpar import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "gpt2"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def gguf_files(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {arch: write_gguf(tiny_checkpoints[arch], root / f"{arch}.gguf") for arch in ARCHS}


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    out = {}
    for arch in ARCHS:
        model = hf_reference(tiny_checkpoints[arch])
        ids = torch.randint(0, TINY_CONFIGS[arch]["vocab_size"], (1, 19), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            out[arch] = (ids[0].tolist(), model(ids).logits[0], gen[0, ids.shape[1]:].tolist())
    return out


def test_llama3_rope_freqs_become_the_configs_scaling(gguf_files):
    from tensorpar.loading import open_source
    from tensorpar.models.config import ModelConfig
    from tensorpar.models.llama import rope_inverse_frequencies

    source = open_source(str(gguf_files["llama"]))
    scaling = source.config.rope_scaling
    assert scaling["rope_type"] == "factors" and len(scaling["factors"]) == source.config.head_dim // 2
    assert source.tokenizer() is None  # no vocabulary in the file: token ids only
    hf = ModelConfig.from_hf(TINY_CONFIGS["llama"])
    torch.testing.assert_close(rope_inverse_frequencies(source.config), rope_inverse_frequencies(hf), rtol=1e-6, atol=0)


def test_a_type_without_a_dequantizer_is_refused_naming_it(tiny_checkpoints, tmp_path):
    import gguf

    from tensorpar.errors import CheckpointError
    from tensorpar.loading import open_source

    path = write_gguf(tiny_checkpoints["qwen3"], tmp_path / "q8_1.gguf",
                      raw_types={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q8_1})
    with pytest.raises(CheckpointError, match="'blk.1.ffn_up.weight' is stored as Q8_1, which the gguf package"):
        open_source(str(path))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_matches_transformers_on_the_safetensors(arch, tp, gguf_files, references, rank_pool):
    prompt, want_logits, want_tokens = references[arch]
    with LLM(str(gguf_files[arch]), tp=tp, progress=False, ranks=rank_pool(tp)) as llm:
        logits = llm.score([prompt])[0]
        result = llm.generate_full([prompt], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert float((logits - want_logits).abs().max() / want_logits.abs().max()) < 1e-4
    assert result.completions[0].token_ids == want_tokens
