"""A script written for vLLM's offline API runs against tensorpar with only its import changed
(``tensorpar.vllm``), and the answers mean what they mean in vLLM."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

QUICKSTART = '''
import sys

from tensorpar.vllm import LLM, SamplingParams  # was: from vllm import LLM, SamplingParams

prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)


def main():
    llm = LLM(model=sys.argv[1], tensor_parallel_size=2)
    outputs = llm.generate(prompts, sampling_params)
    for output in outputs:
        prompt = output.prompt
        generated_text = output.outputs[0].text
        print(f"Prompt: {prompt!r}, tokens: {len(output.outputs[0].token_ids)}, Generated text: {generated_text!r}")


if __name__ == "__main__":
    main()
'''


@pytest.mark.timeout(120)
def test_vllms_quickstart_runs_with_its_import_changed(tiny_chat_checkpoint, tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(QUICKSTART)
    r = subprocess.run([sys.executable, str(script), str(tiny_chat_checkpoint)], capture_output=True, text=True,
                       timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and lines[2].startswith("Prompt: 'The capital of France is', tokens: ")
    counts = [int(re.search(r", tokens: (\d+),", ln).group(1)) for ln in lines]
    assert min(counts) >= 1 and max(counts) == 16  # vLLM's default: at most 16 tokens


@pytest.mark.timeout(180)
def test_generate_and_chat_through_the_vllm_api_equal_tensorpars(tiny_chat_checkpoint):
    from tensorpar.vllm import LLM, SamplingParams

    with pytest.raises(TypeError, match="swap_space"):
        LLM(str(tiny_chat_checkpoint), swap_space=4)
    with LLM(str(tiny_chat_checkpoint), tensor_parallel_size=2, enforce_eager=True) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        [out] = llm.generate("The capital of France is", greedy)
        [ours] = llm.llm.generate(["The capital of France is"], max_new_tokens=6, ignore_eos=True)
        assert out.prompt == "The capital of France is" and out.prompt_token_ids == ours.prompt_token_ids
        assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in out.outputs] == [
            (0, ours.text, ours.token_ids, "length")]
        [by_ids] = llm.generate({"prompt_token_ids": ours.prompt_token_ids}, greedy)
        assert by_ids.prompt is None and by_ids.outputs[0].token_ids == ours.token_ids
        [two] = llm.generate(["Once upon a time"], SamplingParams(n=2, seed=3, max_tokens=4))
        assert [o.index for o in two.outputs] == [0, 1] and all(len(o.token_ids) <= 4 for o in two.outputs)
        conversation = [{"role": "user", "content": "Hello"}]
        [chat] = llm.chat(conversation, greedy)
        [ours_chat] = llm.llm.generate(["Hello"], max_new_tokens=6, ignore_eos=True, chat=True)
        assert chat.outputs[0].token_ids == ours_chat.token_ids
        [scored] = llm.generate("The capital of France is", SamplingParams(max_tokens=1, prompt_logprobs=0))
        assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(ours.prompt_token_ids)
        ids = ours.prompt_token_ids
        assert all(set(step) == {t} and step[t].logprob < 0 for t, step in zip(ids[1:], scored.prompt_logprobs[1:]))
        [lp] = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                                       ignore_eos=True))
        first = lp.outputs[0]
        assert first.token_ids == ours.token_ids[:4] and len(first.logprobs) == 4
        for token, step in zip(first.token_ids, first.logprobs):
            assert step[token].rank == 1 and len(step) == 3  # greedy: the chosen token is the most likely
            assert sorted(p.rank for p in step.values()) == [1, 2, 3]
        assert first.cumulative_logprob == pytest.approx(sum(s[t].logprob for t, s in zip(first.token_ids,
                                                                                           first.logprobs)))
        [plain] = llm.generate("The capital of France is", greedy)
        assert plain.outputs[0].logprobs is None


def test_structured_outputs_params_become_tensorpars_guided_decoding():
    from tensorpar.runtime.guided import GuidedDecoding
    from tensorpar.vllm import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

    sp = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert sp.guided == GuidedDecoding("choice", ("yes", "no"))
    sp = SamplingParams(guided_decoding=GuidedDecodingParams(json={"type": "object"}))
    assert sp.guided.kind == "json_schema" and SamplingParams().guided is None
    with pytest.raises(ValueError, match="exactly one"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+", choice=["a"]))
