"""Suite 4, token latency on real trajectories: critical-path vs total tokens of recorded parallel reasoning.

For each recorded transcript (Multiverse dialect) the parallel structure is
parsed with ``apr_agents.protocol.parse_document(text, "multiverse")``; then

    total  = tokens of the model-written text
    CP     = total - sum over parallel blocks of (sum of its threads - its longest thread's CP)

(nested blocks inside a thread recurse), i.e. the tokens a perfectly parallel
engine would decode one after another. ratio = total / CP (ThreadWeaver's
"token latency" speed-up). Tokens: whitespace pieces always; Gemma 3's
tokenizer too when the embedded GGUF and llama.cpp are installed (offline).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apr_agents.protocol.document import BlockNode, ThreadNode, parse_document

from .common import Bar, SuiteResult, md_table, new_figure, save_figure

REPO = Path(__file__).resolve().parents[2]
ANCHORS = {"ThreadWeaver (mean)": 1.22, "ThreadWeaver (best benchmark)": 1.53, "Multiverse-32B": "1.15–1.18"}


def traces_dir() -> Path:
    env = os.environ.get("APR_TRACES")
    if env:
        return Path(env)
    bundled = REPO / "tests" / "data" / "traces"  # the repo's copy of ../shared/traces
    return bundled if bundled.is_dir() else REPO.parent / "shared" / "traces"


def model_text(path: Path) -> str:
    """The model-written part of a recorded file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    marker = "<|im_start|>assistant"
    if marker in text:  # a raw Multiverse-32B output: problem, chat template, transcript, extracted answer
        text = text[text.index(marker) + len(marker):]
        for end in ("提取的答案", "<|im_start|>"):
            if end in text:
                text = text[: text.index(end)]
        text = text.replace("<|im_end|>", "")
    return text.strip()


def whitespace_tokens(text: str) -> int:
    return len(text.split())


def gemma_tokenizer() -> tuple[Callable[[str], int] | None, str]:
    try:
        import llama_cpp

        from apr_agents.backends.embedded import model_path

        llm = llama_cpp.Llama(model_path=str(model_path()), vocab_only=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - optional: fall back to whitespace only
        return None, f"Gemma tokenizer unavailable ({type(exc).__name__}: {exc})"

    def count(text: str) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0

    return count, "Gemma 3 tokenizer (from the embedded GGUF, via llama.cpp vocab_only)"


def _saving(block: BlockNode, tok: Callable[[str], int]) -> int:
    if not block.threads:
        return 0
    sizes = [tok(t.text) for t in block.threads]
    cps = [_thread_cp(t, tok, n) for t, n in zip(block.threads, sizes, strict=True)]
    return sum(sizes) - max(cps)


def _thread_cp(th: ThreadNode, tok: Callable[[str], int], size: int) -> int:
    return size - sum(_saving(b, tok) for b in th.blocks)


def measure(text: str, tok: Callable[[str], int]) -> dict[str, Any]:
    doc = parse_document(text, "multiverse")
    total = tok(text)
    cp = total - sum(_saving(b, tok) for b in doc.blocks)
    cp = max(1, cp)
    blocks = doc.all_blocks()
    return {"total": total, "critical_path": cp, "ratio": total / cp, "blocks": len(blocks),
            "threads": sum(len(b.threads) for b in blocks), "repairs": len(doc.repairs)}


def run(quick: bool = False, out_dir: Path | None = None, directory: Path | None = None) -> SuiteResult:
    res = SuiteResult("traces", "Token latency on real trajectories: critical-path vs total tokens", quick)
    t0 = time.perf_counter()
    root = directory or traces_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".xml", ".txt"))
    if not files:
        res.skipped.append(f"no trace files under {root}")
        res.markdown = "No trajectories found."
        res.seconds = time.perf_counter() - t0
        return res
    gemma, gemma_note = gemma_tokenizer()
    per_file = []
    with Bar("traces", len(files)) as bar:
        for p in files:
            text = model_text(p)
            row: dict[str, Any] = {"file": str(p.relative_to(root)), "set": p.parent.name,
                                   "ws": measure(text, whitespace_tokens)}
            if gemma is not None:
                row["gemma"] = measure(text, gemma)
            per_file.append(row)
            bar.step(p.name)
    keys = ["ws"] + (["gemma"] if gemma is not None else [])
    names = {"ws": "whitespace", "gemma": "Gemma 3"}
    sets = sorted({r["set"] for r in per_file})
    summary: dict[str, Any] = {}
    rows = []
    for s in [*sets, "all"]:
        rs = [r for r in per_file if s in ("all", r["set"])]
        par = [r for r in rs if r["ws"]["blocks"] > 0]
        entry: dict[str, Any] = {"files": len(rs), "with_parallel_blocks": len(par)}
        for k in keys:
            ratios = [r[k]["ratio"] for r in rs]
            entry[k] = {
                "mean_ratio": statistics.fmean(ratios),
                "median_ratio": statistics.median(ratios),
                "max_ratio": max(ratios),
                "pooled_ratio": sum(r[k]["total"] for r in rs) / sum(r[k]["critical_path"] for r in rs),
                "mean_ratio_parallel_only": statistics.fmean([r[k]["ratio"] for r in par]) if par else None,
                "total_tokens": sum(r[k]["total"] for r in rs),
                "critical_path_tokens": sum(r[k]["critical_path"] for r in rs),
            }
            rows.append([s, names[k], len(rs), len(par), entry[k]["total_tokens"], entry[k]["critical_path_tokens"],
                         entry[k]["mean_ratio"], entry[k]["median_ratio"], entry[k]["max_ratio"],
                         entry[k]["pooled_ratio"]])
        summary[s] = entry
    res.data = {"directory": str(root), "tokenizers": {"whitespace": "str.split()", "gemma": gemma_note},
                "anchors": ANCHORS, "summary": summary, "files": per_file}
    detail = md_table(["file", "blocks", "threads", "repairs", "total (ws)", "CP (ws)", "ratio (ws)"]
                      + (["total (Gemma)", "CP (Gemma)", "ratio (Gemma)"] if gemma else []),
                      [[r["file"], r["ws"]["blocks"], r["ws"]["threads"], r["ws"]["repairs"], r["ws"]["total"],
                        r["ws"]["critical_path"], r["ws"]["ratio"]]
                       + ([r["gemma"]["total"], r["gemma"]["critical_path"], r["gemma"]["ratio"]] if gemma else [])
                       for r in per_file], digits=3)
    res.markdown = "\n".join([
        f"{len(files)} recorded transcripts from `{root}` (see its README: Multiverse-1K training samples and raw "
        "Multiverse-32B outputs; for the latter only the assistant's part is counted). Parsed with "
        "`parse_document(text, \"multiverse\")`; the critical path takes the longest thread of each parallel "
        "block (recursively) instead of all of them. ratio = total / critical-path tokens; mean = mean of "
        "per-file ratios (files without parallel blocks count as 1.0), pooled = Σ total / Σ critical path.", "",
        f"Tokenizers: whitespace (`str.split`); {gemma_note}.", "",
        "Published anchors: ThreadWeaver 1.22× mean token-latency speed-up (1.53× on its best benchmark); "
        "Multiverse-32B ×1.15–1.18.", "",
        md_table(["set", "tokenizer", "files", "with blocks", "total tokens", "critical-path tokens", "mean ratio",
                  "median ratio", "max ratio", "pooled ratio"], rows, digits=3), "",
        "<details><summary>Per file</summary>", "", detail, "", "</details>"])
    k = "gemma" if gemma is not None else "ws"
    for s in sets:
        m = summary[s][k]["mean_ratio"]
        res.goal(f"mean token-latency ratio, {s} ({names[k]})", m, "anchors 1.22 (TW), 1.15–1.18 (MV-32B)", None,
                 "a measurement of the recordings, not of the plugin")
    if out_dir is not None:
        res.plot = _plot(per_file, k, out_dir / f"traces{'-quick' if quick else ''}.png")
    res.seconds = time.perf_counter() - t0
    return res


def _plot(per_file: list[dict[str, Any]], k: str, path: Path) -> str | None:
    made = new_figure(path, (6.4, 3.6))
    if made is None:
        return None
    fig, ax = made
    for s in sorted({r["set"] for r in per_file}):
        xs = [r[k]["total"] for r in per_file if r["set"] == s]
        ys = [r[k]["ratio"] for r in per_file if r["set"] == s]
        ax.scatter(xs, ys, label=s, s=18)
    ax.axhline(1.22, ls="--", c="grey", lw=1, label="ThreadWeaver mean 1.22")
    ax.axhspan(1.15, 1.18, color="orange", alpha=0.15, label="Multiverse-32B 1.15–1.18")
    ax.set_xscale("log")
    ax.set_xlabel(f"total tokens of the transcript ({'Gemma 3' if k == 'gemma' else 'whitespace'})")
    ax.set_ylabel("total / critical-path tokens")
    ax.set_title("Token latency of recorded parallel reasoning")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
