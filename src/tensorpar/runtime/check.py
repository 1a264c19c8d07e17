"""``tensorpar check``: the same prompts at a layout and at one rank, compared.

The candidate (``--tp``, ``--pp``, ``--ep``, ``--quantization``) first completes each prompt
greedily with ``new_tokens`` tokens. Then both it and the reference (one rank, the same dtype and
device, weights as loaded: ``--quantization none``) score the prompt and that completion, so both
see exactly the same tokens at every position (teacher forcing). Per prompt:

- ``max_rel_error`` = max |a - b| / max |b| and ``mean_rel_error`` = mean |a - b| / mean |b|
  over every position and vocabulary entry, a the candidate's logits and b the reference's;
- ``first_divergence``: the first completion position where the candidate's token is not the
  reference's argmax, with ``margin``, the reference's top-1 minus top-2 logit there; a divergence
  whose margin is below ``near_tie`` is a near-tie (float reordering may flip it), not a failure;
- ``verdict``: ``ok``, ``near-tie`` (it diverged only at one), or ``MISMATCH`` (the error is above
  the tolerance, or the tokens part where the reference is sure). With ``--deterministic`` (the
  reference deterministic too) the logits must be equal bit for bit: ``bit-identical``, or else
  ``MISMATCH``.

At TP>1 it also scores the first prompt once more with every value the ranks of a tensor-parallel
group hold replicated digested on each rank (the norm weights, the residual stream each layer
leaves after its all-reduces), and names the first layer and tensor whose copies are not bit for
bit the same (``LLM.replica_mismatch``, ``runtime.digests``): a rank that misses an all-reduce
shows there first.

Tolerances (``TOLERANCES``, relative logit error): the float32 correctness contract the README
states, 1e-4; the rounding of bfloat16 and float16 weights and activations; and for quantized
weights the error measured on SmolLM2 (``tests/integration/test_quantized.py``), with room.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# (relative logit error, near-tie margin in logits)
TOLERANCES = {"fp32": (1e-4, 0.01), "bf16": (3e-2, 0.5), "fp16": (1e-2, 0.5)}
QUANTIZED_TOLERANCES = {"int8": (0.10, 0.5), "int4": (0.30, 0.5), "gguf": (0.06, 0.5)}

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Tensor parallelism splits a model's",
                   "Once upon a time, in a small village,", "The three primary colours are")


@dataclass
class PromptCheck:
    prompt: str
    tokens: int  # prompt + completion tokens scored
    max_rel_error: float
    mean_rel_error: float
    first_divergence: int | None  # index into the completion
    margin: float | None
    verdict: str


def tolerance(dtype: str, quantization: str) -> tuple[float, float]:
    """(relative logit error, near-tie margin) of a candidate against its float reference."""
    return QUANTIZED_TOLERANCES[quantization] if quantization != "none" else TOLERANCES[dtype]


def compare(prompt: str, prompt_len: int, completion: list[int], got: torch.Tensor, want: torch.Tensor,
            tol: float, near_tie: float, exact: bool = False) -> PromptCheck:
    """One prompt's verdict from the candidate's and the reference's logits [positions, vocab]
    over prompt + completion (the logits at position i predict token i + 1). ``exact``
    (deterministic mode): ``bit-identical``, or else ``MISMATCH``."""
    identical = exact and torch.equal(got, want)
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    max_rel = (diff.max() / want.abs().max()).item()
    mean_rel = (diff.mean() / want.abs().mean()).item()
    first = margin = None
    predictors = want[prompt_len - 1 : prompt_len - 1 + len(completion)]  # [completion, vocab]
    best = predictors.argmax(dim=-1).tolist()
    for i, (token, ref) in enumerate(zip(completion, best)):
        if token != ref:
            top2 = predictors[i].topk(2).values
            first, margin = i, (top2[0] - top2[1]).item()
            break
    if exact:
        verdict = "bit-identical" if identical else "MISMATCH"
    elif max_rel > tol or (margin is not None and margin >= near_tie):
        verdict = "MISMATCH"
    else:
        verdict = "ok" if first is None else "near-tie"
    return PromptCheck(prompt, len(got), max_rel, mean_rel, first, margin, verdict)


def run_check(args, prompts: list[str], new_tokens: int, chat: bool = False) -> dict:
    """Check the candidate ``args`` (``EngineArgs``) against one rank of the same model: the
    report of every prompt, and whether all passed."""
    from dataclasses import replace

    from tensorpar.distributed.launch import torchrun_env
    from tensorpar.errors import TensorparError
    from tensorpar.runtime.llm import LLM
    from tensorpar.runtime.sampling import SamplingParams

    if not prompts:
        raise ValueError("no prompts to check")
    if torchrun_env() is not None:
        raise TensorparError("tensorpar check starts its own ranks (the layout and one rank): run it without torchrun")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {new_tokens!r}")
    reference = replace(args, tp=1, pp=1, ep=1, quantization="none", fault="")
    with LLM(**asdict(args)) as llm:
        layout, dtype = llm.layout, llm.spec.dtype
        done = llm.generate_full(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), chat)
        sequences = [list(c.prompt_token_ids) + list(c.token_ids) for c in done.completions]
        got = llm.score(sequences)
        replicas = llm.replica_mismatch(sequences[0]) if llm.spec.dims.width > 1 else None
    with LLM(**asdict(reference)) as ref:
        want = ref.score(sequences)
    tol, near_tie = tolerance(dtype, args.quantization)
    checks = [compare(p, len(c.prompt_token_ids), list(c.token_ids), g, w, tol, near_tie, args.deterministic)
              for p, c, g, w in zip(prompts, done.completions, got, want)]
    return {"model": args.model, "layout": layout, "quantization": args.quantization, "dtype": dtype,
            "reference": "tp=1, weights as loaded", "tolerance": tol, "near_tie": near_tie,
            "new_tokens": new_tokens, "prompts": [asdict(c) for c in checks], "replicated_values": replicas or "bit-identical",
            "passed": replicas is None and all(c.verdict != "MISMATCH" for c in checks)}
