"""The server's pieces without HTTP: Tinker's built-in losses, seq_id ordering, futures, the checkpoint store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from art_tinker.server import losses
from art_tinker.server.errors import NotFound, UserError
from art_tinker.server.futures import Failure, FutureTable, JsonResult, Outcome, SeqGate
from art_tinker.server.store import CheckpointRef, CheckpointStore, LoraSpec, RunInfo, parse_tinker_path

NEW = [-1.0, -0.5, -2.0]
OLD = [-1.2, -0.5, -1.0]
ADV = [1.0, -2.0, 0.5]


def _inputs(**extra: list[float]) -> dict[str, torch.Tensor]:
    values = {"logprobs": OLD, "advantages": ADV, **extra}
    return {name: torch.tensor(v) for name, v in values.items()}


def _loss_and_grad(
    name: str, config: dict[str, float | str], **extra: list[float]
) -> tuple[float, list[float]]:
    new = torch.tensor(NEW, requires_grad=True)
    loss = losses.LOSSES[name](new, _inputs(**extra), config)
    loss.backward()
    assert new.grad is not None
    return float(loss.detach()), new.grad.tolist()


def test_ppo_and_cispo_match_hand_computation_including_gradients() -> None:
    ratio = [torch.exp(torch.tensor(n - o)).item() for n, o in zip(NEW, OLD, strict=False)]
    clipped = [min(max(r, 0.8), 1.2) for r in ratio]
    ppo_terms = [min(r * a, c * a) for r, c, a in zip(ratio, clipped, ADV, strict=False)]
    loss, grad = _loss_and_grad("ppo", {})
    assert loss == pytest.approx(-sum(ppo_terms), rel=1e-6)
    # d/dnew of -min(r·A, clip(r)·A): -r·A where the unclipped term is the min, 0 where the clipped one is
    expected = [-r * a if r * a <= c * a else 0.0 for r, c, a in zip(ratio, clipped, ADV, strict=False)]
    assert grad == pytest.approx(expected, rel=1e-6)
    loss, grad = _loss_and_grad("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1})
    clip_tight = [min(max(r, 0.9), 1.1) for r in ratio]
    assert loss == pytest.approx(
        -sum(c * n * a for c, n, a in zip(clip_tight, NEW, ADV, strict=False)), rel=1e-6
    )
    assert grad == pytest.approx(
        [-c * a for c, a in zip(clip_tight, ADV, strict=False)], rel=1e-6
    )  # the ratio is detached


def test_per_token_thresholds_win_over_the_config() -> None:
    loss_config, _ = _loss_and_grad("cispo", {"clip_high_threshold": 1.0})
    loss_tokens, _ = _loss_and_grad(
        "cispo", {"clip_high_threshold": 5.0}, clip_high_threshold=[1.0, 1.0, 1.0]
    )
    assert loss_tokens == pytest.approx(loss_config)


def test_cross_entropy_importance_sampling_and_dro() -> None:
    loss, grad = _loss_and_grad("cross_entropy", {}, weights=[1.0, 0.0, 2.0])
    assert (loss, grad) == (pytest.approx(-(NEW[0] + 2 * NEW[2])), pytest.approx([-1.0, 0.0, -2.0]))
    ratio = [torch.exp(torch.tensor(n - o)).item() for n, o in zip(NEW, OLD, strict=False)]
    loss, _ = _loss_and_grad("importance_sampling", {})
    assert loss == pytest.approx(-sum(r * a for r, a in zip(ratio, ADV, strict=False)), rel=1e-6)
    loss, _ = _loss_and_grad("dro", {"beta": 0.5})
    assert loss == pytest.approx(
        -sum(n * a - 0.25 * (n - o) ** 2 for n, o, a in zip(NEW, OLD, ADV, strict=False)), rel=1e-6
    )


def test_unknown_losses_and_stray_config_keys_are_refused() -> None:
    with pytest.raises(UserError, match="'gspo' is not supported"):
        losses.check_loss("gspo", {})
    with pytest.raises(UserError, match=r"\['beta'\] do not apply to 'ppo'"):
        losses.check_loss("ppo", {"beta": 0.1})
    with pytest.raises(UserError, match=r"needs loss_fn_inputs \['advantages'\]"):
        losses.check_inputs("cispo", 3, {"target_tokens", "logprobs"})


async def test_seq_gate_runs_requests_in_seq_order_whatever_the_arrival_order() -> None:
    gate = SeqGate(next_seq=1, gap_wait_s=5.0)
    ran: list[int] = []

    async def work(seq: int) -> Outcome:
        ran.append(seq)
        await asyncio.sleep(0)
        return JsonResult({"seq": seq})

    tasks = [asyncio.create_task(gate.run(seq, work(seq))) for seq in (3, 1, 2)]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert ran == [1, 2, 3]


async def test_seq_gate_runs_past_a_seq_id_that_never_arrives() -> None:
    gate = SeqGate(next_seq=1, gap_wait_s=0.05)
    outcome = await asyncio.wait_for(gate.run(2, _done()), 10)  # seq 1 was refused at submission
    assert outcome == JsonResult({})


async def _done() -> Outcome:
    return JsonResult({})


async def test_futures_report_user_and_server_failures_and_unknown_ids() -> None:
    table = FutureTable()

    async def bad_input() -> Outcome:
        raise UserError("checkpoint name 'a/b' is not allowed")

    async def crash() -> Outcome:
        raise RuntimeError("engine exploded")

    user, server = table.submit("x", bad_input()), table.submit("y", crash())
    assert await table.wait(user, 10) == Failure("checkpoint name 'a/b' is not allowed", "user")
    assert await table.wait(server, 10) == Failure("RuntimeError: engine exploded", "server")
    with pytest.raises(NotFound, match="request_id 'nope' is unknown"):
        await table.wait("nope", 1)


async def test_a_running_future_long_polls_then_reports_pending() -> None:
    table = FutureTable()
    release = asyncio.Event()

    async def slow() -> Outcome:
        await release.wait()
        return JsonResult({"ok": True})

    request_id = table.submit("slow", slow())
    assert await table.wait(request_id, 0.05) is None
    release.set()
    assert await table.wait(request_id, 10) == JsonResult({"ok": True})


@pytest.mark.parametrize(
    "path",
    [
        "tinker://a:train:0/weights/../x",
        "tinker://../../etc:train:0/weights/x",
        "tinker://a:train:0/optimizer/x",
        "s3://a:train:0/weights/x",
        "tinker://a:train:0/weights/x/y",
    ],
)
def test_path_like_checkpoint_references_are_refused(path: str) -> None:
    with pytest.raises(UserError):
        parse_tinker_path(path)


def test_store_writes_atomically_lists_and_deletes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    run = RunInfo("abc:train:0", "/models/tiny", LoraSpec(rank=4), "2025-01-01T00:00:00+00:00")
    store.write_run(run)
    ref = CheckpointRef(run.model_id, "weights", "step-000001")
    with pytest.raises(RuntimeError), store.writing(ref, run, overwrite=False, user_metadata=None) as tmp:
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("crash while writing")
    assert store.list(run.model_id) == []  # nothing half-written is listed
    with store.writing(ref, run, overwrite=False, user_metadata={"k": "v"}) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"weights")
    (listed,) = store.list(run.model_id)
    assert (listed["checkpoint_id"], listed["checkpoint_type"]) == ("weights/step-000001", "training")
    assert listed["tinker_path"] == "tinker://abc:train:0/weights/step-000001" and listed[
        "user_metadata"
    ] == {"k": "v"}
    with (
        pytest.raises(UserError, match="already exists"),
        store.writing(ref, run, overwrite=False, user_metadata=None),
    ):
        pass
    store.delete(ref)
    assert store.list(run.model_id) == []
    with pytest.raises(NotFound, match="does not exist"):
        store.delete(ref)


def test_stop_semantics_follow_the_sdk() -> None:
    from tinker import types

    from art_tinker.server.checks import sample_spec

    eos = (2,)
    assert sample_spec(types.SamplingParams(max_tokens=3), eos).stop_tokens == (2,)
    assert sample_spec(types.SamplingParams(max_tokens=3, stop=[]), eos).stop_tokens == ()
    strings = sample_spec(types.SamplingParams(max_tokens=3, stop=["\n\n"]), eos)
    assert (strings.stop_tokens, strings.stop_strings) == ((2,), ("\n\n",))
    assert sample_spec(types.SamplingParams(max_tokens=3, stop=[7, 9]), eos).stop_tokens == (2, 7, 9)
    with pytest.raises(UserError, match="mixes strings and token ids"):
        sample_spec(types.SamplingParams.model_construct(max_tokens=3, stop=["a", 5]), eos)


def test_sampler_seeds_stops_and_reports_untempered_logprobs(tiny_model: str) -> None:
    from art_tinker.server.engine import SampleSpec
    from art_tinker.server.local_engine import LocalEngine

    engine = LocalEngine(device="cpu")
    prompt = [1, 40, 41, 42]

    def run(**spec: Any) -> list[Any]:
        sequences, _ = engine.sample(tiny_model, None, prompt, 3, SampleSpec(**spec), prompt_logprobs=False)
        return sequences

    seeded = run(max_tokens=5, seed=4)
    assert [s.tokens for s in seeded] == [s.tokens for s in run(max_tokens=5, seed=4)]
    assert all(len(s.tokens) == 5 and s.stop_reason == "length" for s in seeded)
    everything_stops = run(max_tokens=5, seed=4, stop_tokens=tuple(range(1024)))
    assert all(len(s.tokens) == 1 and s.stop_reason == "stop" for s in everything_stops)
    greedy = run(max_tokens=4, temperature=0.0)
    hot, cold = run(max_tokens=4, top_k=1, temperature=1.5), run(max_tokens=4, top_k=1, temperature=0.3)
    assert [s.tokens for s in hot] == [s.tokens for s in cold] == [s.tokens for s in greedy]
    flat = [[lp for s in sequences for lp in s.logprobs] for sequences in (hot, cold)]
    assert flat[0] == pytest.approx(flat[1])  # the logprobs are the untempered distribution's
