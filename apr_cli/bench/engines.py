"""Suite 3, engine batching: the same K-way spawn on real engines, branches in parallel vs one after another.

The root context is a stand-in (FAKE): it writes a K-outline spawn block, so
every engine gets exactly K branches whatever the model would have done. Each
branch is the real engine continuing the shared prefix + ``<Thread>i:`` for a
fixed number of tokens (``APRConfig.max_tokens``; the branch's stop strings are
dropped, and the prompt asks for a long list so end of sequence is unlikely;
engines that allow it are told to ignore EOS). The plugin runs the spawn twice
per K, interleaved: ``parallel=True`` (branches concurrent) and
``parallel=False`` (branches one after another = the sum of sequential runs).

Engines: the embedded llama.cpp default (in process) and, when ``.venv-vllm``
and ``apr_agents.backends.vllm`` exist, vLLM's CPU build in a subprocess of that
environment (``python -m apr_cli.bench.engine_worker``). An engine that is
not available is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from apr_agents.backends.base import Completion
from apr_agents.config import APRConfig
from apr_agents.graph.agent import create_apr_agent
from apr_agents.protocol.parser import StreamParser

from .common import Bar, SuiteResult, md_table, median, new_figure, save_figure

REPO = Path(__file__).resolve().parents[2]
QUESTION = "Write the numbers from 1 to 2000 in words, separated by commas, and nothing else."


class SpawnStandIn:
    """FAKE root over a real engine: the root writes a fixed K-way spawn; branches go to the engine.

    Root calls cost nothing and count no tokens (they are not engine work);
    branch calls go to ``engine`` with their stop strings dropped, so only
    ``max_tokens`` (or an end of sequence the engine would not ignore) ends them.
    """

    def __init__(self, engine: Any, k: int, ignore_eos: bool = True) -> None:
        self.engine = engine
        self.k = k
        self.ignore_eos = ignore_eos
        outlines = "".join(f"<Outline>{i}: numbers, part {i}</Outline>\n" for i in range(1, k + 1))
        self.spawn = f"I split the list into {k} parts.\n<Parallel>\n<Outlines>\n{outlines}"  # + stop
        self.branch_calls: list[Completion] = []

    def render(self, messages: list[Any], tools: list[dict[str, Any]]) -> str:
        return self.engine.render(messages, tools)

    async def complete(self, prompt: str, *, stop: list[str], max_tokens: int,
                       temperature: float = 0.0) -> Completion:
        p = StreamParser("canonical")
        p.feed(prompt[prompt.rfind("I split the list into"):] if "I split the list into" in prompt else "")
        if not p.open_threads():  # the root context
            if "</Parallel>" in prompt[-40:]:
                return Completion(text="Done.", stop=None, finish_reason="eos")
            return Completion(text=self.spawn, stop="</Outlines>", finish_reason="stop")
        kwargs: dict[str, Any] = {}
        if self.ignore_eos and _accepts(self.engine.complete, "ignore_eos"):
            kwargs["ignore_eos"] = True
        comp = await self.engine.complete(prompt, stop=[], max_tokens=max_tokens, temperature=0.0, **kwargs)
        self.branch_calls.append(comp)
        return comp


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


async def spawn_once(engine: Any, k: int, tokens: int, parallel: bool) -> dict[str, Any]:
    standin = SpawnStandIn(engine, k)
    cfg = APRConfig(max_threads=max(8, k), max_tokens=tokens, parallel=parallel, llm_concurrency=max(16, k),
                    thread_timeout_s=3600, backend_attempts=1)
    graph = create_apr_agent(standin, [], cfg)
    t0 = time.perf_counter()
    state = await graph.ainvoke({"messages": [HumanMessage(QUESTION)]})
    wall = time.perf_counter() - t0
    comps = standin.branch_calls
    gen = sum(c.completion_tokens for c in comps)
    prompt = sum(c.prompt_tokens for c in comps)
    cached = sum(c.cached_prompt_tokens or 0 for c in comps)
    return {"wall_s": wall, "branch_tokens": [c.completion_tokens for c in comps],
            "finish": sorted({c.finish_reason for c in comps}), "generated": gen, "prompt_tokens": prompt,
            "cached_prompt_tokens": cached, "tokens_per_s": gen / wall if wall else None,
            "max_concurrent": state["apr_trace"]["summary"]["max_concurrent_branches"]}


async def bench_engine(engine: Any, ks: list[int], tokens: int, reps: int,
                       step: Any = None) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        # warm-up per K: this K's shared prefix is then in the engine's prefix cache for both modes alike
        await spawn_once(engine, k, 1, False)
        par, seq = [], []
        for rep in range(reps):  # interleaved, alternating which mode goes first
            for parallel in ((True, False) if rep % 2 == 0 else (False, True)):
                (par if parallel else seq).append(await spawn_once(engine, k, tokens, parallel))
                if step:
                    step(f"K={k} {'parallel' if parallel else 'sequential'}")
        pw, sw = min(r["wall_s"] for r in par), min(r["wall_s"] for r in seq)
        rows.append({
            "k": k, "tokens_per_branch": tokens, "reps": reps,
            "parallel_wall_s": pw, "sequential_wall_s": sw, "speedup": sw / pw if pw else None,
            "parallel_wall_median_s": median([r["wall_s"] for r in par]),
            "sequential_wall_median_s": median([r["wall_s"] for r in seq]),
            "parallel_tokens_per_s": max(r["tokens_per_s"] or 0.0 for r in par),
            "sequential_tokens_per_s": max(r["tokens_per_s"] or 0.0 for r in seq),
            "generated_per_branch": [min(r["branch_tokens"] or [0]) for r in par + seq],
            "finish": sorted({f for r in par + seq for f in r["finish"]}),
            "prefix_cache_hit": (sum(r["cached_prompt_tokens"] for r in par)
                                 / max(1, sum(r["prompt_tokens"] for r in par))),
            "prefix_cache_hit_sequential": (sum(r["cached_prompt_tokens"] for r in seq)
                                            / max(1, sum(r["prompt_tokens"] for r in seq))),
            "max_concurrent": max(r["max_concurrent"] for r in par),
            "runs": {"parallel": par, "sequential": seq},
        })
    return rows


# -- engines ---------------------------------------------------------------------------
def embedded_rows(ks: list[int], tokens: int, reps: int, bar: Bar) -> tuple[list[dict[str, Any]], str]:
    from apr_agents.backends import default_backend

    engine = default_backend()
    try:
        rows = asyncio.run(bench_engine(engine, ks, tokens, reps, bar.step))
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    return rows, repr(engine)


def vllm_python() -> Path | None:
    env = os.environ.get("APR_VLLM_PYTHON")
    if env:
        return Path(env)
    p = REPO / ".venv-vllm" / "bin" / "python"
    return p if p.exists() else None


def vllm_rows(ks: list[int], tokens: int, reps: int, timeout_s: float) -> tuple[list[dict[str, Any]], str]:
    py = vllm_python()
    if py is None:
        raise RuntimeError("no vLLM environment (.venv-vllm/bin/python; `make setup-vllm` builds it, or set "
                           "APR_VLLM_PYTHON)")
    if not (REPO / "apr_agents" / "backends" / "vllm.py").exists():
        raise RuntimeError("apr_agents.backends.vllm (VLLMBackend) is not in this tree yet")
    cmd = [str(py), "-m", "apr_cli.bench.engine_worker", "--engine", "vllm", "--ks", ",".join(map(str, ks)),
           "--tokens", str(tokens), "--reps", str(reps)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"vLLM worker did not finish within {timeout_s:.0f} s") from None
    out = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not out:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"vLLM worker failed (exit {proc.returncode}): {' | '.join(tail)}")
    payload = json.loads(out[-1])
    if payload.get("error"):
        raise RuntimeError(payload["error"])
    desc = payload.get("engine", "vLLM")
    if payload.get("start_s") is not None:
        desc += f"`, engine start {payload['start_s']:.0f} s, `enforce_eager={os.environ.get('APR_BENCH_VLLM_EAGER', '1') != '0'}"
    return payload["rows"], desc


def run(quick: bool = False, out_dir: Path | None = None, engines: tuple[str, ...] = ("embedded", "vllm")
        ) -> SuiteResult:
    res = SuiteResult("engines", "Engine batching: K-way spawn on real engines, parallel vs sequential", quick)
    t0 = time.perf_counter()
    ks = [1, 2, 4, 8]
    tokens = 8 if quick else 32
    reps = 1 if quick else 2
    if quick and "vllm" not in engines:
        res.skipped.append("vllm: not run with --quick (its engine takes over a minute to start on 2 cores); "
                           "run the full suite or pass --engines embedded,vllm")
    results: dict[str, dict[str, Any]] = {}
    with Bar("engines", len(ks) * reps * 2 * len(engines)) as bar:
        for name in engines:
            bar.note(f"{name}: starting")
            try:
                if name == "embedded":
                    rows, desc = embedded_rows(ks, tokens, reps, bar)
                else:
                    rows, desc = vllm_rows(ks, tokens, reps, timeout_s=240 if quick else 900)
                    bar.step(name, len(ks) * reps * 2)
                results[name] = {"engine": desc, "rows": rows}
            except Exception as exc:  # noqa: BLE001 - an engine that cannot run is skipped, with the reason
                reason = f"{name}: {type(exc).__name__}: {exc}"
                res.skipped.append(reason)
                print(f"engines: skipped {reason}", file=sys.stderr)
                bar.step(f"{name} skipped", len(ks) * reps * 2)
    res.data = {"ks": ks, "tokens_per_branch": tokens, "reps": reps, "question": QUESTION, "engines": results}
    parts = [
        f"The same K-way spawn on each engine, {tokens} tokens per branch (`max_tokens`, stop strings dropped), "
        f"best of {reps} run(s) (the least disturbed by other load on the machine), parallel and sequential runs "
        "interleaved in alternating order after one untimed warm-up spawn per K (so both find the shared prefix "
        "in the prefix cache). The root is a FAKE stand-in that "
        "writes the spawn block; only branch work reaches the engine and is counted. **speedup** = sequential "
        "wall / parallel wall (1.0 = the engine gains nothing from concurrent branches; K = ideal batching). "
        "**prefix-cache hit** = cached / total prompt tokens of the branch calls, as the engine reports them.", ""]
    for name, r in results.items():
        parts += [f"### {name}: `{r['engine']}`", "", md_table(
            ["K", "parallel wall s (best)", "sequential wall s (best)", "speedup", "tokens/s parallel", "tokens/s sequential",
             "min tokens per branch", "finish", "prefix-cache hit (parallel / sequential)", "max concurrent"],
            [[x["k"], x["parallel_wall_s"], x["sequential_wall_s"], x["speedup"], x["parallel_tokens_per_s"],
              x["sequential_tokens_per_s"], min(x["generated_per_branch"]), ", ".join(x["finish"]),
              f"{x['prefix_cache_hit']:.2f} / {x['prefix_cache_hit_sequential']:.2f}", x["max_concurrent"]]
             for x in r["rows"]]), ""]
        best = max(r["rows"], key=lambda x: x["k"])
        res.goal(f"{name}: K={best['k']} parallel vs sequential", best["speedup"], "> 1 (batching helps)",
                 None if best["speedup"] is None else best["speedup"] > 1.1,
                 "llama.cpp decodes one sequence at a time" if name == "embedded" else "")
    if not results:
        parts.append("No engine was available in this run (see Skipped).")
    res.markdown = "\n".join(parts)
    if out_dir is not None and results:
        res.plot = _plot(results, out_dir / f"engines{'-quick' if quick else ''}.png")
    res.seconds = time.perf_counter() - t0
    return res


def _plot(results: dict[str, Any], path: Path) -> str | None:
    made = new_figure(path, (6.0, 3.6))
    if made is None:
        return None
    fig, ax = made
    for name, r in results.items():
        ks = [x["k"] for x in r["rows"]]
        ax.plot(ks, [x["parallel_tokens_per_s"] for x in r["rows"]], "o-", label=f"{name}, parallel")
        ax.plot(ks, [x["sequential_tokens_per_s"] for x in r["rows"]], "s--", label=f"{name}, sequential")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("branches K")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Engine throughput: K-way spawn")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
