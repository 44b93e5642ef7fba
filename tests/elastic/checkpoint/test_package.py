"""The package's lazily exported names (elastic/checkpoint/__init__.py)."""

from __future__ import annotations

import importlib
import inspect


def test_lazy_names_are_the_functions_even_after_every_submodule_loaded() -> None:
    for module in ("manager", "model_state", "dcp_io", "streamed"):
        importlib.import_module(f"elastic.checkpoint.{module}")
    from elastic.checkpoint import CheckpointManager, app_state, restore_app_state

    assert inspect.isfunction(app_state) and app_state.__name__ == "app_state"
    assert inspect.isfunction(restore_app_state) and inspect.isclass(CheckpointManager)
