"""``art demo`` end to end, shortened: the CLI (added through the plugin hook) trains the tiny model with RL and
held-out accuracy rises above the format-only warm start."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from art_core.cli import build_cli
from art_local.demo import (
    WARM_START_LABEL,
    WarmStartConfig,
    all_triples,
    answer,
    format_warm_start,
    reward,
    split_triples,
)
from art_local.demo.warm_start import sort_format_example


def test_the_task_is_exact_match_sorting_with_a_fixed_held_out_split() -> None:
    train, val = split_triples()
    assert len(all_triples()) == 720 and len(val) == 100 and len(train) == 620
    assert not set(train) & set(val)
    assert split_triples() == (train, val)  # fixed, whatever the run's seed
    assert answer(("d", "a", "c")) == "acd"
    assert reward(("d", "a", "c"), " acd\n") == 1.0
    assert reward(("d", "a", "c"), "a c d") == 0.0 and reward(("d", "a", "c"), None) == 0.0


def test_warm_start_examples_teach_the_format_with_shuffled_letters_only(tiny_tokenizer: Any) -> None:
    train, val = split_triples()
    rng = random.Random(0)
    answers = set()
    for _ in range(200):
        tokens, trained = sort_format_example(train, rng, tiny_tokenizer)
        first = trained.index(True)
        assert all(trained[first:]) and not any(trained[:first])  # loss on the answer only
        prompt_text = tiny_tokenizer.decode(tokens[:first])
        letters = prompt_text.split("Sort these letters: ")[1].split("<|im_end|>")[0].split()
        assert tuple(letters) not in set(val)  # held-out prompts never reach the warm start
        assert tokens[-1] == tiny_tokenizer.eos_token_id
        text = tiny_tokenizer.decode(tokens[first:-1])
        assert sorted(text) == sorted(letters)
        answers.add(text == "".join(sorted(letters)))
    assert answers == {True, False}  # random permutations: sometimes sorted, mostly not


def test_warm_start_is_cached_beside_the_model_and_labelled(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from art_local.tiny import build_tiny_model

    base = build_tiny_model("tiny", directory=tmp_path / "tiny")
    config = WarmStartConfig(steps=3, batch_size=4)
    warm = format_warm_start(base, config, progress=False)
    assert warm.parent == base.parent and warm.name.startswith("tiny-sortformat-")
    record = json.loads((warm / "warm_start.json").read_text())
    assert record["what"] == WARM_START_LABEL and record["recipe"]["steps"] == 3
    weights = warm / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert format_warm_start(base, config, progress=False) == warm  # second run: from the cache
    assert weights.stat().st_mtime_ns == stamp
    before, after = load_file(base / "model.safetensors"), load_file(weights)
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)
    assert (warm / "tokenizer.json").is_file() and (warm / "config.json").is_file()


def test_the_demo_command_is_contributed_by_art_local() -> None:
    demo = build_cli().commands["demo"]
    options = {name for param in demo.params for name in param.opts}
    assert {"--steps", "--model-size", "--seed", "--output"} <= options


@pytest.mark.timeout(420)
def test_a_short_demo_run_learns_to_sort(tmp_path: Path) -> None:
    """SFT warm start (step 1) then 20 RL steps on seed 0; val/reward must rise by 0.2 over those RL steps."""
    result = CliRunner().invoke(
        build_cli(), ["demo", "--steps", "20", "--seed", "0", "--output", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    output = result.output
    assert WARM_START_LABEL in output and "backend.train_sft" in output and "learning_rate=0.001" in output
    assert "step  train/reward  val/reward" in output
    model_dir = tmp_path / "demo" / "models" / "sort-tiny-seed0"
    records = [json.loads(line) for line in (model_dir / "history.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/reward"] for r in records if "val/reward" in r}
    train_steps = [r["step"] for r in records if "train/reward" in r]
    assert sorted(val) == [1, 11, 21] and train_steps == list(range(2, 22))  # step 1 is the SFT warm start
    sft = next(r for r in records if r["step"] == 1 and "loss/sft" in r)
    assert sft["data/sft_examples"] == 500 * 32 and sft["loss/sft"] < 2.0
    assert val[21] >= val[1] + 0.2, val  # the improvement the README states, with room for sampling noise
    assert (model_dir / "reward.png").stat().st_size > 1000
    assert (model_dir / "trajectories" / "val" / "0021.parquet").is_file()
    kept = sorted(p.name for p in (model_dir / "checkpoints").iterdir())
    assert "0021" in kept and len(kept) <= 2  # latest and best val/reward only
    assert f"written under {model_dir}" in output and "reward.png" in output
    assert all(f"{step:>5}" in output for step in (1, 11, 21))


def _threads_of_a_new_thread() -> int:
    import threading

    import torch

    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


async def test_serving_keeps_the_trainers_torch_threads(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The sampler runs on fewer threads; the trainer's to_thread workers (started later) must not inherit that."""
    import torch

    import art_core as art
    from art_local import LocalBackend

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    backend = LocalBackend(str(tmp_path), device="cpu")
    try:
        model = art.TrainableModel(name="threads", project="p", base_model=str(tiny_model_dir))
        await model.register(backend)
        await model.openai_client().chat.completions.create(
            model=model.get_inference_name(), messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert _threads_of_a_new_thread() == 2  # was 1: the sampler's count leaked to every later thread
    finally:
        await backend.close()
        torch.set_num_threads(before)
