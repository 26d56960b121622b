"""The simulated engine cost shared by the plugin's FAKE text backend and the FAKE chat model.

One cost model for every contestant of the tool-bound suite, so the comparison
is fair: each backend call costs

    call_latency_s + prefill_s_per_token * (prompt tokens not in the prefix cache)
                   + decode_s_per_token  * (generated tokens, slept one by one as they stream)

Tokens are the whitespace pieces of ``apr_agents.testing.scripted.tokenize``.
The prefix cache is exact (longest common prefix with any earlier prompt of the
same engine instance, like vLLM's automatic prefix caching); the engine is
assumed to batch without slowing down (each concurrent sequence decodes at the
single-sequence speed), which is what the engine-batching suite checks on real
engines.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from ..backends.base import Completion
from .scripted import ScriptedBackend


@dataclass(frozen=True)
class CostModel:
    call_latency_s: float = 0.02  # fixed cost per request (scheduling, first-token overhead)
    prefill_s_per_token: float = 0.0002  # 5,000 uncached prompt tokens per second
    decode_s_per_token: float = 0.01  # 100 generated tokens per second per sequence

    def describe(self) -> str:
        return (f"{self.call_latency_s * 1000:.0f} ms per call + {self.prefill_s_per_token * 1e6:.0f} µs per "
                f"uncached prompt token + {self.decode_s_per_token * 1000:.0f} ms per generated token")

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


class PrefixCache:
    """Exact longest-common-prefix over the prompts seen so far (characters)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def lookup_and_insert(self, prompt: str) -> int:
        best = 0
        for p in self.prompts:
            if len(p) <= best:
                continue
            n = min(len(p), len(prompt))
            if p[:n] == prompt[:n]:
                best = max(best, n)
                continue
            lo, hi = best, n  # binary search the first difference
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if p[:mid] == prompt[:mid]:
                    lo = mid
                else:
                    hi = mid - 1
            best = max(best, lo)
        self.prompts.append(prompt)
        return best


class MeteredScriptedBackend(ScriptedBackend):
    """FAKE ``ScriptedBackend`` whose latency follows a ``CostModel`` and is metered per context.

    ``nominal[path]`` adds up, per context path (``""`` root, ``"3"`` branch 3),
    what the cost model charges: the zero-overhead time of that context's model calls.
    """

    def __init__(self, script: Any, cost: CostModel, **kw: Any) -> None:
        super().__init__(script, call_latency_s=cost.call_latency_s, token_latency_s=cost.decode_s_per_token,
                         prefill_latency_s=cost.prefill_s_per_token, **kw)
        self.cost = cost
        self.cache = PrefixCache()
        self.nominal: dict[str, float] = defaultdict(float)
        self.generated: dict[str, int] = defaultdict(int)
        self.calls_log: list[tuple[str, float, int]] = []  # (path, prefill s, generated tokens) per call
        self.uncached_prompt_tokens = 0
        self.prompt_tokens_total = 0
        self._prefill_of: dict[int, float] = {}

    async def _prefill_delay(self, prompt: str, n_tokens: int) -> None:
        cached = self.cache.lookup_and_insert(prompt)
        new_tokens = n_tokens * (len(prompt) - cached) / max(1, len(prompt))
        delay = self.cost.call_latency_s + self.cost.prefill_s_per_token * new_tokens
        self.uncached_prompt_tokens += round(new_tokens)
        self.prompt_tokens_total += n_tokens
        self._prefill_of[id(prompt)] = delay
        if delay:
            await asyncio.sleep(delay)

    async def stream(self, prompt: str, *, stop: list[str], max_tokens: int,
                     temperature: float = 0.0) -> AsyncIterator[str | Completion]:
        path = self.context_of(prompt)[0]
        async for item in super().stream(prompt, stop=stop, max_tokens=max_tokens, temperature=temperature):
            if isinstance(item, Completion):
                prefill = self._prefill_of.pop(id(prompt), 0.0)
                self.nominal[path] += prefill + item.completion_tokens * self.cost.decode_s_per_token
                self.generated[path] += item.completion_tokens
                self.calls_log.append((path, prefill, item.completion_tokens))
            yield item
