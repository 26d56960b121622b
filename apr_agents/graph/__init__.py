"""The LangGraph side: state, nodes and ``create_apr_agent``."""

from .agent import create_apr_agent, final_answer
from .chat import create_chat_apr_agent
from .core import APRBackendError
from .state import APRState

__all__ = ["APRBackendError", "APRState", "create_apr_agent", "create_chat_apr_agent", "final_answer"]
