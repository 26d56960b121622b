"""The APR agent as a LangGraph server graph (``langgraph dev --config graphs/langgraph.json``).

Backend, model, tools and limits come from ``APR_*`` environment variables
(``apr_agents.graph.deploy``; docs/deployment.md). With none set it serves the
embedded CPU model with the demo tools.
"""

from apr_agents.graph.deploy import graph_from_env

graph = graph_from_env()
