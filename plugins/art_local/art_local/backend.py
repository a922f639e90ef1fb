"""``LocalBackend``: train with the functional trainer of ``art_local.training`` and serve through
``art_local.inference`` on this machine (CPU fp32, or CUDA bf16 when present).

``await model.register(backend)`` loads the base model, resumes from the last complete checkpoint under
``{path}/{project}/models/{name}/checkpoints/`` and starts the OpenAI-compatible server; ``backend.train(model,
groups, ...)`` takes one optimizer step per call, writes ``checkpoints/{step:04d}/`` and publishes the new
weights to the server. ``backend.train()`` never logs: call ``model.log(...)``.
"""

# size: the Backend protocol, train(), train_sft() and fork_checkpoint() with their many keyword options, each
# a thin step into art_local.training/inference; the option lists are the public API and are long by design.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO, TypeVar

from art_core.model import Model, TrainableModel
from art_core.plugin_api import ImportanceSamplingLevel, TrainOptions, atomic_replace_dir, check_groups
from art_core.results import LocalTrainResult
from art_core.sft import AssistantTurns, LearningRateSchedule, SFTOptions
from art_core.trajectories import Trajectory, TrajectoryGroup
from art_local.openmp import releasing_openmp_workers

if TYPE_CHECKING:
    import torch

    from art_local.distributed import DistributedConfig, WorkerGroup
    from art_local.inference.service import InferenceService
    from art_local.inference.vllm_config import VLLMEngineConfig
    from art_local.training import StepConfig, TrainerConfig, TrainingComponents, TrainingState


_T = TypeVar("_T")


def trainer_thread(name: str) -> ThreadPoolExecutor:
    """The one thread that runs a model's training work (load, steps, checkpoints, merging for publish).

    Always the same thread, not any of asyncio's default executor's: glibc gives every thread its own malloc
    arena, and a step that lands on another thread than the last one page-faults its activations in afresh
    (measured on the 18M model: 5k-20k minor faults and 0.40 s instead of 0.30 s per forward/backward); one
    thread also keeps one OpenMP team.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"art-trainer-{name}")


async def run_on(executor: ThreadPoolExecutor, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """``function(*args, **kwargs)`` on ``executor``'s thread, awaited; the thread's OpenMP workers are given
    back afterwards (see ``art_local.openmp``), so sampling between jobs runs at full speed."""
    loop = asyncio.get_running_loop()
    job = releasing_openmp_workers(functools.partial(function, *args, **kwargs))
    return await loop.run_in_executor(executor, job)


@dataclass
class _Slot:
    """Mutable per-model bookkeeping of one backend (the trainer components and the state they reached)."""

    model: TrainableModel
    trainer: ThreadPoolExecutor  # the thread all of this model's training work runs on
    components: TrainingComponents | None  # None: the model trains in worker processes (``workers``)
    tokenizer: Any
    state: TrainingState
    lock_file: TextIO
    base_model: str
    is_lora: bool
    workers: WorkerGroup | None = None
    train_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    served: bool = False


def _checkpoints_dir(model: Model) -> Path:
    return model.output_dir() / "checkpoints"


SERVING_ADAPTERS_KEPT = 2


def write_serving_adapter(peft_model: Any, model_dir: Path, step: int) -> Path:
    """Write only the peft adapter of ``step`` to ``{model_dir}/serving/{step:04d}`` (atomically and durably) for
    an engine that loads adapters from disk, and remove all but the newest ``SERVING_ADAPTERS_KEPT`` of them."""
    root = model_dir / "serving"
    target = atomic_replace_dir(
        root / f"{step:04d}", lambda staging: peft_model.save_pretrained(str(staging))
    )
    for old in sorted(p for p in root.iterdir() if p.name.isdigit())[:-SERVING_ADAPTERS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return target


class LocalBackend:
    """Trains and serves models on this machine.

    Per-backend trainer settings live in ``trainer_config`` (``TrainerConfig``: ``lora_rank`` — None for a
    full fine-tune —, ``lora_alpha``, ``lora_targets``, AdamW ``betas``/``eps``/``weight_decay``,
    ``max_grad_norm``, ``dtype``, ``max_sequence_length``, ``micro_batch_rows``, ``seed``,
    ``activation_checkpointing``, ``memory_check``, ``quantization`` — a NF4/int8 LoRA base, served dequantized
    so sampler and trainer agree). Per-call options go to ``train()``. ``register`` refuses (``MemoryPlanError``,
    with the options that would fit) a model whose step ``plan_memory`` says the device cannot hold (per rank
    under ``train_devices``). ``allow_config_mismatch=True`` resumes from a checkpoint written with other
    settings.
    ``engine``/``host``/``port``/``api_key`` configure the inference server: ``engine="auto"`` serves with
    vLLM on a CUDA machine whose vLLM interpreter finds vllm, else with transformers; ``vllm`` (a
    ``VLLMEngineConfig``) says how vLLM runs (interpreter, memory fraction, lengths, parallelism, LoRA limits,
    extra flags, environment, sleep around ``train()``).
    ``train_devices`` (an int N or a ``DistributedConfig``) trains in N torchrun worker processes (DDP or FSDP,
    one per GPU, across nodes; see DISTRIBUTED.md) while this process serves; ``device`` is then the inference
    device only. None (the default) trains in this process.
    """

    def __init__(
        self,
        path: str = ".art",
        device: str | torch.device | None = None,
        *,
        trainer_config: TrainerConfig | None = None,
        allow_config_mismatch: bool = False,
        engine: Literal["auto", "hf", "vllm"] = "auto",
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        train_devices: int | DistributedConfig | None = None,
        vllm: VLLMEngineConfig | None = None,
    ) -> None:
        from art_local.inference.vllm_config import for_trainer
        from art_local.training import TrainerConfig
        from art_local.training.state import resolve_device, resolve_dtype

        self._path = str(path)
        self._device = device
        self._config = trainer_config if trainer_config is not None else TrainerConfig()
        self._allow_config_mismatch = allow_config_mismatch
        self._distributed: DistributedConfig | None = None
        if train_devices is not None:
            from art_local.distributed import resolve_train_devices

            self._distributed = resolve_train_devices(train_devices)
            if self._config.quantization != "none" and self._distributed.strategy == "fsdp":
                raise ValueError(
                    f"TrainerConfig(quantization={self._config.quantization!r}) trains under "
                    "DistributedConfig(strategy='ddp') only: FSDP cannot shard bitsandbytes' packed weights; "
                    "use strategy='ddp' or quantization='none'"
                )
        if self._config.lora_rank is None:
            if engine == "vllm":
                raise ValueError(
                    "engine='vllm' serves LoRA adapters, so it cannot serve a full fine-tune "
                    "(trainer_config.lora_rank=None); use engine='hf' or a LoRA rank"
                )
            engine = "hf" if engine == "auto" else engine  # vLLM hot-loads adapters only
        self._service_options: dict[str, Any] = {
            "engine": engine,
            # the sampler computes in the dtype the trainer was told to (auto: the same rule on both sides), so
            # TrainerConfig(dtype="float32") on a bf16-capable CPU does not sample in bf16 and train in fp32
            "dtype": None
            if self._config.dtype == "auto"
            else resolve_dtype(self._config.dtype, resolve_device(device)),
            "host": host,
            "port": port,
            "api_key": api_key,
            "vllm": for_trainer(vllm, trainer_on_cuda=resolve_device(device).type == "cuda"),
        }
        self._service: InferenceService | None = None
        self._slots: dict[str, _Slot] = {}
        self._register_lock = asyncio.Lock()
        os.makedirs(self._path, exist_ok=True)

    @property
    def trainer_config(self) -> TrainerConfig:
        """The trainer settings every model of this backend uses."""
        return self._config

    async def __aenter__(self) -> LocalBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the Backend protocol ---------------------------------------------------------------------------------

    async def register(self, model: Model) -> None:
        """Load ``model``'s base model and resume from its last complete checkpoint (idempotent)."""
        owner = model._backend
        if owner is not None and owner is not self:
            raise ValueError(
                f"model {model.name!r} is already registered with another {type(owner).__name__}; "
                "create a new Model object to use this backend"
            )
        model.base_path = self._path
        if not isinstance(model, TrainableModel):
            return
        self._check_inference()
        async with self._register_lock:
            existing = self._slots.get(model.name)
            if existing is not None:
                before = (existing.model.project, existing.model.base_model)
                if before != (model.project, model.base_model):
                    raise ValueError(
                        f"a model named {model.name!r} (project {before[0]!r}, base_model {before[1]!r}) is already "
                        f"registered with this backend; use another name for project {model.project!r}, "
                        f"base_model {model.base_model!r}"
                    )
                existing.model = model
                return
            trainer = trainer_thread(model.name)
            try:
                self._slots[model.name] = await run_on(trainer, self._load, model, trainer)
            except BaseException:
                trainer.shutdown(wait=False)
                raise

    async def close(self) -> None:
        """Stop the inference server and release every model (idempotent)."""
        service, self._service = self._service, None
        if service is not None:
            await service.close()
        slots, self._slots = self._slots, {}
        for slot in slots.values():
            try:
                if slot.workers is not None:
                    await asyncio.to_thread(slot.workers.close)  # bounded: shutdown, then SIGTERM/SIGKILL
            finally:
                slot.trainer.shutdown(wait=False)
                slot.lock_file.close()  # releases the flock

    async def _get_step(self, model: TrainableModel) -> int:
        slot = self._slots.get(model.name)
        if slot is not None:
            return slot.state.step
        from art_local.training import checkpoint_steps

        steps = checkpoint_steps(_checkpoints_dir(model))
        return steps[-1] if steps else 0

    async def _delete_checkpoint_files(self, model: TrainableModel, steps_to_keep: list[int]) -> None:
        from art_local.training import checkpoint_steps

        directory = _checkpoints_dir(model)
        keep = set(steps_to_keep)
        slot = self._slots.get(model.name)
        if slot is not None and slot.served and self._service is not None:
            # before the files go: the server stops serving (vLLM: unloads) these steps while they still exist
            await self._service.forget_steps(model.name, keep)
        for step in checkpoint_steps(directory):
            if step not in keep:
                doomed = directory / f".old-{step:04d}-{os.getpid()}"
                os.rename(directory / f"{step:04d}", doomed)  # gone from get_step's view at once
                await asyncio.to_thread(shutil.rmtree, doomed, True)

    def _model_inference_name(self, model: Model, step: int | None = None) -> str:
        return model.name if step is None else f"{model.name}@{step}"

    async def _prepare_backend_for_training(self, model: TrainableModel) -> tuple[str, str]:
        """Register if needed, start the inference server and serve ``model``; returns (base_url, api_key)."""
        if model.name not in self._slots:
            await self.register(model)
        slot = self._slots[model.name]
        service = await self._started_service()
        if not slot.served:
            from art_local.training import merged_state_dict

            weights = None
            # a quantized base is served as trained (dequantized) from step 0 on, not as the checkpoint on disk
            trained = slot.state.step > 0 or self._config.quantization != "none"
            if trained and slot.workers is not None:
                from art_local.distributed.remote import merged_weights

                weights = await run_on(slot.trainer, merged_weights, slot.workers)
            elif trained and slot.components is not None:
                weights = await run_on(slot.trainer, merged_state_dict, slot.components)
            latest = _checkpoints_dir(model) / f"{slot.state.step:04d}"
            await service.add_model(
                model.name,
                base_model=slot.base_model,
                step=slot.state.step,
                weights=weights,
                load_step=functools.partial(self._step_weights, model),
                # a resumed LoRA step: the vLLM engine serves it from its adapter directory
                adapter_dir=latest if weights is not None and slot.is_lora and latest.is_dir() else None,
            )
            if service.engine_kind == "vllm":
                from art_local.inference.vllm import serve_kept_checkpoints

                kept = _checkpoints_dir(model)
                await serve_kept_checkpoints(service.engine, model.name, kept, slot.state.step)
            else:
                from art_local.training import checkpoint_steps

                self._note_kept(model, checkpoint_steps(_checkpoints_dir(model)))
            slot.served = True
        return service.base_url, service.api_key

    # -- training ---------------------------------------------------------------------------------------------

    async def train(
        self,
        model: TrainableModel,
        trajectory_groups: Iterable[TrajectoryGroup],
        /,
        *,
        learning_rate: float = 5e-6,
        ppo: bool = False,
        epsilon: float | None = None,
        epsilon_high: float | None = None,
        advantage_balance: float = 0.0,
        scale_rewards: bool = True,
        importance_sampling_level: ImportanceSamplingLevel = "token",
        max_negative_advantage_importance_sampling_weight: float | None = None,
        mask_prob_ratio: bool = False,
        kimi_k2_tau: float | None = None,
        precalculate_logprobs: bool = False,
        allow_training_without_logprobs: bool = False,
        plot_tensors: bool = False,
        truncated_importance_sampling: float | None = None,
        scale_learning_rate_by_reward_std_dev: bool = False,
        logprob_calculation_chunk_size: int = 1024,
        kl_penalty_coef: float = 0.0,
        save_checkpoint: bool = True,
        verbose: bool = False,
    ) -> LocalTrainResult:
        """One optimizer step on ``trajectory_groups`` (docs/rl-math.md); returns the new step and its metrics.

        A batch without a trainable group still advances the step (0 gradient steps). ``save_checkpoint=False``
        writes nothing under ``checkpoints/``. ``plot_tensors=True`` writes ``tensors/{step:04d}.png``.
        """
        TrainOptions(
            learning_rate=learning_rate,
            ppo=ppo,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            advantage_balance=advantage_balance,
            scale_rewards=scale_rewards,
            importance_sampling_level=importance_sampling_level,
        )
        from art_local.training import LossConfig, StepConfig

        slot = self._slot(model)
        self._check_inference()
        loss = LossConfig(
            ppo=ppo,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            importance_sampling_level=importance_sampling_level,
            max_negative_advantage_importance_sampling_weight=max_negative_advantage_importance_sampling_weight,
            mask_prob_ratio=mask_prob_ratio,
            kimi_k2_tau=kimi_k2_tau,
            kl_penalty_coef=kl_penalty_coef,
            truncated_importance_sampling=truncated_importance_sampling,
        )
        groups = check_groups(trajectory_groups)
        step = StepConfig(
            learning_rate=learning_rate,
            loss=loss,
            logprob_calculation_chunk_size=logprob_calculation_chunk_size,
            scale_rewards=scale_rewards,
            advantage_balance=advantage_balance,
            allow_training_without_logprobs=allow_training_without_logprobs,
            precalculate_logprobs=precalculate_logprobs,
            scale_learning_rate_by_reward_std_dev=scale_learning_rate_by_reward_std_dev,
            plot_tensors=plot_tensors,
            verbose=verbose,
            save_checkpoint=save_checkpoint,
        )
        async with slot.train_lock:
            return await self._train_locked(slot, groups, step)

    async def train_sft(
        self,
        model: TrainableModel,
        trajectories: Iterable[Trajectory],
        /,
        *,
        learning_rate: float = 1e-4,
        epochs: int = 1,
        batch_size: int = 8,
        assistant_turns: AssistantTurns = "all",
        schedule: LearningRateSchedule = "cosine",
        warmup_ratio: float = 0.0,
        shuffle_seed: int | None = 0,
        save_checkpoint: bool = True,
        verbose: bool = False,
    ) -> LocalTrainResult:
        """Supervised fine-tuning on the assistant turns of ``trajectories`` (art_core.sft): one step of the
        model, written to ``checkpoints/{step:04d}/`` and served as ``name@step`` like a ``train()`` step."""
        from art_local.sft import train_sft

        options = SFTOptions(
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            assistant_turns=assistant_turns,
            schedule=schedule,
            warmup_ratio=warmup_ratio,
            shuffle_seed=shuffle_seed,
        )
        return await train_sft(
            self, model, trajectories, options, save_checkpoint=save_checkpoint, verbose=verbose
        )

    # -- checkpoint forking -----------------------------------------------------------------------------------

    async def fork_checkpoint(
        self,
        model: TrainableModel,
        from_model: str,
        from_project: str | None = None,
        *,
        not_after_step: int | None = None,
        from_s3_bucket: str | None = None,
        prefix: str | None = None,
        verbose: bool = False,
    ) -> int:
        """Start ``model`` from the latest checkpoint of ``from_model`` (in ``from_project``, default the same
        project) that is not after ``not_after_step``; returns the forked step.

        Call it before ``await model.register(backend)``: registering then resumes at that step, and
        ``model.get_inference_name(step)`` (``name@step``) serves it. ART's name
        ``_experimental_fork_checkpoint`` is an alias.
        """
        from art_local.fork import fork_checkpoints, source_dir

        if from_s3_bucket is not None or prefix is not None:
            raise NotImplementedError(
                "LocalBackend forks from its own path only; download the checkpoint to "
                f"{self._path}/<project>/models/<name>/checkpoints/<step> first, then fork without from_s3_bucket"
            )
        if model.name in self._slots:
            raise ValueError(
                f"model {model.name!r} is already registered with this backend; fork_checkpoint() it before "
                "`await model.register(backend)`, or fork into a new model name"
            )
        root = Path(self._path)
        source_project = from_project or model.project
        source = source_dir(root, source_project, from_model)
        destination = root / model.project / "models" / model.name / "checkpoints"
        step = await asyncio.to_thread(fork_checkpoints, source, destination, not_after_step)
        if verbose:
            print(f"forked {source_project}/{from_model} step {step} into {model.project}/{model.name}")
        return step

    _experimental_fork_checkpoint = fork_checkpoint

    # -- internals --------------------------------------------------------------------------------------------

    async def _train_locked(
        self, slot: _Slot, groups: list[TrajectoryGroup], step: StepConfig
    ) -> LocalTrainResult:
        from art_local.training import save_checkpoint
        from art_local.training.call import StepOutcome, train_on_groups

        if slot.workers is not None:
            return await self._train_with_workers(slot, slot.workers, groups, step)
        model, components = slot.model, slot.components
        assert components is not None
        publish_here = self._publisher_on_trainer(slot, components)
        started = time.perf_counter()
        done: list[StepOutcome] = []
        spans: dict[str, float] = {}

        def job() -> Path | None:
            """The step, its checkpoint and (transformers engine) its publish: one job, one OpenMP pool."""
            outcome = train_on_groups(
                components,
                slot.tokenizer,
                slot.state,
                groups,
                step,
                model_dir=model.output_dir(),
                label=model.name,
            )
            done.append(outcome)
            directory = (
                _checkpoints_dir(model) / f"{outcome.state.step:04d}" if step.save_checkpoint else None
            )
            if directory is not None:
                save_checkpoint(components, outcome.state, directory)
            spans["trainer"] = time.perf_counter() - started
            if publish_here is not None:
                publish_started = time.perf_counter()
                publish_here(outcome.state.step)
                spans["publish"] = time.perf_counter() - publish_started
            return directory

        try:
            async with self._inference_asleep():
                directory = await run_on(slot.trainer, job)
        finally:
            if done:  # the weights have moved: the step happened even if the write or the publish failed
                slot.state = done[0].state
        outcome = done[0]
        # time/step_publish_s is 0 for a model that is not served (nothing to publish to)
        metrics = {**outcome.metrics, "time/step_trainer_s": spans["trainer"], "time/step_publish_s": 0.0}
        if publish_here is not None:
            metrics["time/step_publish_s"] = spans["publish"]
            if directory is not None:
                self._note_kept(model, [outcome.state.step])
        elif slot.served and self._service is not None:
            publish_started = time.perf_counter()
            await self._publish(slot, components, outcome.state.step, directory)
            metrics["time/step_publish_s"] = time.perf_counter() - publish_started
        return LocalTrainResult(
            step=outcome.state.step,
            metrics=metrics,
            checkpoint_path=None if directory is None else str(directory),
        )

    def _publisher_on_trainer(
        self, slot: _Slot, components: TrainingComponents
    ) -> Callable[[int], None] | None:
        """The transformers engine's publish of a step, to call on the trainer's thread; None when the model is
        not served, or vLLM serves it (it hot-loads adapters, after waking).

        A step and its publish then share one job, so one OpenMP pool: a pool started afresh for a second job
        cost 5-18 ms on the tiny model whenever another thread had computed in between (0.1 ms otherwise).
        """
        from art_local.inference.hf import HFEngine
        from art_local.training import merged_weights

        service = self._service
        if not slot.served or service is None or not isinstance(service.engine, HFEngine):
            return None
        engine, name = service.engine, slot.model.name
        return lambda step: engine.publish_sync(name, step, merged_weights(components))

    async def _publish(
        self, slot: _Slot, components: TrainingComponents, step: int, directory: Path | None
    ) -> None:
        """Serve ``step``: the transformers engine copies the live weights into a module of its own, LoRA layers
        merged straight into it (the train lock keeps the optimizer off the weights meanwhile), in one job on the
        trainer's thread, which is warm, unlike a pool thread; vLLM hot-loads the step's adapter from disk."""
        from art_local.training import merged_state_dict

        service = self._service
        assert service is not None
        adapter_dir = directory if components.is_lora else None
        if service.engine_kind == "vllm":
            if adapter_dir is None and components.is_lora:
                # save_checkpoint=False: vLLM still needs the step's adapter on disk to hot-load it
                adapter_dir = await run_on(
                    slot.trainer, write_serving_adapter, components.model, slot.model.output_dir(), step
                )
            await service.publish(slot.model.name, step, {}, adapter_dir=adapter_dir)  # reads no weights
            return
        publisher = self._publisher_on_trainer(slot, components)
        if publisher is not None:
            await run_on(slot.trainer, publisher, step)
        else:
            weights = await run_on(slot.trainer, merged_state_dict, components, copy=False)
            await service.publish(slot.model.name, step, weights, adapter_dir=adapter_dir)
        if directory is not None:  # a checkpoint: still served (loaded on demand) after its module is evicted
            self._note_kept(slot.model, [step])

    def _note_kept(self, model: TrainableModel, steps: list[int]) -> None:
        from art_local.inference.hf import HFEngine

        engine = self._service.engine if self._service is not None else None
        if isinstance(engine, HFEngine):
            engine.note_kept_steps(model.name, steps)

    async def _train_with_workers(
        self,
        slot: _Slot,
        workers: WorkerGroup,
        groups: list[TrajectoryGroup],
        step: StepConfig,
    ) -> LocalTrainResult:
        from art_local.distributed.remote import train_remote

        model = slot.model
        started = time.perf_counter()
        directory = _checkpoints_dir(model) / f"{slot.state.step + 1:04d}" if step.save_checkpoint else None
        publish = slot.served and self._service is not None
        if publish and directory is None and slot.is_lora and self._service is not None:
            if self._service.engine_kind == "vllm":
                raise ValueError(
                    "with train_devices and the vLLM engine, each step's adapter reaches vLLM through its "
                    "checkpoint; call train(..., save_checkpoint=True)"
                )
        async with self._inference_asleep():
            outcome = await run_on(
                slot.trainer,
                train_remote,
                workers,
                slot.tokenizer,
                slot.state,
                groups,
                self._config,
                step,
                model_dir=model.output_dir(),
                checkpoint_dir=directory,
                return_weights=publish,
                label=model.name,
            )
        slot.state = outcome.state
        metrics = {
            **outcome.metrics,
            "time/step_trainer_s": time.perf_counter() - started,
            "time/step_publish_s": 0.0,
        }
        if publish and self._service is not None and outcome.weights is not None:
            adapter_dir = directory if slot.is_lora else None
            started = time.perf_counter()
            await self._service.publish(
                model.name, outcome.state.step, outcome.weights, adapter_dir=adapter_dir
            )
            metrics["time/step_publish_s"] = time.perf_counter() - started
        return LocalTrainResult(
            step=outcome.state.step,
            metrics=metrics,
            checkpoint_path=None if directory is None else str(directory),
        )

    def _inference_asleep(self) -> contextlib.AbstractAsyncContextManager[None]:
        """vLLM sleeps around a train step when it shares the trainer's GPU (``VLLMEngineConfig``)."""
        service = self._service
        if service is None or service.engine_kind != "vllm":
            return contextlib.nullcontext()
        from art_local.inference.vllm import VLLMEngine

        engine = service.engine
        return engine.asleep() if isinstance(engine, VLLMEngine) else contextlib.nullcontext()

    def _slot(self, model: TrainableModel) -> _Slot:
        slot = self._slots.get(model.name)
        if slot is None:
            raise ValueError(
                f"model {model.name!r} is not registered; call `await model.register(backend)` first"
            )
        return slot

    def _check_inference(self) -> None:
        """Raise the inference engine's failure, if it has one: a dead sampler must not look like a slow one."""
        if self._service is not None:
            self._service.check_healthy()

    async def _started_service(self) -> InferenceService:
        if self._service is None:
            from art_local.inference.service import InferenceService

            self._service = InferenceService(device=self._device, **self._service_options)
        await self._service.start()
        return self._service

    def _step_weights(self, model: TrainableModel, step: int) -> Mapping[str, torch.Tensor] | None:
        from art_local.training import merged_state_dict_from_checkpoint

        directory = _checkpoints_dir(model) / f"{step:04d}"
        if not (directory / "metadata.json").is_file():
            if step == 0 and self._config.quantization != "none":
                from art_local.training.quantize import dequantized_base_weights

                return dequantized_base_weights(self._slot(model).base_model, self._config.quantization)
            return None
        return merged_state_dict_from_checkpoint(self._slot(model).base_model, directory)

    def _load_components(
        self, base_model: str, checkpoints: Path
    ) -> tuple[TrainingComponents, TrainingState]:
        """This process's model and optimizer, resumed from the last complete checkpoint (memory checked first)."""
        from art_local.training import TrainingState, build_components, checkpoint_steps, load_checkpoint
        from art_local.training.checkpoint import remove_stale_temporaries

        if self._config.memory_check:
            from art_local.training.memory import check_memory_fits

            check_memory_fits(base_model, self._config, device=self._device)  # refuses before loading
        components = build_components(base_model, self._config, device=self._device)
        remove_stale_temporaries(checkpoints)
        steps = checkpoint_steps(checkpoints)
        if not steps:
            return components, TrainingState()
        last = checkpoints / f"{steps[-1]:04d}"
        state = load_checkpoint(components, last, allow_config_mismatch=self._allow_config_mismatch)
        return components, state

    def _load(self, model: TrainableModel, trainer: ThreadPoolExecutor) -> _Slot:
        from transformers import AutoTokenizer

        from art_local.training.state import check_base_model

        base_model = check_base_model(model.base_model)
        directory = model.output_dir()
        directory.mkdir(parents=True, exist_ok=True)
        lock_file = _lock_model_dir(directory)
        try:
            tokenizer = AutoTokenizer.from_pretrained(base_model)
            if self._distributed is not None:
                from art_local.distributed.remote import start_workers

                if self._config.memory_check:  # one rank's share, before any worker starts
                    from art_local.training.memory import check_memory_fits

                    check_memory_fits(base_model, self._config, distributed=self._distributed)
                workers, state, is_lora = start_workers(
                    base_model,
                    self._config,
                    self._distributed,
                    _checkpoints_dir(model),
                    allow_config_mismatch=self._allow_config_mismatch,
                    log_path=directory / "trainer-workers.log",
                )
                return _Slot(
                    model=model,
                    trainer=trainer,
                    components=None,
                    tokenizer=tokenizer,
                    state=state,
                    lock_file=lock_file,
                    base_model=base_model,
                    is_lora=is_lora,
                    workers=workers,
                )
            components, state = self._load_components(base_model, _checkpoints_dir(model))
        except BaseException:
            lock_file.close()
            raise
        return _Slot(
            model=model,
            trainer=trainer,
            components=components,
            tokenizer=tokenizer,
            state=state,
            lock_file=lock_file,
            base_model=components.base_model,
            is_lora=components.is_lora,
        )


def _lock_model_dir(directory: Path) -> TextIO:
    """An exclusive flock on the model directory: two trainers never write the same checkpoints."""
    handle = open(directory / ".trainer.lock", "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(
            f"{directory} is already being trained by another LocalBackend (this or another process); "
            "close that backend first, or use another model name or path"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
