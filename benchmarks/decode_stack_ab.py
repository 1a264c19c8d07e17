"""The decode stack against the modules, and 8-bit activations against float32 ones, in one process.

    python benchmarks/decode_stack_ab.py [--model smollm2-135m] [--quantization none|gguf|int8|int4]
                                         [--rounds 4] [--new-tokens 48] [--q8]

One rank (TP=1), the model loaded once; each round generates ``--new-tokens`` tokens (greedy, EOS
ignored) with the C++ decoder-layer stack (``layers.decode_stack``) and then with the same fused
kernels called module by module, alternating, so that a drifting machine falls on both alike.
With ``--q8`` the pair is 8-bit activations (``TENSORPAR_Q8_ACTIVATIONS``) against float32 ones,
both on the stack. Prints each side's ms/token, sorted, and the first words of each side's text.
"""

from __future__ import annotations

import argparse

from tensorpar import LLM
from tensorpar.layers import decode_stack, fused
from tensorpar.runtime.sampling import SamplingParams

PROMPT = "Once upon a time, in a land far away,"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--q8", action="store_true")
    a = ap.parse_args()
    llm = LLM(a.model, tp=1, quantization=a.quantization, progress=False)
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    sides = {"q8": lambda: fused.q8_activations(True), "float": lambda: fused.q8_activations(False)} if a.q8 else {
        "stack": lambda: decode_stack.enabled(True), "modules": lambda: decode_stack.enabled(False)}
    times: dict[str, list[float]] = {side: [] for side in sides}
    text = {}
    for _ in range(a.rounds):
        for side, switch in sides.items():
            with switch():
                out = llm.generate_full([PROMPT], params)
            times[side].append(out.timings["decode_s_per_token"] * 1e3)
            text[side] = out.completions[0].text
    llm.close()
    print(f"{a.model} {a.quantization}, TP=1, ms/token over {a.rounds} alternating rounds")
    for side, ms in times.items():
        print(f"  {side:8s} " + " ".join(f"{t:6.2f}" for t in sorted(ms)) + f"   {text[side][:60]!r}")


if __name__ == "__main__":
    main()
