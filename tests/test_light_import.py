"""import art_core stays light: no torch, transformers, vllm, wandb or fastapi (nor openai/pyarrow until used)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "vllm", "wandb", "fastapi"]
DEFERRED = ["openai", "pyarrow", "polars", "tqdm", "matplotlib"]


def loaded_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in json.loads(out)}


def test_import_art_core_loads_no_heavy_module() -> None:
    loaded = loaded_after("import art_core")
    assert not loaded & set(HEAVY + DEFERRED)


def test_building_trajectories_and_listing_plugins_stays_light() -> None:
    loaded = loaded_after(
        "import art_core as art\n"
        "art.Trajectory(messages_and_choices=[{'role': 'user', 'content': 'hi'}], reward=1.0)\n"
        "art.list_reporters()\n"
        "from art_core.cli import cli"
    )
    assert not loaded & set(HEAVY)
