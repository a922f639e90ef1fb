"""Static checks of a backend class (no instance, no training): what ``art backends --check`` runs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from art_core.backend import COMMON_TRAIN_DEFAULTS, Backend
from art_core.results import TrainResult

# Every train() option of the shipped backends (docs/architecture.md §5): an option a backend lacks must be refused.
ALL_TRAIN_OPTIONS = (
    *COMMON_TRAIN_DEFAULTS,
    "max_negative_advantage_importance_sampling_weight",
    "mask_prob_ratio",
    "kimi_k2_tau",
    "precalculate_logprobs",
    "allow_training_without_logprobs",
    "plot_tensors",
    "truncated_importance_sampling",
    "scale_learning_rate_by_reward_std_dev",
    "logprob_calculation_chunk_size",
    "kl_penalty_coef",
    "save_checkpoint",
    "deploy_checkpoint",
    "train_mlp",
    "train_attn",
    "train_unembed",
    "verbose",
)
BACKEND_METHODS = [
    name for name in dir(Backend) if not name.startswith("__") and callable(getattr(Backend, name))
]


def protocol_problems(cls: type[Any]) -> list[str]:
    """Members of the ``TrainableBackend`` Protocol the class lacks or does not define as coroutines."""
    problems = []
    for name in [*BACKEND_METHODS, "train"]:
        member = getattr(cls, name, None)
        if member is None:
            problems.append(f"missing {name}()")
        elif name != "_model_inference_name" and not inspect.iscoroutinefunction(member):
            problems.append(f"{name}() is not async")
    return problems


def train_signature_problems(train: Callable[..., Any]) -> list[str]:
    """How a ``train`` signature departs from the common subset (§4.3): names, kinds, defaults, no **kwargs."""
    problems = []
    parameters = list(inspect.signature(train).parameters.values())
    if parameters and parameters[0].name == "self":
        parameters = parameters[1:]
    positional = [p for p in parameters if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    if [p.name for p in positional] != ["model", "trajectory_groups"]:
        problems.append(
            f"positional-only parameters are {[p.name for p in positional]}, not model, trajectory_groups /"
        )
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            problems.append(f"takes **{parameter.name}; every option must be an explicit keyword")
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            problems.append(f"takes *{parameter.name}")
    by_name = {p.name: p for p in parameters}
    for name, default in COMMON_TRAIN_DEFAULTS.items():
        option = by_name.get(name)
        if option is None:
            problems.append(f"lacks the common option {name}")
        elif option.kind is not inspect.Parameter.KEYWORD_ONLY:
            problems.append(f"{name} is not keyword-only")
        elif option.default != default:
            problems.append(f"{name} defaults to {option.default!r}, not {default!r}")
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty:
            problems.append(f"option {parameter.name} has no default")
    return problems


def result_type(train: Callable[..., Any]) -> type[Any] | None:
    """The class ``train`` declares it returns (None when it cannot be resolved)."""
    returned = getattr(train, "__annotations__", {}).get("return")
    if isinstance(returned, str):  # postponed annotations: resolve only the return type
        try:
            returned = eval(returned, getattr(train, "__globals__", {}))
        except Exception:
            return None
    return returned if isinstance(returned, type) else None


def unsupported_options(train: Callable[..., Any]) -> list[str]:
    """Known options (of any shipped backend) this ``train`` does not accept."""
    accepted = set(inspect.signature(train).parameters)
    return [name for name in ALL_TRAIN_OPTIONS if name not in accepted]


def refuses_unknown_options(train: Callable[..., Any]) -> list[str]:
    """Options that binding would accept although the backend does not declare them (must be empty)."""
    signature = inspect.signature(train)
    leaked = []
    for name in [*unsupported_options(train), "definitely_not_an_option"]:
        try:
            signature.bind(object(), object(), object(), **{name: None})
        except TypeError:
            continue
        leaked.append(name)
    return leaked


def check_backend_class(cls: type[Any]) -> list[tuple[str, str, str]]:
    """(check, result, detail) rows for one backend class."""
    rows: list[tuple[str, str, str]] = []

    def add(check: str, problems: list[str]) -> None:
        rows.append((check, "fail" if problems else "pass", "; ".join(problems)))

    add("protocol members", protocol_problems(cls))
    train = getattr(cls, "train", None)
    if train is None:
        return rows
    add("train() common subset", train_signature_problems(train))
    add("unknown option → TypeError", [f"{name} is accepted" for name in refuses_unknown_options(train)])
    returned = result_type(train)
    add(
        "result type",
        []
        if returned is not None and issubclass(returned, TrainResult)
        else [f"returns {returned!r}, not a TrainResult"],
    )
    return rows


def run_quick_checks() -> list[tuple[str, str, str, str]]:
    """Check every installed backend class; rows are (backend, check, result, detail)."""
    from art_core.plugins import list_backends

    rows: list[tuple[str, str, str, str]] = []
    for entry in list_backends():
        rows += [(entry.name, *row) for row in check_backend_class(entry.obj)]
    return rows
