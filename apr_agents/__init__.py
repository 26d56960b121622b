"""apr-agents: adaptive parallel reasoning for LangGraph agents."""

from .backends import Backend, Completion, ScriptedBackend, default_backend
from .config import APRConfig
from .graph import APRBackendError, APRState, create_apr_agent, create_chat_apr_agent

__all__ = [
    "APRBackendError", "APRConfig", "APRState", "Backend", "Completion", "ScriptedBackend",
    "create_apr_agent", "create_chat_apr_agent", "default_backend",
]
__version__ = "0.1.0"
