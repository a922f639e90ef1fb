"""Trajectory groups → one packed ``TrainBatch`` of token tensors (docs/rl-math.md §1–§2 via ``art_core.advantages``).

Several sequences share a row; attention stays inside each sequence. The sequences of a group that start with
the same prompt share one copy of it: the prompt (minus its last token) is a segment every branch may attend
to, and each branch restarts with the prompt's last token so that token t is still predicted from t − 1.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from art_core.plugin_api import check_groups, group_advantages, mean_reward_std_dev, normalize_batch
from art_core.trajectories import TrajectoryGroup
from art_local.training.tokenize import TokenizedHistory, tokenize_history


@dataclass(frozen=True)
class TrainBatch:
    """Packed token tensors, all [rows, T].

    ``segment_ids_BT``: which sequence piece a token belongs to (0 = padding); ``prefix_segment_ids_BT``: the
    shared-prompt segment a token may also attend to (0 = none); ``loss_mask_BT`` is True on trained tokens,
    each predicted from position t − 1 of the same segment; ``old_logprobs_BT`` are the sampler's (NaN =
    unknown); ``sequence_index_BT`` numbers the sequences (−1 = none) for sequence-level importance sampling;
    ``original_logprobs_BT`` holds the sampler's values once ``old`` was precalculated.
    """

    tokens_BT: torch.Tensor
    position_ids_BT: torch.Tensor
    segment_ids_BT: torch.Tensor
    prefix_segment_ids_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    old_logprobs_BT: torch.Tensor
    advantages_BT: torch.Tensor
    weights_BT: torch.Tensor
    sequence_index_BT: torch.Tensor
    original_logprobs_BT: torch.Tensor | None = None

    @property
    def num_trained_tokens(self) -> int:
        """How many tokens the loss trains."""
        return int(self.loss_mask_BT.sum().item())

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch on ``device``."""
        return self._map(lambda tensor: tensor.to(device))

    def rows(self, start: int, stop: int) -> TrainBatch:
        """Rows ``start:stop`` (a micro-batch)."""
        return self._map(lambda tensor: tensor[start:stop])

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> TrainBatch:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        mapped: dict[str, Any] = {
            name: None if value is None else function(value) for name, value in values.items()
        }
        return TrainBatch(**mapped)


def attention_mask_B1TT(batch: TrainBatch) -> torch.Tensor:
    """Boolean [rows, 1, T, T] mask (True = may attend): causal, within a segment or to its shared prompt."""
    segment_BT, prefix_BT = batch.segment_ids_BT, batch.prefix_segment_ids_BT
    position_T = torch.arange(segment_BT.shape[1], device=segment_BT.device)
    causal_TT = position_T[:, None] >= position_T[None, :]
    key_B1T = torch.where(segment_BT > 0, segment_BT, -1)[:, None, :]  # padding keys match no query
    visible_BTT = (key_B1T == segment_BT[:, :, None]) | (key_B1T == prefix_BT[:, :, None])
    diagonal_TT = position_T[:, None] == position_T[None, :]  # so a padding query is never fully masked
    return ((visible_BTT & causal_TT) | diagonal_TT)[:, None, :, :]


@dataclass(frozen=True)
class PackSequence:
    """One tokenized conversation with its trajectory's advantage and per-token weight."""

    tokens: tuple[int, ...]
    trained: tuple[bool, ...]
    logprobs: tuple[float, ...]
    advantage: float = 0.0
    weight: float = 1.0
    group: int = 0

    def first_trained(self) -> int:
        """Index of the first trained token (len(tokens) when none)."""
        return next((index for index, flag in enumerate(self.trained) if flag), len(self.tokens))


@dataclass(frozen=True)
class _Unit:
    prefix: tuple[int, ...]
    branches: tuple[int, ...]  # indices into the sequence list
    offset: int  # where each branch starts inside its sequence

    def length(self, sequences: Sequence[PackSequence]) -> int:
        return len(self.prefix) + sum(len(sequences[index].tokens) - self.offset for index in self.branches)


def _shared_prefix_length(sequences: Sequence[PackSequence]) -> int:
    first = sequences[0].tokens
    common = min(len(sequence.tokens) for sequence in sequences)
    for sequence in sequences[1:]:
        common = next((i for i in range(common) if sequence.tokens[i] != first[i]), common)
    return min(common, min(sequence.first_trained() for sequence in sequences)) - 1


def _units(sequences: Sequence[PackSequence], capacity: int, share_prompts: bool) -> list[_Unit]:
    by_group: dict[int, list[int]] = {}
    for index, sequence in enumerate(sequences):
        by_group.setdefault(sequence.group, []).append(index)
    units: list[_Unit] = []
    for members in by_group.values():
        shared = (
            _shared_prefix_length([sequences[i] for i in members])
            if share_prompts and len(members) > 1
            else 0
        )
        if shared < 1:
            units += [_Unit((), (index,), 0) for index in members]
            continue
        prefix = sequences[members[0]].tokens[:shared]
        current: list[int] = []
        for index in members:  # split a group that does not fit one row; each part repeats the prompt
            candidate = _Unit(prefix, (*current, index), shared)
            if current and candidate.length(sequences) > capacity:
                units.append(_Unit(prefix, tuple(current), shared))
                current = [index]
            else:
                current.append(index)
        units.append(_Unit(prefix, tuple(current), shared))
    return units


def pack_sequences(
    sequences: Sequence[PackSequence], *, capacity: int, share_prompts: bool = True
) -> TrainBatch:
    """Pack sequences (each at most ``capacity`` tokens) into rows of at most ``capacity`` tokens."""
    if not sequences:
        raise ValueError("pack_sequences needs at least one sequence")
    for index, sequence in enumerate(sequences):
        if not len(sequence.tokens) == len(sequence.trained) == len(sequence.logprobs):
            raise ValueError(f"sequence {index}: tokens, trained and logprobs differ in length")
        if sequence.trained and sequence.trained[0]:
            raise ValueError(f"sequence {index}: its first token is marked trained, but nothing predicts it")
        if len(sequence.tokens) > capacity:
            raise ValueError(
                f"sequence {index} has {len(sequence.tokens)} tokens, more than capacity={capacity}"
            )
    units = sorted(_units(sequences, capacity, share_prompts), key=lambda unit: -unit.length(sequences))
    rows: list[list[_Unit]] = []
    used: list[int] = []
    for unit in units:  # first fit, longest first
        size = unit.length(sequences)
        slot = next((r for r, taken in enumerate(used) if taken + size <= capacity), None)
        if slot is None:
            rows.append([unit])
            used.append(size)
        else:
            rows[slot].append(unit)
            used[slot] += size
    return _fill_rows(rows, sequences, max(used))


def _fill_rows(rows: list[list[_Unit]], sequences: Sequence[PackSequence], length: int) -> TrainBatch:
    # Each column is built as Python lists and becomes a tensor with one call: slice assignments of small
    # tensors cost ~10 µs each, a dozen per sequence, which was half of preparing a small batch.
    padding: dict[str, float] = {"tokens": 0, "positions": 0, "segments": 0, "prefixes": 0, "mask": False}
    padding |= {"old": math.nan, "advantages": 0.0, "weights": 0.0, "sequence": -1}
    dtypes = {"mask": torch.bool, "old": torch.float32, "advantages": torch.float32, "weights": torch.float32}
    columns: dict[str, list[list[Any]]] = {name: [] for name in padding}
    for units in rows:
        row: dict[str, list[Any]] = {name: [] for name in padding}
        segment = 0
        for unit in units:
            prefix_segment = 0
            if unit.prefix:
                segment += 1
                prefix_segment = segment
                size = len(unit.prefix)
                row["tokens"] += unit.prefix
                row["positions"] += range(size)
                row["segments"] += [segment] * size
                row["prefixes"] += [0] * size
                row["mask"] += [False] * size
                row["old"] += [math.nan] * size
                row["advantages"] += [0.0] * size
                row["weights"] += [0.0] * size
                row["sequence"] += [-1] * size
            for index in unit.branches:
                segment += 1
                sequence = sequences[index]
                trained = sequence.trained[unit.offset :]
                size = len(trained)
                row["tokens"] += sequence.tokens[unit.offset :]
                row["positions"] += range(unit.offset, len(sequence.tokens))
                row["segments"] += [segment] * size
                row["prefixes"] += [prefix_segment] * size
                row["mask"] += trained
                row["old"] += sequence.logprobs[unit.offset :]
                row["advantages"] += [sequence.advantage if flag else 0.0 for flag in trained]
                row["weights"] += [sequence.weight if flag else 0.0 for flag in trained]
                row["sequence"] += [index] * size
        for name, values in row.items():
            columns[name].append(values + [padding[name]] * (length - len(values)))
    tensors = {
        name: torch.tensor(values, dtype=dtypes.get(name, torch.long)) for name, values in columns.items()
    }
    return TrainBatch(
        tokens_BT=tensors["tokens"],
        position_ids_BT=tensors["positions"],
        segment_ids_BT=tensors["segments"],
        prefix_segment_ids_BT=tensors["prefixes"],
        loss_mask_BT=tensors["mask"],
        old_logprobs_BT=tensors["old"],
        advantages_BT=tensors["advantages"],
        weights_BT=tensors["weights"],
        sequence_index_BT=tensors["sequence"],
    )


@dataclass(frozen=True)
class PreparedBatch:
    """The packed batch (None when nothing is trainable) and the data metrics of docs/rl-math.md §4."""

    batch: TrainBatch | None
    num_groups_submitted: int
    num_groups_trainable: int
    num_trajectories: int
    num_sequences_dropped: int
    reward_std_dev: float
    sequences: tuple[PackSequence, ...] = field(default=(), repr=False)
    # seconds spent rendering chat templates and tokenizing, and packing (the rest of preparing is validation,
    # advantages and token weights)
    tokenize_s: float = field(default=0.0, compare=False)
    pack_s: float = field(default=0.0, compare=False)

    def metrics(self) -> dict[str, float]:
        """``data/*`` metrics of this batch."""
        return {
            "data/step_num_groups_submitted": float(self.num_groups_submitted),
            "data/step_num_groups_trainable": float(self.num_groups_trainable),
            "data/step_num_trajectories": float(self.num_trajectories),
            "data/step_trainer_tokens": float(self.batch.num_trained_tokens if self.batch is not None else 0),
            "data/step_num_sequences_dropped": float(self.num_sequences_dropped),
        }


def _histories(trajectory: Any) -> list[tuple[Sequence[Any], Sequence[Any] | None]]:
    main = [(trajectory.messages_and_choices, trajectory.tools)]
    return main + [
        (history.messages_and_choices, history.tools) for history in trajectory.additional_histories
    ]


def _tokenize_group(
    group: TrajectoryGroup,
    g: int,
    advantages: list[float],
    tokenizer: Any,
    allow: bool,
    max_length: int,
    cache: dict[Any, Any],
) -> tuple[list[tuple[int, list[TokenizedHistory]]], int]:
    """(trajectory index, kept histories) for each trajectory with a nonzero advantage; and the drop count."""
    kept: list[tuple[int, list[TokenizedHistory]]] = []
    dropped = 0
    for t, (trajectory, advantage) in enumerate(zip(group.trajectories, advantages, strict=True)):
        if advantage == 0.0:
            continue
        where = f"group {g}, trajectory {t}"
        tokenized = [
            tokenize_history(
                messages, tools, tokenizer, allow_training_without_logprobs=allow, where=where, cache=cache
            )
            for messages, tools in _histories(trajectory)
        ]
        found = [history for history in tokenized if history is not None]
        if found and not any(history.num_trained for history in found):
            raise ValueError(
                f"{where} has Choices without logprobs; rollouts must request logprobs=True "
                "(client.chat.completions.create(..., logprobs=True)), or pass allow_training_without_logprobs=True"
            )
        fitting = [history for history in found if history.num_trained and len(history.tokens) <= max_length]
        for history in found:
            if history.num_trained and len(history.tokens) > max_length:
                dropped += 1
                warnings.warn(
                    f"{where}: a sequence of {len(history.tokens)} tokens exceeds max_sequence_length={max_length} "
                    "and is dropped from this step; raise max_sequence_length or shorten the rollout",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if fitting:
            kept.append((t, fitting))
    return kept, dropped


def prepare_batch(
    trajectory_groups: Iterable[TrajectoryGroup],
    tokenizer: Any,
    *,
    scale_rewards: bool = True,
    advantage_balance: float = 0.0,
    allow_training_without_logprobs: bool = False,
    max_sequence_length: int = 2048,
    share_prompts: bool = True,
) -> PreparedBatch:
    """Validate groups, compute advantages and token weights (art_core), tokenize and pack."""
    groups = check_groups(trajectory_groups)
    cache: dict[Any, Any] = {}  # renderings and encodings shared within this batch
    per_trajectory: list[tuple[float, list[TokenizedHistory], int]] = []
    trainable_groups = dropped = 0
    tokenize_s = 0.0
    for g, group in enumerate(groups):
        advantages = group_advantages([t.reward for t in group.trajectories], scale_rewards=scale_rewards)
        if not any(advantages):
            continue
        trainable_groups += 1
        started = time.perf_counter()
        kept, group_dropped = _tokenize_group(
            group, g, advantages, tokenizer, allow_training_without_logprobs, max_sequence_length, cache
        )
        tokenize_s += time.perf_counter() - started
        dropped += group_dropped
        if not kept and not group_dropped:
            raise ValueError(
                f"group {g} has no Choice with logprobs to train; rollouts must request logprobs=True and append "
                "the returned Choice to messages_and_choices"
            )
        per_trajectory += [(advantages[t], histories, g) for t, histories in kept]
    normalized = normalize_batch(
        [advantage for advantage, _, _ in per_trajectory],
        [sum(history.num_trained for history in histories) for _, histories, _ in per_trajectory],
        advantage_balance=advantage_balance,
    )
    sequences = tuple(
        PackSequence(history.tokens, history.trained, history.logprobs, advantage, weight, g)
        for (_, histories, g), advantage, weight in zip(
            per_trajectory, normalized.advantages, normalized.token_weights, strict=True
        )
        for history in histories
    )
    started = time.perf_counter()
    batch = (
        pack_sequences(sequences, capacity=max_sequence_length, share_prompts=share_prompts)
        if sequences
        else None
    )
    pack_s = time.perf_counter() - started
    return PreparedBatch(
        batch=batch,
        num_groups_submitted=len(groups),
        num_groups_trainable=trainable_groups,
        num_trajectories=len(per_trajectory),
        num_sequences_dropped=dropped,
        reward_std_dev=mean_reward_std_dev(groups),
        sequences=sequences,
        tokenize_s=tokenize_s,
        pack_s=pack_s,
    )
