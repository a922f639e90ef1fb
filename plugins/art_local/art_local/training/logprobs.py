"""Per-token logprobs and entropies of a packed batch, with the unembedding computed in bounded chunks.

Only the positions that are asked for go through the output layer, at most ``chunk_size`` at a time; with
gradients each chunk is recomputed in the backward pass (activation checkpointing), so peak memory does not grow
with vocabulary × sequence length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from art_local.training.batch import TrainBatch, attention_mask_B1TT


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


@contextlib.contextmanager
def autocast_for(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` unless it is fp32 (then a no-op)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def hidden_states_BTH(model: torch.nn.Module, batch: TrainBatch, dtype: torch.dtype) -> torch.Tensor:
    """The decoder's last hidden states for the packed rows (segment-aware 4D attention mask)."""
    decoder = causal_lm(model).get_decoder()  # type: ignore[operator]
    device = batch.tokens_BT.device
    with autocast_for(device, dtype):
        output = decoder(
            input_ids=batch.tokens_BT,
            attention_mask=attention_mask_B1TT(batch),
            position_ids=batch.position_ids_BT,
            use_cache=False,
        )
    return output.last_hidden_state  # type: ignore[no-any-return]


def _chunk_logprobs(
    lm_head: torch.nn.Module, softcap: float | None, hidden_NH: torch.Tensor, targets_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits_NV = lm_head(hidden_NH).float()
    if softcap:
        logits_NV = torch.tanh(logits_NV / softcap) * softcap
    normalizer_N = torch.logsumexp(logits_NV, dim=-1)
    logprobs_N = logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - normalizer_N
    with torch.no_grad():  # softmax as exp(logits − normalizer), in place: one chunk-sized temporary, not two
        detached_NV = logits_NV.detach()
        probs_NV = (detached_NV - normalizer_N.detach()[:, None]).exp_()
        entropy_N = normalizer_N.detach() - probs_NV.mul_(detached_NV).sum(-1)
    return logprobs_N, entropy_N


def predicted_positions_BT(batch: TrainBatch, *, all_positions: bool) -> torch.Tensor:
    """Positions whose logprob is computed: trained tokens, or every token predicted inside its segment."""
    selected_BT = batch.loss_mask_BT.bool().clone()
    if all_positions:
        segments_BT = batch.segment_ids_BT
        selected_BT[:, 1:] |= (segments_BT[:, 1:] == segments_BT[:, :-1]) & (segments_BT[:, 1:] > 0)
    selected_BT[:, 0] = False  # nothing predicts the first token of a row
    return selected_BT


def logprobs_and_entropy(
    model: torch.nn.Module,
    batch: TrainBatch,
    *,
    chunk_size: int,
    dtype: torch.dtype = torch.float32,
    all_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, T] logprobs (with grad when enabled) and entropies of the predicted positions; 0 elsewhere."""
    selected_BT = predicted_positions_BT(batch, all_positions=all_positions)
    hidden_BTH = hidden_states_BTH(model, batch, dtype)
    source_BT = torch.zeros_like(selected_BT)
    source_BT[:, :-1] = selected_BT[:, 1:]  # token t is predicted from the hidden state at t − 1
    hidden_NH = hidden_BTH[source_BT]
    targets_N = batch.tokens_BT[selected_BT]
    lm = causal_lm(model)
    lm_head = lm.get_output_embeddings()  # type: ignore[operator]
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    chunks = range(0, hidden_NH.shape[0], chunk_size)
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in chunks:
        arguments = (
            lm_head,
            softcap,
            hidden_NH[start : start + chunk_size],
            targets_N[start : start + chunk_size],
        )
        if len(chunks) > 1 and torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, *arguments, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*arguments))
    logprobs_N = torch.cat([p[0] for p in pieces]) if pieces else hidden_NH.new_zeros(0, dtype=torch.float32)
    entropy_N = torch.cat([p[1] for p in pieces]) if pieces else hidden_NH.new_zeros(0, dtype=torch.float32)
    logprobs_BT = torch.zeros(selected_BT.shape, dtype=torch.float32, device=selected_BT.device)
    entropy_BT = torch.zeros(selected_BT.shape, dtype=torch.float32, device=selected_BT.device)
    logprobs_BT = logprobs_BT.masked_scatter(selected_BT, logprobs_N)
    entropy_BT = entropy_BT.masked_scatter(selected_BT, entropy_N)
    return logprobs_BT, entropy_BT
