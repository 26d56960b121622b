"""The APR agent as one node of your own LangGraph graph.

A user graph on ``MessagesState``: a router node, then the APR agent (which may
fork into parallel branches inside), then a node that post-processes the answer.
Runs on the FAKE scripted backend so it finishes instantly; swap in
``default_backend()`` for the embedded model.

    python examples/user_graph_node.py
"""

from __future__ import annotations

import asyncio

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from apr_agents import APRConfig, create_apr_agent
from apr_agents.testing import ScriptedBackend
from apr_agents.testing.scripts import DEMO_QUESTION, demo_script
from apr_tools import calculator, lookup, with_latency


def build() -> object:
    tools = [with_latency(calculator, 0.2), with_latency(lookup, 0.2)]
    agent = create_apr_agent(ScriptedBackend(demo_script()), tools, APRConfig(max_threads=4))

    def triage(state: MessagesState) -> dict:
        return {"messages": [AIMessage("(triage: routing to the parallel reasoner)")]}

    def shout(state: MessagesState) -> dict:
        return {"messages": [AIMessage(state["messages"][-1].content.upper())]}

    g = StateGraph(MessagesState)
    g.add_node("triage", triage)
    g.add_node("reason", agent)  # the compiled APR graph is an ordinary node
    g.add_node("shout", shout)
    g.add_edge(START, "triage")
    g.add_edge("triage", "reason")
    g.add_edge("reason", "shout")
    g.add_edge("shout", END)
    return g.compile()


async def main() -> None:
    out = await build().ainvoke({"messages": [HumanMessage(DEMO_QUESTION)]})
    for m in out["messages"]:
        print(f"{m.type:>5}: {m.content}")


if __name__ == "__main__":
    asyncio.run(main())
