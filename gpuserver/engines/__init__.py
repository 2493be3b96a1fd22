"""Lip-sync engines, created by name.

Engine modules are imported only when asked for, so a CPU install never imports the GPU
engines' dependencies (torch) and importing this package stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from gpuserver.config import EngineSettings
from gpuserver.engines.base import LipSyncEngine

# name -> (module, class); new engines register here.
_ENGINES: dict[str, tuple[str, str]] = {
    "warp": ("gpuserver.engines.warp", "WarpEngine"),
    "musetalk": ("gpuserver.engines.musetalk.engine", "MusetalkEngine"),
    "clapper": ("gpuserver.engines.clapper", "ClapperEngine"),
}
ENGINE_NAMES = tuple(_ENGINES)


def create_engine(
    name: str, settings: EngineSettings | None = None, **options: Any
) -> LipSyncEngine:
    """A new engine `name`, from `settings` if given, else constructed with `options`.

    Raises ValueError for unknown names.
    """
    try:
        module_name, class_name = _ENGINES[name]
    except KeyError:
        known = ", ".join(ENGINE_NAMES)
        raise ValueError(f"unknown lip-sync engine {name!r}; known engines: {known}") from None
    if name == "musetalk" and settings is not None:
        # Torch-free: missing weights fail at once, not after importing torch (~10 s).
        from gpuserver.engines.musetalk.layout import check_weights

        check_weights(settings.models_dir)
    engine_class = getattr(import_module(module_name), class_name)
    if settings is not None:
        return engine_class.from_settings(settings)
    return engine_class(**options)
