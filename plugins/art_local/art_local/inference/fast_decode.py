"""The fast CPU decoding path: one decoding step of a Llama-style model straight through its weights.

``DecodeStep.of(model)`` gives a step function for plain full-attention Llama/Mistral/Qwen2 stacks, or None (the
caller then runs the model's own forward, the reference: a test holds the two equal within 1e-5). Its matmuls
go through ``PackedLinears`` — oneDNN on weights packed ahead, via private ``torch.ops.mkldnn`` ops — only where
those ops exist, agree with ``F.linear`` at every pack, and ``ART_PACKED_LINEARS`` is not 0; anywhere else they
are plain ``F.linear``. Measured on the 18M model, 8 rows, 1 thread: 17-19 ms per step through transformers,
15-16 ms through ``DecodeStep``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel


class PackedLinears:
    """``F.linear`` through oneDNN with weights packed ahead for small batches: the decoding step's matmuls.

    A decoding step multiplies a handful of rows by every weight matrix; for that shape oneDNN's kernels on
    weights reordered ahead of time beat the default BLAS call. Measured on the 18M model's 36 matrices, 8 rows,
    2 AMD EPYC cores: 6.6-7.5 ms per step against 8.7-13.5 ms through ``F.linear`` (three runs). A weight is packed on first
    use and packed again when it changes (a publish copies new weights into a module in place: tensors count
    their in-place changes in ``_version``; a ``.data`` swap changes ``data_ptr``; writing through ``.data`` in
    place is the one change it cannot see). Packs of the ``keep_modules`` most recently used modules are kept.

    Float32 CPU weights only, and only where torch has oneDNN; ``PackedLinears.available()`` is False elsewhere
    (and after a pack ever disagreed with ``F.linear`` by more than ``tolerance``), and ``DecodeStep`` then calls
    ``F.linear``. ``ART_PACKED_LINEARS=0`` turns it off.
    """

    keep_modules = 2
    # a packed call costs ~25 us more than F.linear, won back only on larger matrices (measured: 512x512 and up
    # gain, 128x512 and the tiny model's 64-wide ones lose)
    min_elements = 1 << 17
    tolerance = 1e-4  # relative to the output's scale; different summation orders differ by ~1e-7
    _lock = threading.Lock()
    _by_module: OrderedDict[int, tuple[weakref.ref[torch.nn.Module], PackedLinears]] = OrderedDict()
    _broken = False

    def __init__(self) -> None:
        # id(weight) -> (the weight, weakly, its _version and data_ptr when packed, the pack)
        self._packs: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, int], torch.Tensor]] = {}

    @classmethod
    def available(cls) -> bool:
        return (
            not cls._broken
            and os.environ.get("ART_PACKED_LINEARS", "1") != "0"
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )

    @classmethod
    def for_module(cls, module: torch.nn.Module) -> PackedLinears | None:
        """The packs of ``module`` (fp32 CPU weights), or None where packing does not apply."""
        weight = next(module.parameters())
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not cls.available():
            return None
        with cls._lock:
            held = cls._by_module.pop(id(module), None)
            # an id is reused once its module is freed: a new module never inherits the old one's packs
            packs = held[1] if held is not None and held[0]() is module else PackedLinears()
            packs._forget_freed()
            cls._by_module[id(module)] = (weakref.ref(module), packs)
            while len(cls._by_module) > cls.keep_modules:
                cls._by_module.popitem(last=False)
        return packs

    def refresh(self, linears: Sequence[torch.nn.Linear]) -> None:
        """Pack every large enough weight of ``linears`` not packed yet or changed since.

        Raises (``PackedLinearsDisagree`` if a pack gives another result than ``F.linear``) having changed
        nothing a caller uses; the caller then runs ``F.linear``."""
        for linear in linears:
            weight = linear.weight
            if weight.numel() < self.min_elements:
                continue
            held = self._packs.get(id(weight))
            stamp = (weight._version, weight.data_ptr())
            if held is None or held[0]() is not weight or held[1] != stamp:
                self._packs[id(weight)] = (weakref.ref(weight), stamp, self._pack(weight, linear.bias))

    def __call__(self, x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
        """``linear(x)``, on the pack ``refresh`` made of its weight if it is large enough."""
        weight, bias = linear.weight, linear.bias
        held = self._packs.get(id(weight))
        if held is None or held[0]() is not weight:  # too small to pack (or an id left by a freed weight)
            return F.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, held[2], bias, "none", [], "")
        return cast(torch.Tensor, out).view(*x.shape[:-1], weight.shape[0])

    def _forget_freed(self) -> None:
        for key in [key for key, (ref, _, _) in self._packs.items() if ref() is None]:
            del self._packs[key]

    @classmethod
    @torch.no_grad()
    def _pack(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed = cast(torch.Tensor, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64))
        probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        expected = F.linear(probe, weight, bias)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        if not torch.allclose(got, expected, rtol=0, atol=cls.tolerance * float(expected.abs().max()) + 1e-6):
            cls._broken = True  # never trust this build's packs again; the caller falls back below
            raise PackedLinearsDisagree(float((got - expected).abs().max()))
        return packed


class PackedLinearsDisagree(RuntimeError):
    """oneDNN's packed linear gave another result than ``F.linear`` (the packs are off from then on)."""


def _plain_linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


_LEAN_DECODER_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


class DecodeStep:
    """One decoding step (one new token per row) of a Llama-style model, straight through its weights.

    ``DecodeStep.of(model)`` is None unless every layer is a plain full-attention Llama/Mistral/Qwen2 decoder
    layer with a SiLU MLP (the dense, unsplit weights these formulas assume); callers then use the model's own
    forward. Rotary embeddings and RMSNorm are the model's own modules, so rope scaling variants are theirs.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        inner = cast(Any, model).model
        self.embed, self.rotary, self.norm = inner.embed_tokens, inner.rotary_emb, inner.norm
        self.layers = list(inner.layers)
        self.lm_head = cast(Any, model).lm_head
        # the architecture's own rotary formula (each of these modules defines apply_rotary_pos_emb)
        self.rotate = sys.modules[type(self.layers[0]).__module__].apply_rotary_pos_emb
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.linears: list[torch.nn.Linear] = [
            linear
            for layer in self.layers
            for linear in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
                layer.mlp.gate_proj,
                layer.mlp.up_proj,
                layer.mlp.down_proj,
            )
        ] + [self.lm_head]
        large = any(linear.weight.numel() >= PackedLinears.min_elements for linear in self.linears)
        self.packed = PackedLinears.for_module(model) if large else None

    @staticmethod
    def of(model: PreTrainedModel) -> DecodeStep | None:
        config = model.config
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if (
            layers is None
            or not hasattr(model, "lm_head")
            or any(type(layer).__name__ not in _LEAN_DECODER_LAYERS for layer in layers)
            or any(
                not hasattr(sys.modules[type(layer).__module__], "apply_rotary_pos_emb") for layer in layers
            )
            or getattr(config, "hidden_act", None) != "silu"
            or getattr(config, "pretraining_tp", 1) != 1
            or getattr(config, "sliding_window", None) is not None
            or getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager")
        ):
            return None
        return DecodeStep(model)

    def __call__(
        self, tokens_B: torch.Tensor, mask_BT: torch.Tensor, positions_B: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Next-token logits ``[B, V]`` after ``tokens_B``; appends each layer's new key and value to ``cache``.

        ``mask_BT`` covers the cache and the new token (1 on real tokens).
        """
        if self.packed is not None:
            try:
                self.packed.refresh(self.linears)  # a publish may have changed the weights in place
            except Exception as exc:  # a pack that disagrees, or oneDNN (or _version) failing here: F.linear
                logging.getLogger(__name__).warning("decoding without packed matmuls: %r", exc)
                self.packed = None
            else:
                return self._step(tokens_B, mask_BT, positions_B, cache, self.packed)
        return self._step(tokens_B, mask_BT, positions_B, cache, _plain_linear)

    def _step(
        self,
        tokens_B: torch.Tensor,
        mask_BT: torch.Tensor,
        positions_B: torch.Tensor,
        cache: DynamicCache,
        linear: Callable[[torch.Tensor, torch.nn.Linear], torch.Tensor],
    ) -> torch.Tensor:
        B = tokens_B.shape[0]
        hidden_B1D = self.embed(tokens_B.unsqueeze(-1))
        cos, sin = self.rotary(hidden_B1D, positions_B.unsqueeze(-1))
        keep_B11T = mask_BT.bool()[:, None, None, :]
        for layer, cached in zip(self.layers, cast(list[Any], cache.layers), strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            x_B1D = layer.input_layernorm(hidden_B1D)
            q, k, v = (
                linear(x_B1D, attention.q_proj),
                linear(x_B1D, attention.k_proj),
                linear(x_B1D, attention.v_proj),
            )
            q_BH1d = q.view(B, 1, self.heads, self.head_dim).transpose(1, 2)
            k_BK1d = k.view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v_BK1d = v.view(B, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q_BH1d, k_BK1d = self.rotate(q_BH1d, k_BK1d, cos, sin)
            cached.keys = torch.cat([cached.keys, k_BK1d], dim=-2)
            cached.values = torch.cat([cached.values, v_BK1d], dim=-2)
            heads_BH1d = F.scaled_dot_product_attention(
                q_BH1d,
                cached.keys,
                cached.values,
                attn_mask=keep_B11T,
                scale=attention.scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            out = heads_BH1d.transpose(1, 2).reshape(B, 1, self.heads * self.head_dim)
            hidden_B1D = hidden_B1D + linear(out, attention.o_proj)
            x_B1D = layer.post_attention_layernorm(hidden_B1D)
            gate, up = linear(x_B1D, mlp.gate_proj), linear(x_B1D, mlp.up_proj)
            hidden_B1D = hidden_B1D + linear(F.silu(gate) * up, mlp.down_proj)
        return linear(self.norm(hidden_B1D), self.lm_head)[:, -1, :]
