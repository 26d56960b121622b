"""A calculator the model can call: arithmetic over an AST whitelist, never ``eval``.

Inputs are bounded before any work: at most ``MAX_LEN`` characters, exponents up to
``MAX_POW``, integer results up to ``MAX_BITS`` bits (a big-int power holds the GIL, so
no thread or timeout could stop ``(9**9999)**1200``). The tool is sync: LangChain runs
it in a worker thread, off the event loop.

Usage::

    from tools.calculator import calculator
    calculator.invoke({"expression": "(3 + 4) * 2"})  # "14"
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Annotated

from langchain_core.tools import tool
from pydantic import Field

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
          "exp": math.exp, "sin": math.sin, "cos": math.cos}
_CONSTS = {"pi": math.pi, "e": math.e}
MAX_POW = 10_000
MAX_LEN = 500
#: What an expression may contain; in the tool's JSON schema, so grammar-constrained decoding
#: (apr_agents.backends.grammars) cannot write a non-arithmetic argument.
EXPRESSION_PATTERN = r"^[0-9a-z_+\-*/%^(). ,]+$"
MAX_BITS = 100_000  # integer results (and powers' predicted results) beyond this are refused


def evaluate(expression: str) -> float | int:
    """Evaluate arithmetic; raises ValueError on anything that is not arithmetic."""
    if len(expression) > MAX_LEN:
        raise ValueError(f"expression longer than {MAX_LEN} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_POW:
                raise ValueError(f"exponent larger than {MAX_POW}")
            # big-int power holds the GIL: refuse it before computing, by the result's size
            if isinstance(left, int) and abs(left) > 1 and right > 0 and abs(left).bit_length() * right > MAX_BITS:
                raise ValueError(f"result larger than {MAX_BITS} bits")
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int) and (
                left.bit_length() + right.bit_length() > MAX_BITS):
            raise ValueError(f"result larger than {MAX_BITS} bits")
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        return _FUNCS[node.func.id](*(_eval(a) for a in node.args))
    raise ValueError(f"unsupported element in expression: {ast.dump(node)[:60]}")


@tool
def calculator(expression: Annotated[str, Field(pattern=EXPRESSION_PATTERN, max_length=MAX_LEN)]) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / ** and parentheses, sqrt() and other math functions."""
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)
