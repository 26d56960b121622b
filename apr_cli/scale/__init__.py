"""Scale-out: engine replicas behind vllm-router, agent servers sharing PostgreSQL (docs/scale-out.md).

- ``engines``: llama.cpp replicas (``replica``) behind ``vllm-router`` on 127.0.0.1.
- ``workload``: real agent runs over them (the APR graph, Gemma 3 270M).
- ``bench``: prefix-cache hit rate and branch-phase wall time per routing policy; a replica killed.
- ``agents``: PostgreSQL + Redis + stock LangGraph servers with the ``langgraph-runtime-pg`` runtime.
- ``durability``: 100 runs over two servers, one SIGKILLed mid fan-out.

Usage::

    python -m apr_cli.scale.engines --replicas 2 --policy consistent_hash
    python -m apr_cli.scale.bench --runs 12 --kill
    python -m apr_cli.scale.durability --runs 100
"""
