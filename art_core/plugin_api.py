"""What a backend plugin builds on: every helper the shipped plugins and the example use, in one place.

``from art_core.plugin_api import ...`` is the supported way to reach these; the modules they come from may
move. Users' training code needs only ``import art_core as art``. The groups:

- options: ``TrainOptions`` (build it on the first line of ``train()``), ``check_number``/``check_flag``/
  ``check_choice`` for a backend's own options, ``COMMON_TRAIN_DEFAULTS``, ``ImportanceSamplingLevel`` and
  ``IMPORTANCE_SAMPLING_LEVELS``, ``ADAMW`` (an ``AdamWDefaults``: the optimizer defaults backends share);
- groups and advantages: ``check_groups``, ``is_choice``, ``group_advantages``, ``batch_advantages``,
  ``normalize_batch``, ``is_trainable_group``, ``mean_reward_std_dev``, ``check_advantage_balance``;
- names: ``validate_name``, ``validate_model_name`` (what a model or project name may be);
- durable writes: ``atomic_write_bytes``/``atomic_write_text``/``atomic_write_with``, ``atomic_replace_dir``,
  ``fsync_dir``, ``fsync_tree``, ``remove_stale_temporaries`` (of temp names ``TEMP_FILE_GLOB`` and
  ``STALE_DIR_PREFIXES``);
- serving: ``bind_socket`` (a listening socket, port 0 = free), ``is_loopback``, ``url_host``, and
  ``KEEP_ALIVE_S`` (uvicorn's ``timeout_keep_alive``: longer than clients keep idle connections) and
  ``LISTEN_BACKLOG``;
- history and plugins: ``read_history``, ``get_backend_class``.
"""

from __future__ import annotations

from art_core.advantages import (
    batch_advantages,
    check_advantage_balance,
    group_advantages,
    is_trainable_group,
    mean_reward_std_dev,
    normalize_batch,
)
from art_core.durable import (
    STALE_DIR_PREFIXES,
    TEMP_FILE_GLOB,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_text,
    atomic_write_with,
    fsync_dir,
    fsync_tree,
    remove_stale_temporaries,
)
from art_core.history import read_history
from art_core.model_checks import validate_model_name, validate_name
from art_core.plugins import get_backend_class
from art_core.serving import KEEP_ALIVE_S, LISTEN_BACKLOG, bind_socket, is_loopback, url_host
from art_core.train_options import (
    ADAMW,
    COMMON_TRAIN_DEFAULTS,
    IMPORTANCE_SAMPLING_LEVELS,
    AdamWDefaults,
    ImportanceSamplingLevel,
    TrainOptions,
    check_choice,
    check_flag,
    check_number,
)
from art_core.trajectories import check_groups, is_choice

__all__ = [
    "ADAMW",
    "COMMON_TRAIN_DEFAULTS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KEEP_ALIVE_S",
    "LISTEN_BACKLOG",
    "STALE_DIR_PREFIXES",
    "TEMP_FILE_GLOB",
    "AdamWDefaults",
    "ImportanceSamplingLevel",
    "TrainOptions",
    "atomic_replace_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_with",
    "batch_advantages",
    "bind_socket",
    "check_advantage_balance",
    "check_choice",
    "check_flag",
    "check_groups",
    "check_number",
    "fsync_dir",
    "fsync_tree",
    "get_backend_class",
    "group_advantages",
    "is_choice",
    "is_loopback",
    "is_trainable_group",
    "mean_reward_std_dev",
    "normalize_batch",
    "read_history",
    "remove_stale_temporaries",
    "url_host",
    "validate_model_name",
    "validate_name",
]
