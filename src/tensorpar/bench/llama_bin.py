"""The current llama.cpp build's own tools as peers: ``llama-bench``, ``llama-quantize`` and
``llama-server`` (``make peers`` builds them into ``.peers/llama.cpp/bin``:
``benchmarks/build_llama_cpp.sh``). ``tensorpar bench``, ``benchmarks/decode_vs_llama_cpp.py``
and ``benchmarks/serving.py`` find and run them through this module.

- Where: ``$TENSORPAR_LLAMA_CPP`` (a directory holding the binaries; ``$TENSORPAR_LLAMA_CPP_BIN``
  is read too), else ``.peers/llama.cpp/bin`` under this checkout's root, else under the current
  directory (``find_bin_dir``). When the variable is set, only its directory is looked in.
- Weight types: a type other than the file's own is written once by
  ``llama-quantize --allow-requantize SRC OUT TYPE`` into ``<cache>/llama.cpp/`` (``$TENSORPAR_CACHE_DIR``,
  else ``~/.cache/tensorpar``), beside a small ``.source.json`` naming the file it came from; it is
  written again only when that file changed (``converted``).
- ``llama-bench -m FILE -p P -n N -t T -r R -o json`` runs a prefill test of P tokens (``-p 0``:
  none) and a decode test of N tokens (``-n 0``: none), each R times after a warm-up; its JSON is a
  list with one entry per test (``parse_llama_bench``; ``decode_ms`` / ``prefill_tokens_per_s``).
- ``LlamaServer``: ``llama-server`` on a loopback port, ready once ``/health`` answers 200, stopped
  (SIGTERM, then SIGKILL) on leaving the ``with`` block, by an error or Ctrl-C too.

Every command runs under a timeout (``processes.run_with_timeout``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

LABEL = "llama.cpp (current build)"
ENV = "TENSORPAR_LLAMA_CPP"
ENV_OLD = "TENSORPAR_LLAMA_CPP_BIN"  # the name benchmarks/decode_vs_llama_cpp.py read first
PEERS_BIN = Path(".peers") / "llama.cpp" / "bin"
HOW_TO_GET = (f"run `make peers` in a tensorpar checkout (builds llama-bench, llama-server and llama-quantize into "
              f"{PEERS_BIN}, about 15 minutes) or set {ENV} to a directory that holds them")


def repo_root() -> Path:
    """The checkout this module lies in (src/tensorpar/bench/ -> root); meaningless when installed."""
    return Path(__file__).resolve().parents[3]


def candidate_dirs(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> list[Path]:
    """The directories looked in, in order (see the module's docstring)."""
    env = os.environ if env is None else env
    given = env.get(ENV) or env.get(ENV_OLD)
    if given:
        return [Path(given).expanduser()]
    dirs = [repo_root() / PEERS_BIN, (Path.cwd() if cwd is None else cwd) / PEERS_BIN]
    return list(dict.fromkeys(d.resolve() if d.exists() else d for d in dirs))


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_bin_dir(tool: str = "llama-bench", env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> Path | None:
    """The first candidate directory holding an executable ``tool``, or None."""
    return next((d for d in candidate_dirs(env, cwd) if _runnable(d / tool)), None)


def absent_message(tool: str = "llama-bench", env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """The one line that says ``tool`` was not found, where it was looked for, and how to get it."""
    where = " or ".join(str(d) for d in candidate_dirs(env, cwd))
    return f"{LABEL}: no {tool} in {where}; {HOW_TO_GET}"


def file_type(path: Path) -> str | None:
    """A GGUF file's own weight type as llama.cpp names it (``general.file_type``: "Q4_1", "F32",
    "Q4_K_M"), or None when the file does not say."""
    import gguf

    from tensorpar.loading.gguf_file import GGUFFile

    code = GGUFFile(path).metadata.get("general.file_type")
    try:
        name = gguf.LlamaFileType(int(code)).name
    except (TypeError, ValueError):
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def cache_dir() -> Path:
    from tensorpar.loading.tokenizer_cache import default_cache_dir

    return default_cache_dir() / "llama.cpp"


def converted_path(source: Path, kind: str, cache: Path) -> Path:
    return cache / f"{source.stem}.{kind}.gguf"


def quantize_command(bin_dir: Path, source: Path, out: Path, kind: str, threads: int) -> list[str]:
    return [str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(out), kind, str(threads)]


def _source_record(source: Path) -> dict:
    st = source.stat()
    return {"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted(bin_dir: Path, source: Path, kind: str, cache: Path | None = None, threads: int | None = None,
              timeout_s: float = 900.0, log: Callable[[str], None] | None = None) -> Path:
    """``source`` written as ``kind`` by ``llama-quantize``, once: the file in ``cache`` is reused
    while its ``.source.json`` matches ``source`` (path, size, modification time)."""
    from tensorpar.bench.processes import run_with_timeout

    source = Path(source)
    cache = cache_dir() if cache is None else Path(cache)
    out = converted_path(source, kind, cache)
    record = out.with_name(out.name + ".source.json")
    want = _source_record(source)
    try:
        if out.is_file() and json.loads(record.read_text()) == want:
            return out
    except (OSError, ValueError):
        pass
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if log:
        log(f"writing {source.name} as {kind} with llama-quantize into {out} (once: later runs reuse it)")
    t0 = time.perf_counter()
    code, _, err = run_with_timeout(quantize_command(bin_dir, source, tmp, kind, threads or os.cpu_count() or 1),
                                    timeout_s)
    if code != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        why = f"timed out after {timeout_s:.0f} s" if code is None else _last_line(err) or f"exit code {code}"
        raise RuntimeError(f"llama-quantize could not write {source.name} as {kind}: {why}")
    tmp.replace(out)
    record.write_text(json.dumps(want))
    if log:
        log(f"wrote {out.name} ({out.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def bench_command(bin_dir: Path, model: Path, threads: int, new_tokens: int, prompt_len: int = 0,
                  repeats: int = 1) -> list[str]:
    """``llama-bench`` for a prefill test of ``prompt_len`` tokens (0: none) and a decode test of
    ``new_tokens`` (0: none) on ``model``, at ``threads``, each ``repeats`` times, as JSON."""
    return [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(prompt_len), "-n", str(new_tokens),
            "-t", str(threads), "-r", str(repeats), "-o", "json"]


def parse_llama_bench(text: str) -> list[dict]:
    """The test entries of ``llama-bench -o json``'s output (anything printed before the list is
    skipped)."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON list in llama-bench's output")
    entries = json.JSONDecoder().raw_decode(text[start:])[0]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "avg_ts" in e for e in entries):
        raise ValueError("llama-bench's JSON is not a list of tests with avg_ts")
    return entries


def _test(entries: list[dict], decode: bool) -> dict | None:
    return next((e for e in entries if (e.get("n_gen", 0) > 0) == decode and (e.get("n_prompt", 0) > 0) != decode),
                None)


def _best_ts(e: dict, tokens: int) -> tuple[float, int]:
    """The fastest repetition's tokens/s, from its nanoseconds where given (``samples_ts`` is
    rounded to 4 decimals), and the number of repetitions."""
    if e.get("samples_ns"):
        return tokens * 1e9 / min(e["samples_ns"]), len(e["samples_ns"])
    samples = e.get("samples_ts") or [e["avg_ts"]]
    return max(samples), len(samples)


def decode_ms(entries: list[dict]) -> dict | None:
    """The decode test's ms/token: ``best`` (its fastest repetition, as ``tensorpar bench`` takes
    the best of its repeats) and ``mean`` (1000 / ``avg_ts``), or None without a decode test."""
    e = _test(entries, decode=True)
    if e is None:
        return None
    best, n = _best_ts(e, e["n_gen"])
    return {"best": 1e3 / best, "mean": 1e3 / e["avg_ts"], "tokens": e["n_gen"], "repetitions": n}


def prefill_tokens_per_s(entries: list[dict]) -> dict | None:
    """The prefill test's tokens/s, ``best`` and ``mean`` (``avg_ts``), or None without one."""
    e = _test(entries, decode=False)
    if e is None:
        return None
    best, n = _best_ts(e, e["n_prompt"])
    return {"best": best, "mean": e["avg_ts"], "tokens": e["n_prompt"], "repetitions": n}


def build_of(entries: list[dict]) -> str | None:
    e = entries[0] if entries else {}
    return f"{e['build_commit']} (build {e.get('build_number')})" if e.get("build_commit") else None


def run_llama_bench(bin_dir: Path, model: Path, threads: int, new_tokens: int, prompt_len: int = 0, repeats: int = 1,
                    timeout_s: float = 600.0) -> list[dict]:
    """Run ``llama-bench`` (``bench_command``) and return its entries; a failure raises with its reason."""
    from tensorpar.bench.processes import run_with_timeout

    code, out, err = run_with_timeout(bench_command(bin_dir, model, threads, new_tokens, prompt_len, repeats),
                                      timeout_s)
    if code is None:
        raise RuntimeError(f"llama-bench timed out after {timeout_s:.0f} s")
    if code != 0:
        raise RuntimeError(f"llama-bench failed (exit code {code}): {_last_line(err) or 'no output'}")
    return parse_llama_bench(out)


def server_command(bin_dir: Path, model: Path, threads: int, port: int, parallel: int = 16, ctx_per_slot: int = 2048,
                   alias: str | None = None, extra: list[str] = ()) -> list[str]:
    """``llama-server`` on 127.0.0.1:``port`` with ``parallel`` slots of ``ctx_per_slot`` positions,
    continuous batching, and no prompt cache (``tensorpar serve`` is measured with
    ``--no-prefix-caching``: the benchmark's prompts repeat and each is meant to be computed)."""
    cmd = [str(bin_dir / "llama-server"), "-m", str(model), "-t", str(threads), "-np", str(parallel), "-cb",
           "-c", str(parallel * ctx_per_slot), "--port", str(port), "--host", "127.0.0.1", "--no-cache-prompt",
           "--no-webui"]
    if alias:
        cmd += ["-a", alias]
    return cmd + list(extra)


class LlamaServer:
    """``with LlamaServer(cmd, port, log_path) as base_url:`` starts ``llama-server`` (its output to
    ``log_path``), waits until ``/health`` answers 200 (raising if it exits or ``start_timeout_s``
    passes first), and stops it on leaving: SIGTERM to its process group, SIGKILL after
    ``stop_timeout_s``."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, start_timeout_s: float = 120.0,
                 stop_timeout_s: float = 10.0):
        self.cmd, self.port, self.log_path = cmd, port, Path(log_path)
        self.start_timeout_s, self.stop_timeout_s = start_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> str:
        self.start()
        return self.base_url

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with code {self.proc.returncode} before it was ready: "
                                       f"{self._log_tail()} (log: {self.log_path})")
                try:
                    if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server was not ready after {self.start_timeout_s:.0f} s "
                                       f"(log: {self.log_path})")
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int | None:
        """Stop the server (and anything it started); its exit code, None if it never ran."""
        p, self.proc = self.proc, None
        if p is None:
            return None
        for sig, wait_s in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 10.0)):
            if p.poll() is not None:
                break
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                p.send_signal(sig)
            try:
                p.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        return p.poll()

    def _log_tail(self) -> str:
        try:
            return _last_line(self.log_path.read_text(errors="replace"))
        except OSError:
            return "no log"
