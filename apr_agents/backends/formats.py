"""Prompt formats: how a text backend lays out a conversation for one family of models.

A format owns everything that depends on the model's own chat layout, so the
runtime and the engine stay model-agnostic:

- ``render(messages, tools)``: the prompt, ending where the model starts writing;
- ``tool_results(results)``: the text the runtime appends after a ``</tool_call>``
  stop, laid out the way the model was trained to read tool results;
- ``answer(text)``: the final answer out of the root context's last text;
- ``end_stops``: text that means "the turn is over" (reported as end of sequence);
- ``grammar(prompt, stops)``: a GBNF grammar for the next completion, or None.

Two formats ship:

- ``FewShotFormat``: base models without a chat template (Gemma 3 270M): the
  few-shot prompt of ``prompting.render_fewshot``, tool results inline.
- ``ChatMLFormat``: instruction-tuned models with a ChatML template and Hermes
  tool calls (Qwen2.5): the model's own Jinja template renders the turns and the
  ``<tools>`` section; a tool result closes the assistant turn and comes back in
  a user turn as ``<tool_response>`` (as Qwen's template lays it out); the
  grammar makes every tool call match its tool's JSON schema, makes the first step
  of a context a tool call or a spawn (a small model otherwise answers from memory
  with invented numbers), forbids an empty answer after a tool result, and makes a
  branch end with ``</Thread>``; a thread makes at most ``thread_tool_calls`` tool
  calls (default 1: a 1.5B model given more wrote the other threads' work too).
  With ``count_items`` (default) the root's first reply starts with ``Items: N``:
  one item must be a tool call (a thread for one item is pure overhead: it made a
  single-part question 2.7x slower than ReAct), N items a tool call or exactly N
  threads. With ``restate_outline`` (default) a thread first writes its own outline
  again. Two options measured and left off (docs/eval.md): ``restate_question``
  (the root writes the question again right after the merge) and
  ``result_names_outline`` (a thread's result starts ``Result: <outline> =``).
  With ``sane_counts`` (default) free text cannot put a scale word after a count of seven
  or more digits (``35508984 million``: the 1.5B model's most common wrong answer).
  Three "grounding" options (default on, measured together in docs/eval.md) tie what the
  model writes to what its tools said: ``grounded_results`` makes a thread's ``Result:`` a
  copy from its tool's response: the fields its outline names (``capital`` gives
  ``Brussels``), else one of the response's numbers; with one field named and no tool call
  left, the thread's whole last step (``Result: Brussels`` and ``</Thread>``) is forced, and
  the llama.cpp backend then runs no forward pass for it (``llamacpp_native.forced_step``). ``grounded_arguments`` (default
  ``{"calculator": "expression"}``; ``{}`` turns it off) holds that argument to arithmetic over
  numbers already in the conversation (and ``ARITHMETIC_CONSTANTS``), and keeps the tool out of
  reach until the conversation holds a number, so a thread cannot "look up" a figure by
  computing one it made up. ``grounded_choice``: after a calculation that returned exactly one
  thread's figure (``max(...)``), or exactly one ``max(...)`` term made of one thread's numbers
  (``max(p1 / a1, p2 / a2)``: a density per item), the root's answer starts with that thread's item
  (``chosen_item``). ``grounded_counts`` (default on; ``False`` turns it off): a count of seven or
  more digits in free text is one of the conversation's, so an answer cannot rewrite
  ``70734224`` as ``707,342,240`` (docs/eval-history.md: 54/70 on the whole set against 52/70 without).
  ``call_after_merge`` (default on): right after its threads are merged the root's step is a
  tool call, nothing before it (the instruction's "finish from their results with one calculator
  call"). A thread's call that repeats another thread's no longer counts as the root repeating
  itself: in 8 of the 112 merges of a whole-set run that took the root's tools away, and it
  summed in its head (docs/eval.md).
  Two more, measured and left off (docs/eval.md, "the root's last step"): ``grounded_answers``, the
  root's answer leads with a figure of the conversation (copied, rounded or cut, or read in
  thousands, millions or billions: ``answer_figures``; a line before a tool call stays free), and
  ``scale_divisors=SCALE_DIVISORS``, a calculator may divide by a unit scale the conversation does
  not hold (``/ 1000000`` for "in millions") but not multiply by it (``1019022 * 1000000``).
  ``thread_only_result`` (measured and left off): the root's prose never starts with ``Result``, the
  word a thread reports with (``Result: 10.000000000000002`` was a root's whole answer to a
  density); it fixed one answer and made the model estimate three densities in its head.

Example::

    fmt = ChatMLFormat(template=llama.metadata["tokenizer.chat_template"])
    prompt = fmt.render([HumanMessage("Population of France plus Canada?")], tools)
    gbnf = fmt.grammar(prompt, stops=["</tool_call>", "</Outlines>"])
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from types import MappingProxyType
from typing import Any

from langchain_core.messages import BaseMessage

from ..protocol.dialects import (
    CANONICAL,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    APRDialect,
    Dialect,
)
from .prompting import FEWSHOT_END_STOPS, apply_template, chat_dicts, render_fewshot, tool_signature

IM_START = "<|im_start|>"
#: ``ChatMLFormat``'s default ``grounded_arguments``: a ``calculator`` tool's ``expression``.
GROUNDED_ARGUMENTS: Mapping[str, str] = MappingProxyType({"calculator": "expression"})
#: the line a root starts its first reply with when ``ChatMLFormat(count_items=True)``
ITEMS_PREFIX = "Items: "
IM_END = "<|im_end|>"
ASSISTANT_START = f"{IM_START}assistant\n"


def inline_tool_results(results: Sequence[str]) -> str:
    """Tool results written into the model's own turn (the canonical protocol's layout)."""
    return "".join(f"\n<tool_response>{r}</tool_response>" for r in results) + "\n"


class FewShotFormat:
    """Base models: a few-shot prompt in the canonical dialect, tool results inline."""

    name = "fewshot"
    end_stops: tuple[str, ...] = FEWSHOT_END_STOPS
    dialect: Dialect = CANONICAL  # the worked examples are written in it

    def render(self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]], *,
               instruction: str | None = None) -> str:
        return render_fewshot(messages, tools, **({} if instruction is None else {"instruction": instruction}))

    def tool_results(self, results: Sequence[str], *, depth: int = 0) -> str:
        return inline_tool_results(results)

    def answer(self, text: str) -> str:
        return text.strip()

    def grammar(self, prompt: str, stops: Sequence[str]) -> str | None:
        from .grammars import protocol_gbnf

        return protocol_gbnf(branch=CANONICAL.thread_close in stops, can_spawn=CANONICAL.spawn_marker in stops)


def spawn_instruction(dialect: Dialect, max_outlines: int, *, count_items: bool = False) -> str:
    """How the model asks for parallel threads, in the words of ``dialect`` (its spawn block and
    its thread end), so the prompt teaches the dialect the runtime parses. ``count_items``: the
    first reply starts with an ``Items: N`` line (see ``ChatMLFormat``)."""
    example = dialect.example(["look up the first item", "look up the second item"])
    if count_items:
        example = f"{ITEMS_PREFIX}2\n{example}"
    return (
        "You answer questions with the tools. Never guess a fact or a number: look it up. "
        "Call a tool by writing <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>; its result comes "
        "back in <tool_response>.\n"
        + (f"Start your first reply with the line {ITEMS_PREFIX}N, where N is how many separate items (countries, "
           "cities, ...) the question asks about. With one item, call the tool right away. " if count_items else "")
        + "When the question needs the same kind of information about several independent items (for example "
        "facts about several countries), first split the work into parallel threads, one per item, like this:\n"
        f"{example}\n"
        f"Write at most {max_outlines} outlines. Each thread then runs by itself and works only on its own "
        "outline: it calls the tool it needs, writes Result: with the number or name its own outline asks "
        f"for, and ends with {dialect.thread_close}. "
        "The threads come back to you in order. Then finish from their results with one calculator call: to "
        "add, subtract or divide, write that arithmetic; to say which item is the largest, smallest or "
        "farthest, write max(...) or min(...) of the threads' numbers, then name the item whose thread has "
        "that number. "
        "Give the final answer in one sentence, with the name or the number in the unit the question asks "
        "for. Work from the tool results only."
    )


class ChatMLFormat:
    """Instruction-tuned ChatML models with Hermes tool calls (Qwen2.5 and its kin)."""

    name = "chatml"
    end_stops: tuple[str, ...] = ()

    def __init__(self, template: str | Callable[..., str], *, bos_token: str = "", eos_token: str = "",
                 dialect: Dialect = CANONICAL, max_outlines: int = 6,
                 instruction: str | None = None, force_first_call: bool = True,
                 thread_tool_calls: int | None = 1, count_items: bool = True,
                 restate_outline: bool = True, restate_question: bool = False,
                 result_names_outline: bool = False, sane_counts: bool = True,
                 grounded_results: bool = True,
                 grounded_arguments: Mapping[str, str] = GROUNDED_ARGUMENTS,
                 grounded_choice: bool = True, grounded_counts: bool = True,
                 grounded_answers: bool = False,
                 scale_divisors: Sequence[str] = (), call_after_merge: bool = True,
                 thread_only_result: bool = False) -> None:
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.dialect = dialect
        self.max_outlines = max_outlines
        self.count_items = count_items
        self.restate_outline = restate_outline
        self.restate_question = restate_question
        self.result_names_outline = result_names_outline
        self.sane_counts = sane_counts
        self.grounded_results = grounded_results
        self.grounded_arguments = dict(grounded_arguments)
        self.grounded_choice = grounded_choice
        self.grounded_counts = grounded_counts
        self.grounded_answers = grounded_answers
        self.scale_divisors = tuple(scale_divisors)
        self.call_after_merge = call_after_merge
        self.thread_only_result = thread_only_result
        self.custom_instruction = instruction
        self.force_first_call = force_first_call
        self.thread_tool_calls = thread_tool_calls
        self._grammars: dict[tuple[Any, ...], str] = {}

    @property
    def instruction(self) -> str:
        """The system instruction: the one given, else the dialect's (with the ``Items:`` line if counted)."""
        if self.custom_instruction is not None:
            return self.custom_instruction
        return spawn_instruction(self.dialect, self.max_outlines, count_items=self.count_items)

    # -- rendering ------------------------------------------------------------------
    def render(self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]], *,
               instruction: str | None = None) -> str:
        """The prompt: ``instruction`` (default: the dialect's) and system messages, the template's turns."""
        system = [self.instruction if instruction is None else instruction]
        chat = chat_dicts(messages, system, wrap_tool_results=False)  # the template wraps tool turns itself
        return apply_template(self.template, chat, tools, bos_token=self.bos_token, eos_token=self.eos_token)

    def tool_results(self, results: Sequence[str], *, depth: int = 0) -> str:
        """At the root, a user turn of ``<tool_response>`` blocks, as the template lays them out.

        Inside a thread (``depth > 0``) the results stay inline in the assistant turn: a
        thread that spans turns loses the model's sense of which thread it is writing
        (measured: a 1.5B model then kept calling tools and never closed the thread).
        """
        if depth > 0:
            return inline_tool_results(results)
        body = "".join(f"\n<tool_response>\n{r}\n</tool_response>" for r in results)
        return f"{IM_END}\n{IM_START}user{body}{IM_END}\n{ASSISTANT_START}"

    def answer(self, text: str) -> str:
        tail = text.rsplit(ASSISTANT_START, 1)[-1].replace(IM_END, "")
        if self.restate_question:  # the restated question is the model's note to itself, not its answer
            tail = "\n".join(line for line in tail.splitlines() if not line.startswith("Question: "))
        return tail.strip()

    # -- grammar ----------------------------------------------------------------------
    def grammar(self, prompt: str, stops: Sequence[str]) -> str | None:
        tools = tools_in_prompt(prompt)
        branch = self.dialect.thread_close in stops
        can_spawn = self.dialect.spawn_marker in stops
        first = self.force_first_call and _first_step(prompt)
        may_call = not (branch and self.thread_tool_calls is not None
                        and _thread_tool_calls(prompt, self.dialect) >= self.thread_tool_calls)
        merged = not branch and not first and just_merged(prompt, self.dialect)
        # right after a merge the latest call is a thread's: the root has repeated nothing
        may_call = may_call and (merged or not _repeated_call(prompt))
        outline = own_outline(prompt, self.dialect) if self.restate_outline and branch and first else None
        if self.result_names_outline and branch and not first:
            outline = own_outline(prompt, self.dialect, opening=False)
        question = (joined_question(prompt, self.dialect)
                    if self.restate_question and not branch and not first else None)
        values = (grounded_result_options(prompt, own_outline(prompt, self.dialect, opening=False))
                  if self.grounded_results and branch and not first else ())
        hold_counts = self.grounded_counts and self.sane_counts and not first
        hold_answer = self.grounded_answers and not branch and not first
        found = (_conversation_numbers(prompt)
                 if (self.grounded_arguments and may_call) or hold_counts or hold_answer else [])  # read once
        context = tuple(_with_constants(found, ARITHMETIC_CONSTANTS))
        numbers = context if self.grounded_arguments and may_call else ()
        divide_only = tuple(c for c in self.scale_divisors if c not in found) if numbers else ()
        grounded = self.grounded_arguments if may_call else {}
        chosen = chosen_item(prompt, self.dialect) if self.grounded_choice and not branch and not first else None
        counts = tuple(long_counts(context)) if hold_counts else ()
        figures = tuple(answer_figures(context)) if hold_answer else ()
        call_first = self.call_after_merge and may_call and merged
        key = (json.dumps(tools, sort_keys=True), branch, can_spawn, first, may_call, outline, question,
               values, numbers, chosen, counts, figures, call_first, self.thread_only_result)
        if key not in self._grammars:
            if len(self._grammars) >= 256:
                self._grammars.clear()
            self._grammars[key] = chatml_gbnf(tools, branch=branch, can_spawn=can_spawn, first_step=first,
                                              max_outlines=self.max_outlines, may_call=may_call,
                                              dialect=self.dialect, count_items=self.count_items,
                                              outline=outline, question=question,
                                              sane_counts=self.sane_counts, result_values=values,
                                              grounded=grounded, context_numbers=numbers,
                                              divide_only=divide_only, answer_lead=chosen,
                                              long_counts=counts, answer_figures=figures,
                                              call_first=call_first,
                                              root_text_not="Result" if self.thread_only_result else "")
        return self._grammars[key]


PromptFormat = FewShotFormat | ChatMLFormat


def format_for(template: str | Callable[..., str] | None, *, bos_token: str = "", eos_token: str = "",
               dialect: Dialect = CANONICAL) -> PromptFormat:
    """The format for a model: ``ChatMLFormat`` over its chat ``template``, else the few-shot one
    (which teaches the canonical dialect only)."""
    if template:
        return ChatMLFormat(template, bos_token=bos_token, eos_token=eos_token, dialect=dialect)
    if dialect is not CANONICAL:
        raise ValueError(f"dialect {dialect.name!r} needs a chat template (chat_template=True or a "
                         "Jinja string): the few-shot prompt for base models teaches the canonical dialect only")
    return FewShotFormat()


class FormattedBackend:
    """What a text backend hands to its ``prompt_format`` (``LlamaCppBackend``, ``VLLMBackend``):
    rendering, the spawn dialect its prompts teach, tool-result layout and the final answer."""

    prompt_format: PromptFormat

    def render(self, messages: list[BaseMessage], tools: list[dict[str, Any]], *,
               instruction: str | None = None) -> str:
        """``instruction`` replaces the text protocol's (e.g. a plain tool-calling one for a chat adapter)."""
        return self.prompt_format.render(messages, tools, instruction=instruction)

    @property
    def prompt_dialect(self) -> Dialect:
        """The spawn dialect this backend's prompts teach (``create_apr_agent`` checks it)."""
        return self.prompt_format.dialect

    def tool_results_text(self, results: Sequence[str], *, depth: int = 0) -> str:
        """What the runtime appends after a ``</tool_call>`` stop in a context at ``depth``."""
        return self.prompt_format.tool_results(results, depth=depth)

    def answer_text(self, text: str) -> str:
        """The final answer out of the root context's last text (template markers removed)."""
        return self.prompt_format.answer(text)


_TOOLS_RE = re.compile(r"<tools>\n(.*?)\n</tools>", re.S)


def tools_in_prompt(prompt: str) -> list[dict[str, Any]]:
    """The tool schemas a ChatML prompt lists in its ``<tools>`` section (one JSON object a line)."""
    found = _TOOLS_RE.search(prompt)
    if not found:
        return []
    tools = []
    for line in found.group(1).splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            tool = json.loads(line)
        except ValueError:
            continue
        if isinstance(tool, dict):
            tools.append(tool.get("function", tool))
    return tools


def own_outline(prompt: str, dialect: Dialect, *, opening: bool = True) -> str | None:
    """The outline of the thread a branch prompt opens (``...<Outline>2: X</Outline>...<Thread>2:``
    gives ``X``); None for APR's ``spawn([...])`` or when the prompt does not end with a thread opening.
    ``opening=False``: the outline of the latest thread opened anywhere in the prompt (a branch
    further on in its work)."""
    if isinstance(dialect, APRDialect) or not dialect.outline_open:
        return None
    pattern = re.escape(dialect.thread_open + dialect.thread_label_sep) + r"([^:\n<]+):"
    opened = (re.search(pattern + "$", prompt) if opening
              else next(reversed(list(re.finditer(pattern, prompt))), None))
    block = prompt.rpartition(dialect.outlines_open)[2].partition(dialect.spawn_marker)[0]
    if opened is None or not block:
        return None
    found = re.search(re.escape(f"{dialect.outline_open}{opened.group(1)}:") + r" ?(.*?)"
                      + re.escape(dialect.outline_close), block, re.S)
    text = found.group(1).strip() if found else ""
    return text if text and "\n" not in text else None


def just_merged(prompt: str, dialect: Dialect) -> bool:
    """True when ``prompt`` (a root context) ends right after its threads were merged
    (``...</Parallel>`` and a newline)."""
    return _before_merged_turn(prompt, dialect) is not None


def _before_merged_turn(prompt: str, dialect: Dialect) -> str | None:
    """``prompt`` before its latest assistant turn, when that turn ends with merged threads."""
    head, sep, segment = prompt.rpartition(ASSISTANT_START)
    return head if sep and segment.rstrip("\n").endswith(dialect.parallel_close or dialect.thread_close) else None


def joined_question(prompt: str, dialect: Dialect) -> str | None:
    """The user's question, when ``prompt`` (a root context) ends right after its threads were merged
    (``just_merged``); None elsewhere, or when the question is not one short line."""
    head = _before_merged_turn(prompt, dialect)
    if head is None:
        return None
    turns = [t for t in head.split(f"{IM_START}user\n")[1:] if not t.lstrip().startswith(TOOL_RESPONSE_OPEN)]
    text = turns[-1].partition(IM_END)[0].strip() if turns else ""
    return text if text and "\n" not in text and len(text) <= 300 else None


_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def _numbers(text: str) -> list[str]:
    return list(dict.fromkeys(_NUMBER_RE.findall(text)))


def _last_tool_response(prompt: str) -> str:
    return prompt.rpartition(TOOL_RESPONSE_OPEN)[2].partition(TOOL_RESPONSE_CLOSE)[0].strip()


def numbers_in_last_tool_response(prompt: str, *, limit: int = 12) -> list[str]:
    """The numbers the latest ``<tool_response>`` of ``prompt`` holds, in order, each once.

    Digits inside a word (``km2``, ``H2O``) are not numbers; at most ``limit`` are returned.
    """
    return _numbers(_last_tool_response(prompt))[:limit]


#: Numbers an arithmetic argument may always use besides the conversation's: unit scales and
#: small counts (``/ 1000000`` for "in millions", ``round(x, 2)``).
ARITHMETIC_CONSTANTS: tuple[str, ...] = ("1000000", "1000", "100", "10", "2", "1", "0")
#: The ``ARITHMETIC_CONSTANTS`` an arithmetic argument may only divide by when the conversation does
#: not hold them: a unit scale turns a count into millions, never a count into a made-up one.
SCALE_DIVISORS: tuple[str, ...] = ("1000000", "1000")


#: The protocol's own numbering (``Items: 2``, ``<Outline>1:``, ``<Thread>2:``): not facts.
_SCAFFOLD_RE = re.compile(r"(?:Items: |<Outline>|<Thread>)\d+")


def numbers_in_context(prompt: str, *, limit: int = 200,
                       constants: Sequence[str] = ARITHMETIC_CONSTANTS) -> list[str]:
    """The numbers of the conversation a ChatML ``prompt`` holds after its ``<tools>`` section
    (question, tool responses, results), each once, then ``constants``; empty when the
    conversation has none (a thread that has looked nothing up yet). The tool descriptions'
    examples and the protocol's numbering do not count. At most ``limit``, the latest kept."""
    return _with_constants(_conversation_numbers(prompt, limit), constants)


def _conversation_numbers(prompt: str, limit: int = 200) -> list[str]:
    return _numbers(_SCAFFOLD_RE.sub("", prompt.rpartition("</tools>")[2]))[-limit:]


def _with_constants(found: Sequence[str], constants: Sequence[str]) -> list[str]:
    return [*found, *(c for c in constants if c not in found)] if found else []


_SCALES = (0, 3, 6, 9)  # as it is, in thousands, millions, billions


def answer_figures(numbers: Sequence[str], *, decimals: int = 6) -> list[str]:
    """How an answer may write ``numbers`` (``grounded_answers``): each one whole, and rounded or
    cut to 0 to ``decimals`` places, as it is and read in thousands, millions or billions (where
    that leaves at least 1), without its sign; an integer part of four or more digits also
    grouped by thousands. ``109224559`` gives ``109224559``, ``109,224,559``, ``109225``,
    ``109.22``, ``109.224``... and ``79.01771143377735`` gives ``79``, ``79.0``, ``79.02``..."""
    forms: dict[str, None] = {}
    for n in numbers:
        try:
            value = abs(Decimal(n))
        except ArithmeticError:
            continue
        if not value.is_finite():
            continue
        shown = [n.lstrip("-")]
        for scale in _SCALES:
            if scale and value < Decimal(10) ** scale:
                break
            x = value.scaleb(-scale)
            exponent = x.as_tuple().exponent
            places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
            for k in range(min(places, decimals) + 1):
                step = Decimal(1).scaleb(-k)
                shown += [format(x.quantize(step, rounding=r), "f") for r in (ROUND_HALF_UP, ROUND_DOWN)]
        for form in shown:
            forms[form] = None
            whole, dot, frac = form.partition(".")
            if len(whole) >= 4:
                forms[f"{int(whole):,}{dot}{frac}"] = None
    return list(forms)


def gbnf_choice(strings: Sequence[str]) -> str:
    """A GBNF expression for exactly ``strings``, written as a trie (a shared prefix once), so
    llama.cpp's grammar keeps a stack per next character rather than one per string."""
    from .grammars import gbnf_literal

    end = ""
    trie: dict[str, Any] = {}
    for text in dict.fromkeys(strings):
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[end] = {}

    def render(node: dict[str, Any]) -> str:
        branches = []
        for ch, child in node.items():
            if ch == end:
                continue
            run = ch
            while len(child) == 1 and end not in child:  # one way on: one literal
                (nxt, child), = child.items()
                run += nxt
            rest = render(child)
            branches.append(gbnf_literal(run) + (f" {rest}" if rest else ""))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and end not in node else "( " + " | ".join(branches) + " )"
        return f"{body}?" if end in node else body

    return render(trie) or '""'


_FIELD_KEY_RE = re.compile(r"([A-Za-z][A-Za-z_]*)\s+(\S.*)")
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_ ]{0,30}")


def tool_response_fields(body: str) -> list[tuple[str, str]]:
    """``(key, value)`` fields of a tool response: a JSON object's scalar members, or text of
    ``key value`` or ``key: value`` parts separated by ``;`` or new lines, after an optional
    ``Label:`` (``France: population 68400000; capital Paris`` and ``France: population: 68400000;
    capital: Paris`` give ``population``/``68400000`` and ``capital``/``Paris``; ``distance from A
    to B: 841.1 km`` gives ``distance``/``841.1 km``)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return [(str(k).lower(), str(v)) for k, v in data.items()
                if isinstance(v, str | int | float) and not isinstance(v, bool)]
    fields: list[tuple[str, str]] = []
    parts = [p.strip().rstrip(".") for p in re.split(r";|\n", body) if p.strip()]
    # "key: value" parts (after the first, which may carry a label: "France: population: 68.4")
    colon_style = (sum(": " in p for p in parts[1:]) * 2 > len(parts) - 1 if len(parts) > 1
                   else bool(parts) and parts[0].count(": ") >= 2)
    for i, part in enumerate(parts):
        head, sep, rest = part.partition(": ")
        if colon_style:
            if i == 0 and rest.count(": "):
                head, sep, rest = rest.partition(": ")
            if sep and _KEY_RE.fullmatch(head):
                fields.append((head.strip().lower(), rest.strip()))
        elif sep and _NUMBER_RE.match(rest.strip()):  # "distance from A to B: 841.1 km"
            key = re.match(r"[A-Za-z]+", head)
            if key:
                fields.append((key.group(0).lower(), rest.strip()))
        else:
            found = _FIELD_KEY_RE.fullmatch(rest.strip() if sep else part)
            if found:
                fields.append((found.group(1).lower(), found.group(2).strip()))
    return fields


def grounded_result_options(prompt: str, outline: str | None) -> tuple[str, ...]:
    """What a thread's ``Result:`` may start with after its tool response (``grounded_results``).

    The fields the thread's ``outline`` names (a word of the key, ``area`` for ``area_km2``, is in
    the outline), copied (one: its value; several: ``key value``
    parts joined by ``; ``), as the only option; when the outline names none, any number of the
    response; nothing (free text) when the response has no number either (an error message).
    """
    body = _last_tool_response(prompt)
    words = set(re.findall(r"[a-z]+", (outline or "").lower()))
    named = [(k, v) for k, v in tool_response_fields(body)
             if any(w in words or f"{w}s" in words for w in re.findall(r"[a-z]+", k))]
    if len(named) == 1:
        return (named[0][1],)
    if named:
        return ("; ".join(f"{k} {v}" for k, v in named),)
    return tuple(numbers_in_last_tool_response(prompt))


def chosen_item(prompt: str, dialect: Dialect) -> str | None:
    """The item a root's calculation picked: when the latest tool response of ``prompt`` is one
    number equal to the ``Result:`` figure of exactly one thread of the latest merged threads
    (``max(...)`` of their figures), or to exactly one term of the root's ``max(...)`` /
    ``min(...)`` whose numbers all come from one thread (``max(22442948 / 1267000, 2082958 /
    25333)``: a ratio per item), that thread's item: the string argument of its tool call
    that differs between the threads (``{"country": "Peru"}`` gives ``Peru``), or where the merge
    left out the tool calls, the words of its outline line that differ between the threads
    (``look up Peru`` beside ``look up Chile``). None otherwise."""
    if not dialect.parallel_close:
        return None
    picked = _NUMBER_RE.fullmatch(_last_tool_response(prompt))
    block = prompt.rpartition(dialect.parallel_open)[2].partition(dialect.parallel_close)[0]
    if picked is None or not block:
        return None
    bodies = block.split(dialect.thread_open)[1:]
    threads = []
    for body in bodies:
        result = re.search(r"Result: (?:[a-z]+ )?(-?\d+(?:\.\d+)?)", body)
        call = _CALL_BODY_RE.search(body)
        try:
            args = json.loads(call.group(1)).get("arguments", {}) if call else {}
        except (ValueError, AttributeError):
            args = {}
        threads.append((float(result.group(1)) if result else None,
                        {k: v for k, v in args.items() if isinstance(v, str)} if isinstance(args, dict) else {}))
    hits = [i for i, (value, _) in enumerate(threads) if value is not None and value == float(picked.group(0))]
    if not hits:
        hits = _thread_of_picked_term(prompt, bodies, picked.group(0))
    if len(hits) != 1:
        return None
    args = threads[hits[0]][1]
    differing = [k for k in args if len({t[1].get(k) for t in threads}) == len(threads)]
    if differing:
        return args[differing[0]]
    # no tool calls in the merged text (``thread_conclusions``): the words of the threads' first
    # lines (their outlines) that differ between them
    heads = [re.sub(r"^\s*\d+:", "", body.split("\n", 1)[0]).split()
             for body in block.split(dialect.thread_open)[1:]]
    if len(heads) < 2 or len({" ".join(h) for h in heads}) != len(heads):
        return None
    lead = _shared_lead(heads)
    tail = _shared_lead([h[lead:][::-1] for h in heads])
    item = " ".join(heads[hits[0]][lead:len(heads[hits[0]]) - tail]).strip(" .,;:")
    return item or None


def _thread_of_picked_term(prompt: str, bodies: Sequence[str], picked: str) -> list[int]:
    """The threads (among ``bodies``, merged thread texts) that hold every number of the one term
    of the latest call's ``max(...)``/``min(...)`` argument whose value is ``picked`` (equal to
    the figure's own precision); empty when no term, or several, give it. Terms are valued by
    the calculator's own evaluator (``apr_tools.evaluate``)."""
    from apr_tools import evaluate

    calls = _CALL_BODY_RE.findall(prompt)
    try:
        args = json.loads(calls[-1]).get("arguments", {}) if calls else {}
    except (ValueError, AttributeError):
        return []
    picks = [terms for v in (args.values() if isinstance(args, dict) else ())
             if isinstance(v, str) and (terms := _max_min_terms(v))]
    if not picks:
        return []
    target = float(picked)
    places = len(picked.partition(".")[2])
    slack = max(1e-9 * abs(target), 0.5 * 10.0 ** -places if places else 1e-9)
    terms = []
    for term in picks[0]:
        try:
            if abs(evaluate(term) - target) <= slack:
                terms.append(term)
        except (ValueError, ArithmeticError, TypeError, RecursionError):
            continue
    if len(terms) != 1:
        return []
    wanted = set(_numbers(terms[0]))
    held = [set(_numbers(body.partition("\n")[2])) for body in bodies]  # after the outline line
    return [i for i, numbers in enumerate(held) if wanted and wanted <= numbers]


def _max_min_terms(expression: str) -> list[str]:
    """The source text of each argument when ``expression`` is one ``max(...)`` or ``min(...)``
    call (``max(a, b) - min(a, b)`` is not), else empty."""
    text = expression.strip()
    try:
        call = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return []
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in ("max", "min")
            and not call.keywords):
        return []
    return [ast.get_source_segment(text, arg) or "" for arg in call.args]


def _shared_lead(rows: Sequence[Sequence[str]]) -> int:
    """How many leading words all ``rows`` share."""
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return n


def _thread_tool_calls(prompt: str, dialect: Dialect) -> int:
    """Tool calls the thread being continued has made (those after its ``<Thread>`` opening)."""
    return prompt.rpartition(dialect.thread_open)[2].count(TOOL_CALL_CLOSE)


_CALL_BODY_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _repeated_call(prompt: str) -> bool:
    """True when the latest tool call of the conversation repeats an earlier one verbatim.

    A small model that has its result tends to call the same tool with the same arguments
    again and again; the grammar then asks for the answer instead.
    """
    bodies = _CALL_BODY_RE.findall(prompt.rpartition("</tools>")[2])
    return bool(bodies) and bodies[-1] in bodies[:-1]


def _first_step(prompt: str) -> bool:
    """True when the context being continued has no tool result or merged threads yet.

    The current assistant turn starts after the last ``<|im_start|>assistant``; the turn
    before it is the user's question (first step) or a ``<tool_response>`` turn.
    """
    head, sep, segment = prompt.rpartition(ASSISTANT_START)
    if not sep:
        return True
    if "</Parallel>" in segment or TOOL_RESPONSE_OPEN in segment:
        return False
    last_user = head.rpartition(f"{IM_START}user")[2]
    return not last_user.lstrip().startswith(TOOL_RESPONSE_OPEN)


def sane_count_say_rules(counts: Sequence[str] | None = None) -> list[str]:
    """GBNF for free text (rule ``say``) whose numbers read sanely: no scale word after a long count.

    A long count is seven or more digits, plain or grouped by thousands. ``counts`` (the
    conversation's ``long_counts``; None or empty: any) holds them to those numbers, each plain or
    grouped, and then a shorter number is never grouped nor followed by a comma, so ``707,342,240``
    cannot be written for ``70734224`` (``ChatMLFormat(grounded_counts=True)``).
    """
    from .grammars import gbnf_literal

    if not counts:
        slong = r'[0-9]{7,16} | [0-9]{1,3} ( "," [0-9]{3} ){2,5}'
        sshort, after_short = r'[0-9]{1,6} | [0-9]{1,3} "," [0-9]{3}', "sch"
    else:
        forms = dict.fromkeys(f for c in counts for f in (c, f"{int(c):,}"))
        slong = " | ".join(gbnf_literal(f) for f in forms)
        sshort, after_short = "[0-9]{1,6}", r"[^<>{}`0-9,]"  # no comma right after a short number
    return [
        r'say ::= sstart sseg{0,250} snum? | snum',
        r'sstart ::= sch0 | snumseg',
        r'sseg ::= sch | snumseg',
        # a number and what may follow it: anything but a digit, and no scale word after a long count
        f'snumseg ::= sshort sfrac? {after_short} | slong sfrac? safter',
        r'snum ::= ( sshort | slong ) sfrac?',
        f'sshort ::= {sshort}',
        f'slong ::= {slong}',
        # a decimal fraction is part of its number, whatever its length (a calculator's 105.00682575513275)
        r'sfrac ::= "." [0-9]{1,20}',
        # the first character: not a digit (a number is snum), a space or a newline
        r'sch0 ::= [^<>\n{}`0-9, ]',
        r'sch ::= [^<>{}`0-9,] | "," [^<>{}`0-9]',
        r'safter ::= [^<>{}`0-9, mbtMBT] | "," [^<>{}`0-9] | " " sword',
        r'sword ::= [^<>{}`0-9 \nmbtMBT] | [mMbB] [^<>{}`0-9iI] | [tT] [^<>{}`0-9hHrR] '
        r'| [tT] [hH] [^<>{}`0-9oO] | [tT] [rR] [^<>{}`0-9iI]',
    ]


#: Free text (an answer, a thread's ``Result:`` sentence) in which a count of seven or more digits
#: is never followed by a scale word: ``35508984 million`` is out, ``35508984 people``,
#: ``35.5 million`` and ``171,312,050.`` are in. Numbers are read whole (a digit never follows a
#: number's last digit, nor does ``,<digit>``), so a long count cannot be split into short ones;
#: a decimal fraction belongs to its number, so ``1.2345678 million`` is in.
#: After a long count the text goes on with anything but a word that starts ``mi``, ``bi``,
#: ``tho`` or ``tri`` (or those letters right after the digits).
SANE_COUNT_SAY_RULES: list[str] = sane_count_say_rules()


#: free text's characters (GBNF classes): the first one of an answer, and every next one
_NOT_SAID, _SAID = r"<>\n{}` ", r"[^<>{}`]"


def chatml_gbnf(tools: Sequence[dict[str, Any]], *, branch: bool, can_spawn: bool, first_step: bool,
                max_outlines: int = 6, may_call: bool = True, dialect: Dialect = CANONICAL,
                count_items: bool = False, outline: str | None = None, question: str | None = None,
                sane_counts: bool = False, result_values: Sequence[str] = (),
                grounded: Mapping[str, str] | None = None, context_numbers: Sequence[str] = (),
                answer_lead: str | None = None, long_counts: Sequence[str] = (),
                divide_only: Sequence[str] = (), answer_figures: Sequence[str] = (),
                call_first: bool = False, root_text_not: str = "") -> str:
    """GBNF for one step of a ChatML model in ``dialect`` (its spawn block, its thread end).

    A step is one of: a tool call whose arguments follow that tool's JSON schema (the
    step stops at ``</tool_call>``), optionally after a line of reasoning; a spawn block
    up to ``</Outlines>`` (where spawning is allowed); an answer. A context's first step
    must call a tool or spawn (a small model otherwise answers from memory). After a
    tool result, a branch must first say what it found in a sentence that starts with
    ``Result:`` (without that cue it wrote the next thread's heading), then either end
    with ``</Thread>`` or call again (without that sentence a 1.5B model kept calling
    tools and never closed its thread); the root may answer or call again. ``may_call=False``
    (a branch that used its tool calls) leaves only the sentence and ``</Thread>``. Text never
    holds ``<``, ``{`` or backticks, so no tool call can hide in prose or a code fence.

    ``count_items``: a root's first step that may spawn starts with ``Items: N``, the number of
    items the question asks about; with 1 it must call a tool (no spawn: a thread for one item
    is pure overhead), with N >= 2 it calls a tool or spawns exactly N threads (at most
    ``max_outlines``, and N stops at 9). ``outline``: a thread's first step starts by writing
    its own outline again, word for word, on one line before its tool call (a 1.5B model that
    went straight to the call often looked up the previous thread's item); after a tool result,
    ``outline`` makes the ``Result:`` sentence start from it (``Result: <outline> = ...``), so the
    thread answers its outline rather than the whole question. ``question``: the root's
    first step after its threads are merged starts by writing the question again (``Question: ...``),
    so the last thing it read before finishing is what was asked, not the threads' results.
    ``result_values`` (numbers from the thread's tool response): a branch's ``Result:`` after a
    tool result starts with one of them, copied, so the thread reports a figure its tool gave
    rather than its item's name or a number of its own (``grounded_result_options``); one
    option is the whole copied text, and when the branch may not call again its whole step is
    that copy and ``</Thread>`` (an engine with jump-forward then runs no forward pass for it:
    ``llamacpp_native.forced_step``). ``grounded`` (tool name -> argument) with ``context_numbers``:
    that string argument is arithmetic (numbers, ``+ - * /``, parentheses, ``max min round abs
    sqrt``) whose every number is one of ``context_numbers``, copied, or one of ``divide_only``
    right after a ``/``; with no numbers, that tool cannot be called (a thread that has looked
    nothing up cannot compute a figure it made up).
    ``answer_lead``: the root answers (no more calls) with text that starts with it.
    ``long_counts`` (with ``sane_counts``; ``ChatMLFormat(grounded_counts=True)``): in free text a
    count of seven or more digits is one of these, copied plain or grouped by thousands, and a
    shorter number is never followed by a comma nor grouped (``707,342,240`` cannot be written
    for ``70734224``: after ``707`` only its ``3`` or a non-digit may follow).
    ``call_first`` (``ChatMLFormat(call_after_merge=True)``, the root right after its threads were
    merged): the step is a tool call, nothing before it.
    ``answer_figures`` (``ChatMLFormat(grounded_answers=True)``): a root's answer that ends the
    step leads with one of them, if it holds a number at all (text before a tool call stays free:
    the step's end decides which of the two it was).
    ``root_text_not`` (``ChatMLFormat(thread_only_result=True)``: ``"Result"``): a root's text (an
    answer, or a line before a tool call) does not start with it.
    """
    from .grammars import JSON_RULES, gbnf_literal, schema_rule, spawn_rules

    rules: list[str] = [*JSON_RULES]
    calls = []
    gexpr: list[str] = []
    for i, tool in enumerate(tools):
        name = str(tool.get("name", ""))
        if not name:
            continue
        params = tool.get("parameters") or {"type": "object"}
        held = (grounded or {}).get(name)
        if held and held in (params.get("properties") or {}):
            if not context_numbers:
                continue  # no figure to compute with yet: look one up first
            params = {**params, "properties": {**params["properties"], held: {"$gbnf": "gexpr"}}}
            if not gexpr:  # the held arguments of all tools share one rule
                gexpr = grounded_arithmetic_rules(context_numbers, divide_only=divide_only)
                rules += gexpr
        args = schema_rule(params, f"t{i}", rules)
        calls.append(f'"{{\\"name\\": \\"{_gbnf_escape(name)}\\", \\"arguments\\": " {args} "}}"')
    options = []
    if calls:
        rules.append("call ::= \"<tool_call>\\n\" ( " + " | ".join(calls) + f" ) \"\\n{TOOL_CALL_CLOSE}\"")
        # several calls in one reply where generation does not stop at the first (chat mode's
        # parallel tool calls); with a </tool_call> stop the first one ends the step
        rules.append('calls ::= call ( "\\n" call ){0,7}')
    if can_spawn and first_step:  # an outline never holds a quote in APR's JSON list
        plain = r"[^<\n{}`\"\\]" if isinstance(dialect, APRDialect) else r"[^<\n{}`]"
        rules += spawn_rules(max_outlines, sep=" ", otext=f"{plain} {plain}{{0,79}}", dialect=dialect)
    close = gbnf_literal(dialect.thread_close)
    rules += sane_count_say_rules(long_counts) if sane_counts else [f"say ::= [^{_NOT_SAID}] {_SAID}{{0,400}}"]
    if branch and first_step and calls:
        # a thread starts with its tool call (free reasoning text here went astray), after its own
        # outline written again when it is known
        lead = f'" " {gbnf_literal(outline)} "\\n" ' if outline else ""
        options.append(f"{lead}( calls | spawn )" if can_spawn else f"{lead}calls")
    elif count_items and can_spawn and first_step and calls:
        top = min(max_outlines, 9)
        counts = ['"1\\n" calls']
        for k in range(2, top + 1):
            rules += spawn_rules(k, sep=" ", otext=None, dialect=dialect, min_outlines=k, name=f"spawn{k}")
            counts.append(f'"{k}\\n" ( calls | spawn{k} )')
        options.append(f'"{ITEMS_PREFIX}" ( ' + " | ".join(counts) + " )")
    elif call_first and calls and not branch:  # right after the merge: the finishing call, no prose
        options.append("calls")
    elif first_step or not branch:
        if calls and (may_call or first_step):
            options.append('( say "\\n" )? calls')
        if can_spawn and first_step:
            options.append('( say "\\n" )? spawn')
        if not first_step or not options:
            if branch:
                options.append(f"say {close}")
            elif answer_figures and not first_step:
                rules += grounded_answer_rules(answer_figures, sane_counts=sane_counts)
                options.append("gsay")
            else:
                options.append("say")
    else:  # a branch after a tool result: say what was found, then close (or call again, if it may)
        cue = f'"Result: " {gbnf_literal(outline)} " = "' if outline else '"Result: "'
        more = ' | "\\n" calls' if calls and may_call else ""
        if len(result_values) == 1 and not more:  # one copy and nothing else to do: the whole step is forced
            options.append(f'{cue} {gbnf_literal(result_values[0])} "\\n" {close}')
        elif result_values:  # a copied figure, then optionally a few words (a unit), then the end
            copied = " | ".join(gbnf_literal(v) for v in result_values)
            options.append(f'{cue} ( {copied} ) ( "\\n" | [ .;] say )? ( {close}{more} )')
        else:
            options.append(f'{cue} say ( {close}{more} )')
    if root_text_not and not branch:  # the root's prose: "say" with a first line that avoids a prefix
        if sane_counts:  # the sane-count rules' pieces: a number may still lead
            rules.append(f"rsay ::= ( {not_prefix_rule(root_text_not)} | snumseg ) sseg{{0,250}} snum? | snum")
        else:
            rules.append(f"rsay ::= {not_prefix_rule(root_text_not, excluded=_NOT_SAID)} {_SAID}{{0,400}}")
        options = [re.sub(r"\bsay\b", "rsay", o) for o in options]
    top = " | ".join(options)
    if answer_lead and not branch:
        top = f'{gbnf_literal(answer_lead)} ( [ .,;] say )?'
    if question:
        top = f'"Question: " {gbnf_literal(question)} "\\n" ( {top} )'
    return "\n".join([f"root ::= {top}", *rules]) + "\n"


def not_prefix_rule(prefix: str, *, excluded: str = r"<>\n{}`0-9, ") -> str:
    """A GBNF expression for a few characters of text that do not start ``prefix``: the first
    character that leaves it (``"Result:"`` gives ``[^R...] | "R" [^e...] | "Re" [^s...] | ...``).
    No character of ``excluded`` (a GBNF class body) is matched, nor a prefix with one in it."""
    from .grammars import gbnf_literal

    def cls(ch: str) -> str:
        return "[^" + excluded + ("\\" + ch if ch in "]^-\\" else ch) + "]"

    alts = [cls(prefix[0])] + [f"{gbnf_literal(prefix[:i])} {cls(prefix[i])}" for i in range(1, len(prefix))]
    return "( " + " | ".join(alts) + " )"


def long_counts(numbers: Sequence[str]) -> list[str]:
    """The whole numbers of seven or more digits among ``numbers`` (their integer part), each once."""
    whole = (n.lstrip("-").split(".")[0] for n in numbers)
    return list(dict.fromkeys(w for w in whole if len(w) >= 7))


def grounded_arithmetic_rules(numbers: Sequence[str], *, divide_only: Sequence[str] = ()) -> list[str]:
    """GBNF for a JSON string holding arithmetic over ``numbers`` only (rule ``gexpr``), each of
    ``divide_only`` only right after a ``/`` (whether among ``numbers`` or not)."""
    from .grammars import gbnf_literal

    held = list(dict.fromkeys(divide_only))
    nums = " | ".join(gbnf_literal(n) for n in dict.fromkeys(numbers) if n not in held)
    step = r'" "? [-+*/] " "? gterm'
    if held:
        step += ' | " "? "/" " "? gdiv'
    return [
        r'gexpr ::= "\"" gsum "\""',
        f'gsum ::= gterm ( {step} ){{0,12}}',
        r'gterm ::= gnum | "-" gnum | "(" gsum ")" | gfn "(" gsum ( "," " "? gsum ){0,8} ")"',
        r'gfn ::= "max" | "min" | "round" | "abs" | "sqrt"',
        f"gnum ::= {nums}",
        *([f"gdiv ::= {' | '.join(gbnf_literal(n) for n in held)}"] if held else []),
    ]


def grounded_answer_rules(figures: Sequence[str], *, sane_counts: bool = True) -> list[str]:
    """GBNF for an answer (rule ``gsay``) whose first number, if it has one, is one of ``figures``
    (``answer_figures``), read whole: no digit, and no ``.`` or ``,`` then a digit, right after it.
    With ``sane_counts`` (the ``say`` rules of ``sane_count_say_rules`` beside it) the text after
    it follows them, and a count of seven or more digits takes no scale word."""
    long = [f for f in figures if "." not in f and len(f.replace(",", "")) >= 7] if sane_counts else []
    short = [f for f in figures if f not in set(long)]
    rest = "sseg* snum?" if sane_counts else "[^<>{}`]*"
    rules = [
        r'gsay ::= gch0 gnd* | ( gch0 gnd* )? gfig',
        r'gch0 ::= [^<>\n{}`0-9, ]',
        r'gnd ::= [^<>{}`0-9,] | "," [^<>{}`0-9]',
        f"grest ::= {rest}",
        r'gend ::= [^<>{}`0-9,.] grest | "," [^<>{}`0-9] grest | "." ( [^<>{}`0-9] grest )?',
    ]
    figs = []
    if short:
        rules.append(f"gshort ::= {gbnf_choice(short)}")
        figs.append("gshort gend?")
    if long:
        rules.append(f"glong ::= {gbnf_choice(long)}")
        figs.append("glong ( safter grest )?")
    return [*rules, f"gfig ::= {' | '.join(figs) or 'gch0'}"]


def _gbnf_escape(text: str) -> str:
    return json.dumps(text)[1:-1].replace("\\", "\\\\").replace('"', '\\"')


__all__ = [
    "ARITHMETIC_CONSTANTS",
    "ASSISTANT_START",
    "GROUNDED_ARGUMENTS",
    "ITEMS_PREFIX",
    "SANE_COUNT_SAY_RULES",
    "SCALE_DIVISORS",
    "ChatMLFormat",
    "FewShotFormat",
    "FormattedBackend",
    "PromptFormat",
    "answer_figures",
    "chatml_gbnf",
    "chosen_item",
    "format_for",
    "gbnf_choice",
    "grounded_answer_rules",
    "grounded_arithmetic_rules",
    "grounded_result_options",
    "joined_question",
    "just_merged",
    "long_counts",
    "not_prefix_rule",
    "numbers_in_context",
    "numbers_in_last_tool_response",
    "own_outline",
    "sane_count_say_rules",
    "spawn_instruction",
    "tool_response_fields",
    "tool_signature",
    "tools_in_prompt",
]
