"""The way over from OpenPipe ART's ``model.train(groups, config=..., _config=...)`` to ``backend.train``.

``TrainConfig`` is ART's public training config. ``TrainableModel.train`` (deprecated) maps it and
``art.dev.TrainConfig`` onto the registered backend's ``train()`` keyword options by reading its signature: a key
the backend has no option for is a ``TypeError`` that lists the options it does have, never silently dropped.
Then it logs the way ART 0.5 did: one ``model.log(groups, split="train", metrics=..., step=new_step)``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pydantic

from art_core.results import TrainResult

if TYPE_CHECKING:
    from art_core.dev import TrainConfig as DevTrainConfig
    from art_core.model import TrainableModel
    from art_core.trajectories import TrajectoryGroup

# Parameters of train() that are not options.
_POSITIONAL = ("self", "model", "trajectory_groups")


class TrainConfig(pydantic.BaseModel):
    """ART's ``TrainConfig``: only the fields you set are passed on, as the backend options of the same name."""

    model_config = pydantic.ConfigDict(extra="forbid")

    learning_rate: float = 5e-6
    kl_penalty_coef: float = 0.0
    grad_accumulation_sequences: int | None = pydantic.Field(default=None, ge=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _no_beta(cls, data: Any) -> Any:
        # ART up to 0.5.11 had `beta`, a KL *loss* term; kl_penalty_coef shapes advantages instead (docs/rl-math.md).
        if isinstance(data, dict) and "beta" in data:
            if data["beta"] not in (0, 0.0):
                raise ValueError(
                    f"beta={data['beta']!r} was ART's KL loss coefficient and has no exact equivalent here; "
                    "use kl_penalty_coef (KL advantage shaping against the base model, LocalBackend) or drop it"
                )
            data = {key: value for key, value in data.items() if key != "beta"}  # beta=0 is no KL either way
        return data


def train_options(train: Callable[..., Any]) -> tuple[list[str], bool]:
    """The keyword options a ``train`` accepts, and whether it also takes ``**kwargs`` (against the contract)."""
    options: list[str] = []
    takes_kwargs = False
    for parameter in inspect.signature(train).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            takes_kwargs = True
        elif parameter.name in _POSITIONAL or parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            continue
        else:
            options.append(parameter.name)
    return options, takes_kwargs


def requested_options(
    config: TrainConfig | None, dev_config: Mapping[str, object] | None
) -> dict[str, tuple[object, str]]:
    """Option name → (value, where it came from): the fields set on ``config`` and every ``_config`` key."""
    requested: dict[str, tuple[object, str]] = {}
    sources: list[tuple[str, Mapping[str, object]]] = []
    if config is not None:
        if not isinstance(config, TrainConfig):
            raise TypeError(
                f"config must be an art.TrainConfig, not {type(config).__name__}; "
                "experimental keys go in _config=art.dev.TrainConfig(...)"
            )
        fields = [name for name in TrainConfig.model_fields if name in config.model_fields_set]
        sources.append(("config", {name: getattr(config, name) for name in fields}))
    if dev_config is not None:
        if not isinstance(dev_config, Mapping):
            raise TypeError(f"_config must be a dict (art.dev.TrainConfig), not {type(dev_config).__name__}")
        sources.append(("_config", dev_config))
    for source, values in sources:
        for name, value in values.items():
            if name in requested and requested[name][0] != value:
                raise ValueError(
                    f"{name} is {requested[name][0]!r} in {requested[name][1]} but {value!r} in {source}; "
                    "set it in one place"
                )
            requested[name] = (value, source)
    return requested


def backend_train_kwargs(
    train: Callable[..., Any],
    backend_name: str,
    config: TrainConfig | None,
    dev_config: Mapping[str, object] | None,
    verbose: bool,
) -> dict[str, object]:
    """The keyword options for ``train``; a ``TypeError`` listing its options when a key has no counterpart."""
    options, takes_kwargs = train_options(train)
    requested = requested_options(config, dev_config)
    if "verbose" in options:
        requested.setdefault("verbose", (verbose, "verbose"))
    elif verbose:
        requested["verbose"] = (True, "verbose=True")
    unsupported = [
        f"{name} (from {source})"
        for name, (_, source) in requested.items()
        if name not in options and not takes_kwargs
    ]
    if unsupported:
        raise TypeError(
            f"{backend_name}.train() has no option {', '.join(unsupported)}; its options are: "
            f"{', '.join(options)}. Remove the key, or call `await backend.train(model, groups, ...)` "
            "with the options this backend has"
        )
    return {name: value for name, (value, _) in requested.items()}


def deprecation_message(backend_name: str, kwargs: Mapping[str, object]) -> str:
    """The DeprecationWarning text: the same call written as ``backend.train(model, ...)`` plus ``model.log``."""
    options = "".join(f", {name}={value!r}" for name, value in kwargs.items())
    return (
        "model.train() is deprecated; use backend.train(model, ...) and log yourself:\n"
        f"    result = await backend.train(model, groups{options})  # {backend_name}: options typed per backend\n"
        "    await model.log(groups, split='train', metrics=result.metrics, step=result.step)"
    )


def prepare_call(
    backend: object, config: TrainConfig | None, dev_config: DevTrainConfig | None, verbose: bool
) -> dict[str, object]:
    """Warn that ``model.train`` is deprecated and return the backend options it maps to (or raise)."""
    name = type(backend).__name__
    train = getattr(backend, "train", None)
    try:
        if not callable(train):
            raise TypeError(f"{name} has no train(); register the model with a backend that trains")
        kwargs = backend_train_kwargs(train, name, config, dev_config, verbose)
    except (TypeError, ValueError):
        warnings.warn(deprecation_message(name, {}), DeprecationWarning, stacklevel=3)
        raise
    warnings.warn(deprecation_message(name, kwargs), DeprecationWarning, stacklevel=3)
    return kwargs


async def train_and_log(
    model: TrainableModel,
    trajectory_groups: Iterable[TrajectoryGroup],
    kwargs: Mapping[str, object],
) -> TrainResult:
    """Train one step on the model's backend, then log the groups and the step's metrics as ART 0.5 did."""
    groups = list(trajectory_groups)
    backend: Any = model.backend()
    result = await backend.train(model, groups, **kwargs)
    if not isinstance(result, TrainResult):
        raise TypeError(
            f"{type(backend).__name__}.train() returned {type(result).__name__}, not an art.TrainResult"
        )
    await model.log(groups, split="train", metrics=result.metrics, step=result.step)
    return result


# OpenPipe ART's ``TrainableModel(_internal_config=...)`` keys, and what replaces each here. None of them is a
# field of the model: they configured ART's Unsloth/vLLM stack, whose counterparts here are backend settings.
_LORA = "the LoRA shape: LocalBackend(trainer_config=TrainerConfig(lora_rank=..., lora_alpha=..., lora_targets=...))"
_INTERNAL_CONFIG_REPLACEMENTS: dict[str, str] = {
    "init_args": (
        "init_args.max_seq_length is LocalBackend(trainer_config=TrainerConfig(max_sequence_length=...)); "
        "its other keys (4/8-bit loading, gpu_memory_utilization, fast_inference) have no equivalent: drop them"
    ),
    "engine_args": "the inference engine is LocalBackend(engine='hf' | 'vllm'); vLLM engine arguments are not "
    "configurable per model: drop them",
    "peft_args": f"{_LORA} (r -> lora_rank, lora_alpha -> lora_alpha, target_modules -> lora_targets, "
    "random_state -> seed), or TinkerBackend(lora_rank=...)",
    "lora_config": f"{_LORA}, or TinkerBackend(lora_rank=...)",
    "trainer_args": (
        "learning_rate is backend.train(model, groups, learning_rate=...); adam_beta1/adam_beta2, adam_epsilon, "
        "weight_decay and max_grad_norm are TrainerConfig(betas=(b1, b2), eps=..., weight_decay=..., "
        "max_grad_norm=...) passed as LocalBackend(trainer_config=...); the rest have no equivalent"
    ),
    "tinker_args": "TinkerBackend(lora_rank=...) (the renderer is the base model's chat template)",
    "tinker_native_args": "TinkerBackend(lora_rank=...) (the renderer is the base model's chat template)",
    "trainer_gpu_ids": "LocalBackend(train_devices=N) trains on N devices; LocalBackend(device=...) picks one",
    "inference_gpu_ids": "LocalBackend(device=...); inference shares the training device",
    "_decouple_vllm_and_unsloth": "no equivalent (training and inference are separate here already): drop it",
}
_NO_EQUIVALENT = (
    "no equivalent: prompts are rendered with the base model's own chat template (edit tokenizer_config.json "
    "in a local copy of the model to change it); drop the key"
)
for _key in (
    "chat_template",
    "chat_template_kwargs",
    "chat_template_path",
    "chat_template_content_format",
    "chat_template_tool_schema_format",
):
    _INTERNAL_CONFIG_REPLACEMENTS[_key] = _NO_EQUIVALENT
for _key in (
    "rollout_weights_mode",
    "rollout_weight_update_mode",
    "vllm_runtime",
    "allow_unvalidated_arch",
    "megatron_model_initialization",
):
    _INTERNAL_CONFIG_REPLACEMENTS[_key] = "no equivalent in this framework's backends: drop the key"


def internal_config_error(config: object) -> str | None:
    """Why ART's ``_internal_config`` cannot be taken as given, key by key with the replacement (None if empty).

    Each key configured ART's own trainer and engine; here those settings belong to the backend, so keeping the
    dict on the model would do nothing at all. An empty dict or None is accepted: nothing is lost.
    """
    if config is None:
        return None
    if not isinstance(config, Mapping):
        return f"_internal_config must be a dict (ART's dev.InternalModelConfig), not {type(config).__name__}"
    if not config:
        return None
    lines = []
    for key in config:
        replacement = _INTERNAL_CONFIG_REPLACEMENTS.get(str(key))
        if replacement is None:
            replacement = (
                f"not a key of ART's InternalModelConfig (known: {', '.join(_INTERNAL_CONFIG_REPLACEMENTS)})"
            )
        lines.append(f"  {key}: {replacement}")
    return (
        "_internal_config (OpenPipe ART) is not a model setting here; it would be silently ignored, so it is "
        "refused. Remove it and use instead:\n" + "\n".join(lines)
    )
