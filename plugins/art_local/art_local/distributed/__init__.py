"""``LocalBackend`` training across processes, GPUs and nodes on ``torch.distributed`` (DDP or FSDP2).

``LocalBackend(path, train_devices=2)`` or ``train_devices=DistributedConfig(...)`` runs the functional trainer
in torchrun-launched workers (one per device) while the user's event loop, the inference server and the
``TrainingState`` stay in the parent. See ``DISTRIBUTED.md`` for the commands, the channel protocol
(``channel``, ``protocol``) and how a batch is split (``step``).
"""

from art_local.distributed.config import DistributedConfig, resolve_train_devices
from art_local.distributed.group import DistributedWorkerError, WorkerGroup

__all__ = ["DistributedConfig", "DistributedWorkerError", "WorkerGroup", "resolve_train_devices"]
