"""Runtime pieces shared by the graph: limits, tool execution and the trace."""

from .limits import Limiter, ThreadBudget
from .trace import critical_path_tokens, max_concurrent, merge_traces, summarize

__all__ = ["Limiter", "ThreadBudget", "critical_path_tokens", "max_concurrent", "merge_traces", "summarize"]
