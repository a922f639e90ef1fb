"""The benchmark batch as plain JSON data, shared by our side and openpipe-art's side (stdlib only)."""

from __future__ import annotations

import random
from typing import Any

WORDS = "the agent reads the file then calls a tool and answers with a short plan for the user".split()


WORKLOADS = ("plain", "choices")


def make_batch(
    groups: int, trajectories: int, messages: int, tokens: int, seed: int = 0, *, workload: str = "choices"
) -> list[dict[str, Any]]:
    """``groups`` × ``trajectories`` × ``messages`` messages; every other one an assistant turn.

    ``workload="choices"``: assistant turns are serialized Choices with ``tokens`` logprobs each;
    ``"plain"``: plain ``{"role": "assistant", ...}`` message dicts (what a non-trained eval logs).
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload={workload!r}; use one of {', '.join(WORKLOADS)}")
    rng = random.Random(seed)
    batch = []
    for g in range(groups):
        group = {"metadata": {"scenario_id": f"s{g}"}, "trajectories": []}
        for _ in range(trajectories):
            items: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful agent."}]
            while len(items) < messages:
                if len(items) % 2 == 1:
                    items.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=12))})
                elif workload == "plain":
                    items.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=tokens))})
                else:
                    ids = [rng.randrange(32000) for _ in range(tokens)]
                    items.append(
                        {
                            "finish_reason": "stop",
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": " ".join(rng.choices(WORDS, k=tokens)),
                            },
                            "logprobs": {
                                "content": [
                                    {
                                        "token": f"token_id:{i}",
                                        "logprob": -rng.random(),
                                        "bytes": None,
                                        "top_logprobs": [],
                                    }
                                    for i in ids
                                ]
                            },
                        }
                    )
            group["trajectories"].append(
                {
                    "messages": items,
                    "reward": rng.random(),
                    "metrics": {"turns": messages // 2, "ok": rng.random() > 0.5},
                }
            )
        batch.append(group)
    return batch
