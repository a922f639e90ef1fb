"""``TinkerBackend``: train through the real ``tinker`` SDK (Thinking Machines' Tinker, or ``art tinker serve``).

Per model: one LoRA training client (created on the first ``train()``, or resumed from the last saved state),
one sampling client per step serving ``name@step`` through art-local's OpenAI-compatible server, and a
``tinker_run.json`` under ``model.output_dir()`` mapping the model to its Tinker runs and checkpoints.
"""

# size: the Backend protocol plus train(), train_sft() and fork_checkpoint() with their keyword options; the
# step logic itself lives in steps.py and sft.py.

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from art_core.model import Model, TrainableModel
from art_core.plugin_api import ImportanceSamplingLevel, TrainOptions, check_number
from art_core.results import TinkerTrainResult
from art_core.sft import AssistantTurns, LearningRateSchedule, SFTOptions
from art_core.trajectories import Trajectory, TrajectoryGroup
from art_tinker import steps
from art_tinker.inference import TinkerSamplingEngine
from art_tinker.runs import LoraChoice, RunRecord, StepCheckpoint, read_record, write_record

if TYPE_CHECKING:
    import tinker

    from art_local.inference.server import InferenceServer

DEFAULT_LORA_RANK = 32
REQUEST_TIMEOUT_S = 3600.0
_STEP_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class _ModelState:
    """The live handles of one registered model (the mutable part; the record is a frozen value)."""

    model: TrainableModel
    tokenizer: Any
    context_length: int
    record: RunRecord | None
    training_client: tinker.TrainingClient | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def step(self) -> int:
        return 0 if self.record is None else self.record.step

    def save_record(self, record: RunRecord) -> None:
        write_record(self.model.output_dir(), record)
        self.record = record


class TinkerBackend:
    """Trains LoRA adapters on Tinker with the real SDK; serves every step through an OpenAI-compatible endpoint.

    ``api_key``/``base_url`` default to ``TINKER_API_KEY``/``TINKER_BASE_URL`` (the SDK's own resolution), so the
    same code runs against Thinking Machines' service or a loopback ``art tinker serve``.
    """

    def __init__(
        self, api_key: str | None = None, base_url: str | None = None, *, lora_rank: int = DEFAULT_LORA_RANK
    ) -> None:
        if lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank} must be >= 1")
        self._api_key = api_key
        self._base_url = base_url
        self._lora_rank = lora_rank
        self._service: tinker.ServiceClient | None = None
        self._rest: tinker.RestClient | None = None
        self._models: dict[str, _ModelState] = {}
        self._engine = TinkerSamplingEngine()
        self._server: InferenceServer | None = None
        self._server_key = secrets.token_urlsafe(24)
        self._base_sampler: dict[str, tinker.SamplingClient] = {}

    # -- clients -----------------------------------------------------------------------------------------------

    async def _service_client(self) -> tinker.ServiceClient:
        """The session (created off the event loop: the SDK blocks while it contacts the server)."""
        if self._service is None:
            import tinker

            client = tinker.ServiceClient(api_key=self._api_key, base_url=self._base_url)
            await asyncio.to_thread(lambda: client.holder)
            self._service = client
        return self._service

    async def _rest_client(self) -> tinker.RestClient:
        if self._rest is None:
            import tinker

            self._rest = await asyncio.to_thread(
                tinker.RestClient, base_url=self._base_url, api_key=self._api_key
            )
        return self._rest

    def _state(self, model: TrainableModel) -> _ModelState:
        state = self._models.get(model.name)
        if state is None or state.model.output_dir() != model.output_dir():
            raise ValueError(
                f"model {model.name!r} is not registered with this TinkerBackend; await model.register(backend)"
            )
        return state

    # -- Backend protocol --------------------------------------------------------------------------------------

    async def register(self, model: Model) -> None:
        """Load the tokenizer and any saved run record (nothing is created on Tinker until ``train()``)."""
        if not isinstance(model, TrainableModel):
            raise TypeError(
                f"TinkerBackend trains models; {model.name!r} is a {type(model).__name__}, not TrainableModel"
            )
        if model.name in self._models:
            self._models[model.name].model = model
            return
        record = read_record(model.output_dir())
        if record is not None and record.base_model != model.base_model:
            raise ValueError(
                f"{model.output_dir()} was trained from {record.base_model!r}, not {model.base_model!r}; "
                "use another model name or the original base model"
            )
        tokenizer, context_length = await asyncio.to_thread(steps.load_tokenizer, model.base_model)
        self._models[model.name] = _ModelState(model, tokenizer, context_length, steps.resumable(record))

    async def _prepare_backend_for_training(self, model: TrainableModel) -> tuple[str, str]:
        """Serve ``name``/``name@step`` through art-local's OpenAI server; return its (base_url, api_key)."""
        state = self._state(model)
        if self._server is None:
            from art_local.inference.server import InferenceServer, create_app

            server = InferenceServer(create_app(self._engine, api_key=self._server_key))
            await server.start()
            self._server = server
        self._engine.add_model(model.name, state.tokenizer, state.context_length)
        service = await self._service_client()
        if model.base_model not in self._base_sampler:
            self._base_sampler[model.base_model] = await service.create_sampling_client(
                base_model=model.base_model
            ).result_async(REQUEST_TIMEOUT_S)
        self._engine.set_sampler(model.name, 0, self._base_sampler[model.base_model])
        if state.step > 0:
            self._engine.set_sampler(model.name, state.step, await self._resumed_sampler(state))
        return self._server.base_url, self._server_key

    async def _resumed_sampler(self, state: _ModelState) -> tinker.SamplingClient:
        assert state.record is not None
        saved = state.record.checkpoints.get(state.step, StepCheckpoint())
        service = await self._service_client()
        if saved.sampler_path:
            return await service.create_sampling_client(model_path=saved.sampler_path).result_async(
                REQUEST_TIMEOUT_S
            )
        client = await self._training_client(state, state.record.lora)
        return await client.save_weights_and_get_sampling_client().result_async(REQUEST_TIMEOUT_S)

    async def _training_client(self, state: _ModelState, lora: LoraChoice) -> tinker.TrainingClient:
        """The model's LoRA client: resumed from its last saved state, or created with ``lora`` on first use."""
        record = state.record
        if record is not None and record.lora != lora:
            raise ValueError(
                f"model {state.model.name!r} has a LoRA adapter with {steps.describe(record.lora)}; train_mlp/"
                f"train_attn/train_unembed are fixed on the first train() and cannot change to {steps.describe(lora)}"
            )
        if state.training_client is not None:
            return state.training_client
        service = await self._service_client()
        latest = record.latest_state() if record is not None else None
        if record is not None and latest is not None:
            client = await service.create_training_client_from_state_with_optimizer(latest[1]).result_async(
                REQUEST_TIMEOUT_S
            )
        else:
            client = await service.create_lora_training_client(
                state.model.base_model,
                rank=lora.rank,
                train_mlp=lora.train_mlp,
                train_attn=lora.train_attn,
                train_unembed=lora.train_unembed,
            ).result_async(REQUEST_TIMEOUT_S)
            record = RunRecord(base_model=state.model.base_model, lora=lora)
        state.save_record(record.with_model_id(client.model_id))
        state.training_client = client
        return client

    async def _get_step(self, model: TrainableModel) -> int:
        state = self._models.get(model.name)
        if state is not None:
            return state.step
        record = steps.resumable(read_record(model.output_dir()))
        return 0 if record is None else record.step

    def _model_inference_name(self, model: Model, step: int | None = None) -> str:
        return model.name if step is None else f"{model.name}@{step}"

    async def _delete_checkpoint_files(self, model: TrainableModel, steps_to_keep: list[int]) -> None:
        """Delete every Tinker checkpoint of the model's runs whose step is not kept; stop serving those steps."""
        import tinker

        state = self._state(model)
        keep = set(steps_to_keep)
        if state.record is not None:
            rest = await self._rest_client()
            for model_id in state.record.model_ids:
                try:
                    listing = await rest.list_checkpoints(model_id).result_async(REQUEST_TIMEOUT_S)
                except tinker.NotFoundError:
                    warnings.warn(
                        f"Tinker has no training run {model_id} any more; nothing to delete there",
                        stacklevel=2,
                    )
                    continue
                for checkpoint in listing.checkpoints:
                    found = _STEP_NAME.match(checkpoint.checkpoint_id.rsplit("/", 1)[-1])
                    if found and int(found.group(1)) not in keep:
                        await rest.delete_checkpoint(model_id, checkpoint.checkpoint_id).result_async(
                            REQUEST_TIMEOUT_S
                        )
            state.save_record(state.record.keeping(keep))
        self._engine.forget_steps(model.name, sorted(keep))

    async def fork_checkpoint(
        self,
        model: TrainableModel,
        from_model: str,
        from_project: str | None = None,
        **options: Any,
    ) -> int:
        """Not supported by TinkerBackend (its checkpoints live on the Tinker service, which has no call to copy one into another run); fork on LocalBackend instead."""
        raise NotImplementedError(
            f"TinkerBackend cannot fork {from_project or model.project}/{from_model} into {model.name!r}: "
            "its checkpoints live on the Tinker service, which has no call to copy one into another run. Fork with LocalBackend.fork_checkpoint, or start the new model from its base_model"
        )

    _experimental_fork_checkpoint = fork_checkpoint

    async def close(self) -> None:
        """Stop the inference server and finish the Tinker session."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop()
        service, self._service = self._service, None
        if service is not None:
            await service.close("success").result_async(60.0)
        self._models.clear()
        self._base_sampler.clear()

    # -- train -------------------------------------------------------------------------------------------------

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
        allow_training_without_logprobs: bool = False,
        plot_tensors: bool = False,
        truncated_importance_sampling: float | None = None,
        save_checkpoint: bool = True,
        deploy_checkpoint: bool = False,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        verbose: bool = False,
    ) -> TinkerTrainResult:
        """One RL step on Tinker: advantages (art_core) -> forward_backward -> optim_step -> save -> serve."""
        TrainOptions(
            learning_rate=learning_rate,
            ppo=ppo,
            epsilon=epsilon,
            epsilon_high=epsilon_high,
            advantage_balance=advantage_balance,
            scale_rewards=scale_rewards,
            importance_sampling_level=importance_sampling_level,
        )
        check_number(
            "truncated_importance_sampling", truncated_importance_sampling, above=0.0, allow_none=True
        )
        state = self._state(model)
        lora = LoraChoice(self._lora_rank, train_mlp, train_attn, train_unembed)
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("train_mlp, train_attn and train_unembed are all False; LoRA needs at least one")
        loss = steps.LossChoice(
            ppo, epsilon, epsilon_high, importance_sampling_level, truncated_importance_sampling
        )
        async with state.lock:
            started = time.monotonic()
            log = steps.Progress(verbose, model.name)
            prepared = await asyncio.to_thread(
                steps.prepare,
                trajectory_groups,
                state.tokenizer,
                scale_rewards=scale_rewards,
                advantage_balance=advantage_balance,
                allow_without_logprobs=allow_training_without_logprobs,
                max_sequence_length=state.context_length,
            )
            client = await self._training_client(state, lora)
            log(f"step {state.step + 1}: {steps.describe_batch(prepared)}")
            outcome = await steps.gradient_step(client, prepared, loss, learning_rate, log, REQUEST_TIMEOUT_S)
            step = state.step + 1
            saved = await self._save_step(
                state, client, step, save_checkpoint, deploy_checkpoint, outcome.changed, log
            )
            metrics = {
                **prepared.metrics(),
                **outcome.metrics,
                "loss/learning_rate": float(learning_rate),
                "time/step_trainer_s": time.monotonic() - started,
            }
            if plot_tensors:
                path = await asyncio.to_thread(steps.plot, model.output_dir(), step, prepared, outcome)
                log(f"tensors plotted to {path}")
        return TinkerTrainResult(
            step=step,
            metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
            state_path=saved.state_path,
            sampler_path=saved.sampler_path,
            deployed=deploy_checkpoint,
        )

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
        deploy_checkpoint: bool = False,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        verbose: bool = False,
    ) -> TinkerTrainResult:
        """Supervised fine-tuning with Tinker's cross-entropy (art_core.sft): one step, saved and served as
        ``name@step`` like a ``train()`` step; the LoRA choices are those of ``train()``."""
        from art_tinker.sft import train_sft

        options = SFTOptions(
            learning_rate=learning_rate,
            epochs=epochs,
            batch_size=batch_size,
            assistant_turns=assistant_turns,
            schedule=schedule,
            warmup_ratio=warmup_ratio,
            shuffle_seed=shuffle_seed,
        )
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("train_mlp, train_attn and train_unembed are all False; LoRA needs at least one")
        lora = LoraChoice(self._lora_rank, train_mlp, train_attn, train_unembed)
        return await train_sft(
            self,
            model,
            trajectories,
            options,
            lora,
            save_checkpoint=save_checkpoint,
            deploy_checkpoint=deploy_checkpoint,
            verbose=verbose,
            timeout_s=REQUEST_TIMEOUT_S,
        )

    async def _save_step(
        self,
        state: _ModelState,
        client: tinker.TrainingClient,
        step: int,
        save_checkpoint: bool,
        deploy_checkpoint: bool,
        changed: bool,
        log: steps.Progress,
    ) -> StepCheckpoint:
        """Save what was asked for, serve ``name@step``, and record the step."""
        name = f"step-{step:06d}"
        state_path = sampler_path = None
        if save_checkpoint:
            state_path = (await client.save_state(name).result_async(REQUEST_TIMEOUT_S)).path
            log(f"saved state {state_path}")
        if deploy_checkpoint:
            sampler_path = (await client.save_weights_for_sampler(name).result_async(REQUEST_TIMEOUT_S)).path
            service = await self._service_client()
            sampler = await service.create_sampling_client(model_path=sampler_path).result_async(
                REQUEST_TIMEOUT_S
            )
            log(f"deployed sampler weights {sampler_path}")
        elif changed or not self._engine.has_step(state.model.name, state.step):
            sampler = await client.save_weights_and_get_sampling_client().result_async(REQUEST_TIMEOUT_S)
        else:  # nothing trained: the previous step's sampler has exactly these weights
            sampler = self._engine.sampler(state.model.name, state.step)
        self._engine.set_sampler(state.model.name, step, sampler)
        saved = StepCheckpoint(state_path, sampler_path)
        assert state.record is not None
        state.save_record(state.record.with_step(step, saved))
        return saved


__all__ = ["TinkerBackend"]
