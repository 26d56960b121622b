"""One engine replica: llama-cpp-python's OpenAI-compatible server, plus the ``/health`` a router probes.

``vllm-router`` waits for ``GET /health`` on every worker before it serves, and
health-checks them there afterwards; vLLM and SGLang answer it, llama-cpp-python's
server does not (404). This runs the same server app (``llama_cpp.server``,
same command-line flags) with that one route added.

Usage::

    python -m apr_cli.scale.replica --model model.gguf --host 127.0.0.1 --port 8001 \\
        --n_ctx 2048 --n_threads 1 --interrupt_requests False --verbose True
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    server = parse_model_from_args(ServerSettings, args)
    app = create_app(server_settings=server, model_settings=[parse_model_from_args(ModelSettings, args)])

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host=os.getenv("HOST", server.host), port=int(os.getenv("PORT", server.port)),
                log_level="info")


if __name__ == "__main__":
    main()
