"""lm-evaluation-harness against ``tensorpar serve``: its per-item log-likelihoods against ``LLM.score``.

Starts ``tensorpar serve --tp N`` on the model, runs ``lm_eval --model local-completions`` (batched
token-id prompts, ``echo`` with ``logprobs``) on the offline multiple-choice task in
``benchmarks/lm_eval/`` (32 questions, 4 choices each), and compares every (question, choice)
log-likelihood the harness logged with the one computed here from ``LLM.score`` at the same layout
(and, for information, at one rank):

    .venv/bin/python benchmarks/lm_eval_check.py --lm-eval /tmp/lmeval/bin/lm_eval --tp 2

``--lm-eval``: the ``lm_eval`` executable (``pip install "lm-eval[api]" transformers`` in any
environment: the harness needs no torch for an API model). Prints one JSON object (accuracy, the
largest difference, the seconds) and exits 1 when a difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent / "lm_eval"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval", required=True, help="the lm_eval executable")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tensorpar import LLM
    from tensorpar.loading.open import open_source

    work = Path(tempfile.mkdtemp(prefix="tensorpar-lm-eval-"))
    tokenizer = open_source(args.model).tokenizer()  # a Hugging Face tokenizer, saved for the harness
    tokenizer.save_pretrained(work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "tensorpar_mc.yaml").write_text((HERE / "tensorpar_mc.yaml").read_text()
                                             .replace("MC_JSONL", str((HERE / "mc.jsonl").resolve())))

    exe = Path(sys.executable).with_name("tensorpar")
    server = subprocess.Popen([str(exe), "serve", "--model", args.model, "--tp", str(args.tp), "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        while "serving" not in (line := server.stderr.readline()):
            if not line and server.poll() is not None:
                raise SystemExit("the server did not start")
        port = int(re.search(r":(\d+) ", line).group(1))
        t = time.perf_counter()
        run = subprocess.run(
            [args.lm_eval, "--model", "local-completions", "--model_args",
             f"model={args.model},base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={work / 'tokenizer'},"
             "num_concurrent=1,max_retries=1,tokenized_requests=True", "--batch_size", str(args.batch_size),
             "--tasks", "tensorpar_mc", "--include_path", str(tasks), "--log_samples", "--output_path",
             str(work / "out")],
            capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        seconds = time.perf_counter() - t
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
        return 1
    samples = [json.loads(line) for f in (work / "out").rglob("samples_tensorpar_mc_*.jsonl") for line in open(f)]
    results = json.loads(next((work / "out").rglob("results_*.json")).read_text())["results"]["tensorpar_mc"]

    pairs = []  # (context, continuation, the harness's log-likelihood)
    for s in samples:
        arguments = s["arguments"]
        arguments = ([(a["arg_0"], a["arg_1"]) for a in arguments.values()] if isinstance(arguments, dict)
                     else [(a[0], a[1]) for a in arguments])
        for (context, continuation), resp in zip(arguments, s["resps"]):
            pairs.append((context, continuation, float(resp[0][0])))
    whole = [tokenizer(c + x)["input_ids"] for c, x, _ in pairs]  # as the harness encodes a pair
    ctx = [len(tokenizer(c)["input_ids"]) for c, _, _ in pairs]
    worst = {}
    for tp in dict.fromkeys([args.tp, 1]):  # the server's layout, and one rank
        with LLM(args.model, tp=tp, progress=False) as llm:
            logits = llm.score(whole)
        worst[tp] = 0.0
        for (_, _, got), ids, n, lg in zip(pairs, whole, ctx, logits):
            logp = torch.log_softmax(lg.float(), -1)
            want = sum(float(logp[i - 1, ids[i]]) for i in range(n, len(ids)))
            worst[tp] = max(worst[tp], abs(got - want))
    report = {"model": args.model, "tp": args.tp, "items": len(samples), "log_likelihoods": len(pairs),
              "acc": results.get("acc,none"), "max_abs_diff": worst[args.tp], "max_abs_diff_vs_tp1": worst[1],
              "lm_eval_s": round(seconds, 1)}
    print(json.dumps(report))
    return 0 if worst[args.tp] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
