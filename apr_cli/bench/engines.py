"""Suite 3, engine batching: the same K-way spawn on real engines, through the plugin and straight to the engine.

The root context is a stand-in (FAKE): it writes a K-outline spawn block, so
every engine gets exactly K branches whatever the model would have done. Each
branch is the real engine continuing the shared prefix + ``<Thread>i:`` for a
fixed number of tokens (``APRConfig.max_tokens``; the branch's stop strings are
dropped, and the prompt asks for a long list so end of sequence is unlikely;
engines that allow it are told to ignore EOS). Per K, interleaved:

- **plugin, parallel**: the spawn through the graph, branches concurrent;
- **plugin, sequential**: the same spawn with ``parallel=False`` (one after another);
- **raw, at once**: the same branch prompts sent straight to the engine in one
  ``asyncio.gather`` (no graph): what the engine itself does with K requests;
- **raw, one after another**: the same prompts awaited one by one.

The **branch phase** is the time from the first branch call's start to the last
one's end (the root stand-in costs nothing). **plugin ÷ raw** compares the
plugin's parallel branch phase with the raw batch. **Prefix re-evaluated per
fork**: for each branch, the tokens of the prefix all branches share that the
engine evaluated again instead of taking from its cache (needs the engine's
tokenizer; warm: after the untimed warm-up spawn; cold: the cache cleared, the
branches sent at once, so one branch reads the prefix and K-1 forks should not).

Engines: the embedded llama.cpp backend in batched mode
(``LlamaCppBackend(batched=True)``, in process), optionally the serial one
(``embedded-serial``, the one-sequence-at-a-time mode) and, when ``.venv-vllm``
and ``apr_agents.backends.vllm`` exist, vLLM's CPU build in a subprocess of that
environment (``python -m apr_cli.bench.engine_worker``). An engine that is
not available is skipped with the reason.

    python -m apr_cli.bench engines --engines embedded,embedded-serial
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
        self.branch_prompts: list[str] = []
        self.spans: list[tuple[float, float]] = []

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
        t0 = time.perf_counter()
        comp = await self.engine.complete(prompt, stop=[], max_tokens=max_tokens, temperature=0.0, **kwargs)
        self.branch_calls.append(comp)
        self.branch_prompts.append(prompt)
        self.spans.append((t0, time.perf_counter()))
        return comp


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _ignore_eos_kwargs(engine: Any) -> dict[str, Any]:
    return {"ignore_eos": True} if _accepts(engine.complete, "ignore_eos") else {}


def _phase(spans: list[tuple[float, float]]) -> float:
    return max(e for _, e in spans) - min(t for t, _ in spans) if spans else 0.0


def shared_prefix_tokens(engine: Any, prompts: list[str]) -> int | None:
    """Tokens every branch prompt shares (the parent's context), or None without the engine's tokenizer."""
    llama = getattr(engine, "llama", None)
    if llama is None or not prompts:
        return None
    toks = [llama.tokenize(p.encode("utf-8"), add_bos=True, special=True) for p in prompts]
    n = min(len(t) for t in toks)
    i = 0
    while i < n and all(t[i] == toks[0][i] for t in toks):
        i += 1
    return i


def reevaluated_per_branch(shared: int | None, comps: list[Completion]) -> list[int] | None:
    """Per branch: shared-prefix tokens the engine evaluated again (0 = taken from the KV cache)."""
    if shared is None:
        return None
    return [max(0, min(shared, c.prompt_tokens - 1) - (c.cached_prompt_tokens or 0)) for c in comps]


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
    phase = _phase(standin.spans)
    return {"wall_s": wall, "branch_phase_s": phase, "branch_tokens": [c.completion_tokens for c in comps],
            "finish": sorted({c.finish_reason for c in comps}), "generated": gen, "prompt_tokens": prompt,
            "cached_prompt_tokens": cached, "tokens_per_s": gen / phase if phase else None,
            "max_concurrent": state["apr_trace"]["summary"]["max_concurrent_branches"],
            "prompts": standin.branch_prompts, "completions": comps}


async def raw_once(engine: Any, prompts: list[str], tokens: int, together: bool) -> dict[str, Any]:
    """The branch prompts straight to the engine: all at once (one gather) or one after another."""
    kwargs = _ignore_eos_kwargs(engine)
    spans: list[tuple[float, float]] = []

    async def one(p: str) -> Completion:
        t0 = time.perf_counter()
        c = await engine.complete(p, stop=[], max_tokens=tokens, temperature=0.0, **kwargs)
        spans.append((t0, time.perf_counter()))
        return c

    if together:
        comps = list(await asyncio.gather(*[one(p) for p in prompts]))
    else:
        comps = [await one(p) for p in prompts]
    phase = _phase(spans)
    gen = sum(c.completion_tokens for c in comps)
    return {"branch_phase_s": phase, "generated": gen, "tokens_per_s": gen / phase if phase else None,
            "completions": comps}


def _strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("prompts", "completions")}


async def bench_engine(engine: Any, ks: list[int], tokens: int, reps: int,
                       step: Any = None) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        # warm-up per K: this K's shared prefix is then in the engine's prefix cache for every mode alike
        warm = await spawn_once(engine, k, 1, False)
        prompts = warm["prompts"]
        shared = shared_prefix_tokens(engine, prompts)
        cold: list[int] | None = None
        clear = getattr(engine, "clear_cache", None)
        if callable(clear) and shared is not None and k > 1:
            clear()  # cold fork: nothing cached; one branch reads the prefix, the others should fork it
            first = await raw_once(engine, prompts, 1, True)
            per = sorted(reevaluated_per_branch(shared, first["completions"]) or [])
            cold = per[:-1]  # the largest is the branch that read the shared prefix for all
            await spawn_once(engine, k, 1, False)  # warm again
        par, seq, raw, raw_seq = [], [], [], []
        for rep in range(reps):  # interleaved, alternating which mode goes first
            modes = ("plugin", "plugin-seq", "raw", "raw-seq")
            for mode in (modes if rep % 2 == 0 else tuple(reversed(modes))):
                if mode == "plugin":
                    par.append(await spawn_once(engine, k, tokens, True))
                elif mode == "plugin-seq":
                    seq.append(await spawn_once(engine, k, tokens, False))
                elif mode == "raw":
                    raw.append(await raw_once(engine, prompts, tokens, True))
                else:
                    raw_seq.append(await raw_once(engine, prompts, tokens, False))
                if step:
                    step(f"K={k} {mode}")
        pw, sw = min(r["branch_phase_s"] for r in par), min(r["branch_phase_s"] for r in seq)
        rw, rsw = min(r["branch_phase_s"] for r in raw), min(r["branch_phase_s"] for r in raw_seq)
        warm_re = [x for r in par for x in (reevaluated_per_branch(shared, r["completions"]) or [])]
        rows.append({
            "k": k, "tokens_per_branch": tokens, "reps": reps,
            "parallel_wall_s": min(r["wall_s"] for r in par), "sequential_wall_s": min(r["wall_s"] for r in seq),
            "parallel_phase_s": pw, "sequential_phase_s": sw, "raw_phase_s": rw, "raw_sequential_phase_s": rsw,
            "speedup": sw / pw if pw else None, "raw_speedup": rsw / rw if rw else None,
            "plugin_over_raw": pw / rw if rw else None,
            "parallel_wall_median_s": median([r["wall_s"] for r in par]),
            "sequential_wall_median_s": median([r["wall_s"] for r in seq]),
            "parallel_tokens_per_s": max(r["tokens_per_s"] or 0.0 for r in par),
            "sequential_tokens_per_s": max(r["tokens_per_s"] or 0.0 for r in seq),
            "raw_tokens_per_s": max(r["tokens_per_s"] or 0.0 for r in raw),
            "generated_per_branch": [min(r["branch_tokens"] or [0]) for r in par + seq],
            "finish": sorted({f for r in par + seq for f in r["finish"]}),
            "prefix_cache_hit": (sum(r["cached_prompt_tokens"] for r in par)
                                 / max(1, sum(r["prompt_tokens"] for r in par))),
            "prefix_cache_hit_sequential": (sum(r["cached_prompt_tokens"] for r in seq)
                                            / max(1, sum(r["prompt_tokens"] for r in seq))),
            "shared_prefix_tokens": shared,
            "reevaluated_per_fork_warm": (sum(warm_re) / len(warm_re)) if warm_re else None,
            "reevaluated_per_fork_cold": (sum(cold) / len(cold)) if cold else (0.0 if cold == [] else None),
            "max_concurrent": max(r["max_concurrent"] for r in par),
            "runs": {"parallel": [_strip(r) for r in par], "sequential": [_strip(r) for r in seq],
                     "raw": [_strip(r) for r in raw], "raw_sequential": [_strip(r) for r in raw_seq]},
        })
    return rows


# -- engines ---------------------------------------------------------------------------
def embedded_rows(ks: list[int], tokens: int, reps: int, bar: Bar,
                  batched: bool = True) -> tuple[list[dict[str, Any]], str]:
    from apr_agents.backends import default_backend

    engine = default_backend(batched=True, n_seq_max=max(8, *ks)) if batched else default_backend(batched=False)
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


def _fmt(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def run(quick: bool = False, out_dir: Path | None = None, engines: tuple[str, ...] = ("embedded", "vllm")
        ) -> SuiteResult:
    res = SuiteResult("engines", "Engine batching: K-way spawn through the plugin and straight to the engine",
                      quick)
    t0 = time.perf_counter()
    ks = [1, 2, 4, 8]
    tokens = 8 if quick else 32
    reps = 1 if quick else 2
    if quick and "vllm" not in engines:
        res.skipped.append("vllm: not run with --quick (its engine takes over a minute to start on 2 cores); "
                           "run the full suite or pass --engines embedded,vllm")
    results: dict[str, dict[str, Any]] = {}
    per_engine = len(ks) * reps * 4
    with Bar("engines", per_engine * len(engines)) as bar:
        for name in engines:
            bar.note(f"{name}: starting")
            try:
                if name in ("embedded", "embedded-serial"):
                    rows, desc = embedded_rows(ks, tokens, reps, bar, batched=name == "embedded")
                elif name == "vllm":
                    rows, desc = vllm_rows(ks, tokens, reps, timeout_s=240 if quick else 900)
                    bar.step(name, per_engine)
                else:
                    raise ValueError(f"unknown engine {name!r} (embedded, embedded-serial, vllm)")
                results[name] = {"engine": desc, "rows": rows}
            except Exception as exc:  # noqa: BLE001 - an engine that cannot run is skipped, with the reason
                reason = f"{name}: {type(exc).__name__}: {exc}"
                res.skipped.append(reason)
                print(f"engines: skipped {reason}", file=sys.stderr)
                bar.step(f"{name} skipped", per_engine)
    res.data = {"ks": ks, "tokens_per_branch": tokens, "reps": reps, "question": QUESTION, "engines": results}
    parts = [
        f"The same K-way spawn on each engine, {tokens} tokens per branch (`max_tokens`, stop strings dropped), "
        f"best of {reps} run(s) per mode (the least disturbed by other load on the machine), the four modes "
        "interleaved in alternating order after one untimed warm-up spawn per K (so all find the shared prefix "
        "in the prefix cache). The root is a FAKE stand-in that writes the spawn block; only branch work reaches "
        "the engine and is counted. Times are the **branch phase** (first branch call's start to last one's end). "
        "**plugin par / seq**: the spawn through the graph with `parallel=True` / `False`; **raw at once / one by "
        "one**: the same branch prompts straight to the engine (`asyncio.gather` / awaited in turn). **speedup** = "
        "plugin seq / plugin par (1.0 = the engine gains nothing from concurrent branches; K = ideal batching). "
        "**plugin ÷ raw** = plugin par / raw at once (1.0 = the plugin adds nothing). **prefix re-evaluated per "
        "fork**: shared-prefix tokens a branch evaluated again instead of taking them from the KV cache (warm: "
        "the timed plugin runs; cold: cache cleared, branches sent at once, the one branch that read the prefix "
        "not counted; n/a: the engine does not expose its tokenizer).", ""]
    for name, r in results.items():
        parts += [f"### {name}: `{r['engine']}`", "", md_table(
            ["K", "plugin par s", "plugin seq s", "speedup", "raw at once s", "raw one by one s", "plugin ÷ raw",
             "tokens/s par", "min tokens per branch", "finish", "shared prefix tokens",
             "prefix re-evaluated per fork (warm / cold)", "prefix-cache hit par", "max concurrent"],
            [[x["k"], x["parallel_phase_s"], x["sequential_phase_s"], x["speedup"], x.get("raw_phase_s"),
              x.get("raw_sequential_phase_s"), x.get("plugin_over_raw"), x["parallel_tokens_per_s"],
              min(x["generated_per_branch"]), ", ".join(x["finish"]), x.get("shared_prefix_tokens"),
              f"{_fmt(x.get('reevaluated_per_fork_warm'), 1)} / {_fmt(x.get('reevaluated_per_fork_cold'), 1)}",
              f"{x['prefix_cache_hit']:.2f}", x["max_concurrent"]]
             for x in r["rows"]]), ""]
        by_k = {x["k"]: x for x in r["rows"]}
        if name == "embedded" and 4 in by_k:
            sp = by_k[4]["speedup"]
            res.goal("embedded: K=4 branch phase, one after another ÷ batched", sp, ">= 2.5",
                     None if sp is None else sp >= 2.5)
        for k in (2, 4, 8):
            ratio = by_k.get(k, {}).get("plugin_over_raw")
            if ratio is not None:
                res.goal(f"{name}: K={k} plugin ÷ raw engine", ratio, "<= 1.15", ratio <= 1.15)
        re_warm = [x.get("reevaluated_per_fork_warm") for x in r["rows"] if x["k"] > 1]
        re_cold = [x.get("reevaluated_per_fork_cold") for x in r["rows"] if x["k"] > 1]
        if any(v is not None for v in re_warm + re_cold):
            worst = max(v for v in re_warm + re_cold if v is not None)
            res.goal(f"{name}: prefix tokens re-evaluated per fork (worst K, warm or cold)", worst, "0",
                     worst == 0)
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
        if all(x.get("raw_tokens_per_s") for x in r["rows"]):
            ax.plot(ks, [x["raw_tokens_per_s"] for x in r["rows"]], "x:", label=f"{name}, raw at once")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("branches K")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Engine throughput: K-way spawn")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
