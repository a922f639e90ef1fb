# mypy: enable-error-code="deprecated"
# pyright: reportDeprecated=true
"""Calls that must not type-check (tests/test_static_typing.py runs mypy and pyright on this file).

The line after each ``# expect-error: <mypy code>/<pyright rule> "<text>"`` comment gives exactly that one error,
whose message contains ``<text>``, in each checker; no other line gives any.
"""

from __future__ import annotations

import art_core as art
from art_local import LocalBackend
from art_serverless import ServerlessBackend
from art_tinker import TinkerBackend

Groups = list[art.TrajectoryGroup]


async def options_a_backend_does_not_have(
    model: art.TrainableModel, groups: Groups, backend: art.TrainableBackend
) -> None:
    serverless = ServerlessBackend(api_key="key")
    # expect-error: call-arg/reportCallIssue "plot_tensors"
    await serverless.train(model, groups, plot_tensors=True)
    tinker = TinkerBackend()
    # expect-error: call-arg/reportCallIssue "logprob_calculation_chunk_size"
    await tinker.train(model, groups, logprob_calculation_chunk_size=512)
    local = LocalBackend()
    # expect-error: call-arg/reportCallIssue "deploy_checkpoint"
    await local.train(model, groups, deploy_checkpoint=True)
    # expect-error: call-arg/reportCallIssue "plot_tensors"
    await backend.train(model, groups, plot_tensors=True)
    # expect-error: call-arg/reportCallIssue "max_grad_norm"
    await backend.train(model, groups, max_grad_norm=1.0)


async def wrong_values_and_the_old_api(model: art.TrainableModel, groups: Groups) -> None:
    local = LocalBackend()
    # expect-error: arg-type/reportArgumentType "tokens"
    await local.train(model, groups, importance_sampling_level="tokens")
    # expect-error: arg-type/reportArgumentType "TrainableModel"
    await local.train(model, model)
    # expect-error: deprecated/reportDeprecated "deprecated"
    await model.train(groups, config=art.TrainConfig(learning_rate=1e-5))
    # expect-error: typeddict-unknown-key/reportAssignmentType "scale_reward"
    dev_config: art.dev.TrainConfig = {"scale_reward": False}
    # expect-error: deprecated/reportDeprecated "deprecated"
    await model.train(groups, _config=dev_config)


async def sft_options_a_backend_does_not_have(
    model: art.TrainableModel, data: list[art.Trajectory], backend: art.SFTBackend
) -> None:
    serverless = ServerlessBackend(api_key="key")
    # expect-error: call-arg/reportCallIssue "save_checkpoint"
    await serverless.train_sft(model, data, save_checkpoint=False)
    local = LocalBackend()
    # expect-error: call-arg/reportCallIssue "train_unembed"
    await local.train_sft(model, data, train_unembed=True)
    # expect-error: arg-type/reportArgumentType "first"
    await local.train_sft(model, data, assistant_turns="first")
    # expect-error: call-arg/reportCallIssue "verbose"
    await backend.train_sft(model, data, verbose=True)
    # expect-error: list-item/reportArgumentType "TrajectoryGroup"
    await backend.train_sft(model, [art.TrajectoryGroup([])])
