"""The transformers engine (CPU and GPU): merged weights per served step, dynamic batching.

Every served step is its own module holding merged (LoRA-folded) weights, so generation never pays for an
unmerged adapter and publishing a step never touches weights a running batch reads: in-flight requests finish
on the module they started with. ``name`` always maps to the latest step; older steps stay in a small LRU and
are reloaded on demand through the ``load_step`` callback.

Requests are batched continuously (``batching.BatchWorker``): those arriving while a batch decodes join it at
the next step, and an idle worker waits ``batch_window_s`` for company. The model runs in that worker thread,
so the HTTP server's event loop stays free.
"""

# size: the step registry (publish, evict, reload) and generate share one lock and the module leases; one file
# keeps that invariant readable in one place.
from __future__ import annotations

import asyncio
import copy
import functools
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from art_local.inference.batching import BatchWorker, Job
from art_local.inference.engine import (
    Completion,
    SamplingParams,
    ServedModel,
    UnknownModelError,
    split_step_name,
)
from art_local.inference.sampling import Row, Vocab
from art_local.inference.weights import Weights, check_weights_fit, load_weights_into
from art_local.openmp import releasing_openmp_workers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LoadStep = Callable[[int], Mapping[str, torch.Tensor] | None]
MAX_RELOADS = 5  # attempts to load an old step that other publishes keep evicting


@dataclass(frozen=True)
class HFEngineConfig:
    """Options of the transformers engine."""

    device: str | None = None  # None: cuda when available, else cpu
    dtype: torch.dtype | None = None  # None: bfloat16 on cuda and on CPUs with native bf16, else float32
    batch_window_s: float = 0.005  # how long the first request of a batch waits for company
    max_batch_rows: int = 64  # sequences (prompts x n) sampled together at most
    max_cached_steps: int = 2  # older steps kept in memory besides the latest (least recently used goes)
    cpu_threads: int | None = None  # torch threads of the sampling thread on CPU; None: torch's
    # requests waiting while the worker makes no progress this long fail (and so does every later one)
    stall_timeout_s: float = 300.0
    watchdog_interval_s: float = 1.0  # how often a waiting request checks that the worker is alive


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_cpu_threads() -> int:
    """Threads for CPU sampling: torch's count (all cores by default).

    This used to leave one core to the HTTP server: two sampling threads ran 5-10x slower than one once another
    thread had run torch ops. The cause was libgomp's idle pools (see ``art_local.openmp``), which the sampler
    and trainer threads now give back; measured on the 18M model, 2 cores, 32 concurrent requests: 870-990
    tokens/s on two threads against 660-680 on one.
    """
    return max(1, torch.get_num_threads())


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPU and on CPUs with native bf16, else float32: what the trainer's ``dtype="auto"`` picks."""
    from art_local.cpu_features import auto_dtype

    return auto_dtype(device)


def _eos_ids(tokenizer: PreTrainedTokenizerBase, module: PreTrainedModel) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(module.generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(int(i) for i in config_eos)
    return frozenset(ids)


@dataclass
class _Entry:
    """One served model name: its tokenizer and the modules of the steps held in memory."""

    base_model: str
    tokenizer: PreTrainedTokenizerBase
    vocab: Vocab
    context_length: int
    created: int
    latest: int
    load_step: LoadStep
    # step -> module, least recently used first; the latest step is never evicted
    modules: OrderedDict[int, PreTrainedModel] = field(default_factory=OrderedDict)
    forgotten: set[int] = field(default_factory=set)
    kept: set[int] = field(
        default_factory=set
    )  # steps not in memory that load_step can load (listed as served)
    load_lock: threading.Lock = field(default_factory=threading.Lock)


class HFEngine:
    """Serves ``name`` and ``name@step`` from merged transformers modules with dynamic batching."""

    def __init__(self, config: HFEngineConfig | None = None) -> None:
        self.config = config or HFEngineConfig()
        self.device = torch.device(self.config.device) if self.config.device else default_device()
        self.dtype = self.config.dtype or default_dtype(self.device)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        # id(module) -> requests that may still run on it (queued, decoding, or between lookup and submit);
        # publishing reuses an evicted module's memory only when nothing holds it
        self._leases: Counter[int] = Counter()
        self.modules_reused = 0  # publishes that copied into an evicted module instead of allocating one
        self._worker = BatchWorker(
            self.config.batch_window_s,
            self.config.max_batch_rows,
            (self.config.cpu_threads or default_cpu_threads()) if self.device.type == "cpu" else None,
            stall_timeout_s=self.config.stall_timeout_s,
        )

    # ---- registry (called from the service, off the event loop) ----

    async def add_model(
        self,
        name: str,
        *,
        base_model: str | Path,
        step: int,
        weights: Mapping[str, torch.Tensor] | None,
        load_step: LoadStep,
        adapter_dir: Path | None = None,
    ) -> None:
        """Serve ``name`` at ``step`` (base weights when ``weights`` is None); again with the same base: publish."""
        await asyncio.to_thread(
            releasing_openmp_workers(self.add_model_sync), name, base_model, step, weights, load_step
        )

    def add_model_sync(
        self,
        name: str,
        base_model: str | Path,
        step: int,
        weights: Mapping[str, torch.Tensor] | None,
        load_step: LoadStep,
    ) -> None:
        """``add_model`` on the calling thread (it loads weights: keep it off an event loop)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with self._lock:
            existing = self._entries.get(name)
        if existing is not None:
            if existing.base_model != str(base_model):
                raise ValueError(
                    f"model {name!r} is already served from {existing.base_model!r}, not {str(base_model)!r}; "
                    "use another name"
                )
            existing.load_step = load_step
            if step != existing.latest:
                self.publish_sync(
                    name, step, weights if weights is not None else self._base_weights(existing)
                )
            return
        tokenizer = AutoTokenizer.from_pretrained(str(base_model))
        module: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=self.dtype)
        module.to(self.device)  # type: ignore[arg-type]  # transformers types .to() narrower than torch
        module.train(False)
        if weights is not None:
            load_weights_into(module, weights)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        entry = _Entry(
            base_model=str(base_model),
            tokenizer=tokenizer,
            vocab=Vocab(tokenizer, _eos_ids(tokenizer, module), int(pad or 0)),
            context_length=int(getattr(module.config, "max_position_embeddings", 2048)),
            created=int(time.time()),
            latest=step,
            load_step=load_step,
        )
        entry.modules[step] = module
        with self._lock:
            self._entries[name] = entry

    def _base_weights(self, entry: _Entry) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        return dict(AutoModelForCausalLM.from_pretrained(entry.base_model, dtype=self.dtype).state_dict())

    async def publish(
        self, name: str, step: int, weights: Mapping[str, torch.Tensor], *, adapter_dir: Path | None = None
    ) -> None:
        """``name`` and ``name@step`` now answer with ``weights``; running batches keep their module."""
        await asyncio.to_thread(releasing_openmp_workers(self.publish_sync), name, step, weights)

    def publish_sync(self, name: str, step: int, weights: Weights) -> None:
        """``publish`` on the calling thread."""
        entry = self._entry(name, name)
        with self._lock:
            template = entry.modules[entry.latest]
        check_weights_fit(template, weights)  # before anything changes
        with self._lock:
            module = self._take_evicted(entry, step)
        if module is None:
            module = self._build(entry, weights)
        else:
            load_weights_into(module, weights)
            self.modules_reused += 1
        with self._lock:
            entry.modules[step] = module
            entry.modules.move_to_end(step)
            entry.latest = step
            entry.forgotten.discard(step)
            self._evict(entry)

    def _take_evicted(self, entry: _Entry, step: int) -> PreTrainedModel | None:
        """Under the lock: remove and return a module that publishing ``step`` would drop and that no request
        holds (its memory takes the new weights), or None. The current latest step is never taken."""
        old = [s for s in entry.modules if s not in (step, entry.latest)]
        dropped = old[: max(len(old) + 1 - self.config.max_cached_steps, 0)]  # + 1: the latest becomes old
        if step in entry.modules and step != entry.latest:
            dropped.insert(0, step)  # republishing a step replaces its module
        for candidate in dropped:
            module = entry.modules[candidate]
            if not self._leases[id(module)]:
                del entry.modules[candidate]
                return module
        return None

    async def forget_steps(self, name: str, keep: Collection[int]) -> None:
        """Stop serving ``name@s`` for every step not in ``keep`` (the latest stays served as ``name``)."""
        entry = self._entry(name, name)
        with self._lock:
            for step in list(entry.modules):
                if step not in keep and step != entry.latest:
                    del entry.modules[step]
            entry.forgotten.update(s for s in range(entry.latest) if s not in keep)
            entry.kept.intersection_update(keep)

    def _build(self, entry: _Entry, weights: Weights) -> PreTrainedModel:
        with self._lock:
            template = entry.modules[entry.latest]
        module = copy.deepcopy(template)
        load_weights_into(module, weights)
        return module

    def _evict(self, entry: _Entry) -> None:
        old = [s for s in entry.modules if s != entry.latest]
        for step in old[: max(len(old) - self.config.max_cached_steps, 0)]:
            del entry.modules[step]

    def _entry(self, name: str, requested: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownModelError(requested, [m.name for m in self._served_locked()])
            return entry

    # ---- Engine protocol ----

    def note_kept_steps(self, name: str, steps: Collection[int]) -> None:
        """``name@s`` for each of ``steps`` is loadable on demand (a kept checkpoint): list it as served."""
        entry = self._entry(name, name)
        with self._lock:
            entry.kept.update(s for s in steps if s <= entry.latest and s not in entry.forgotten)

    def _served_locked(self) -> list[ServedModel]:
        served = []
        for name, e in self._entries.items():
            steps = sorted(set(e.modules) | (e.kept - e.forgotten))
            for label in [name, *(f"{name}@{s}" for s in steps)]:
                served.append(ServedModel(label, e.tokenizer, e.context_length, e.created))
        return served

    def served_models(self) -> list[ServedModel]:
        """``name`` and ``name@step`` for every step held in memory."""
        with self._lock:
            return self._served_locked()

    def resolve(self, model: str) -> ServedModel:
        """Tokenizer and context length of ``model`` (older steps are checked when generating)."""
        name, _ = split_step_name(model)
        entry = self._entry(name, model)
        return ServedModel(model, entry.tokenizer, entry.context_length, entry.created)

    def _module(self, model: str) -> tuple[_Entry, PreTrainedModel | None, int]:
        """The entry, the module of the requested step (leased: ``_release`` it) or None when it is not in
        memory, and the step."""
        name, step = split_step_name(model)
        entry = self._entry(name, model)
        with self._lock:
            wanted = entry.latest if step is None else step
            if wanted in entry.forgotten or wanted > entry.latest:
                raise UnknownModelError(model, [m.name for m in self._served_locked()])
            module = entry.modules.get(wanted)
            if module is not None:
                entry.modules.move_to_end(wanted)
                self._leases[id(module)] += 1
        return entry, module, wanted

    def _release(self, module: PreTrainedModel) -> None:
        with self._lock:
            self._leases[id(module)] -= 1
            if not self._leases[id(module)]:
                del self._leases[id(module)]

    def _load_old_step(self, model: str, entry: _Entry, step: int) -> None:
        with entry.load_lock:
            with self._lock:
                if step in entry.modules:
                    return
            weights = entry.load_step(step)
            if weights is None and step == 0:  # step 0 is the base model by definition
                weights = self._base_weights(entry)
            if weights is None:
                raise UnknownModelError(model, [m.name for m in self.served_models()])
            module = self._build(entry, weights)
            with self._lock:
                entry.modules[step] = module
                self._evict(entry)

    async def generate(
        self, model: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> list[Completion]:
        """``params.n`` completions, sampled in a batch with whatever else arrived in the same window."""
        entry, module, step = self._module(model)
        for _ in range(MAX_RELOADS):
            if module is not None:
                break
            await asyncio.to_thread(releasing_openmp_workers(self._load_old_step), model, entry, step)
            entry, module, step = self._module(model)  # leased under the lock (another publish may evict it)
        if module is None:
            raise RuntimeError(
                f"step {step} of {model!r} was evicted {MAX_RELOADS} times while loading; raise "
                "HFEngineConfig.max_cached_steps"
            )
        try:
            room = entry.context_length - len(prompt_token_ids)
            if room < 1:
                raise ValueError(
                    f"the prompt has {len(prompt_token_ids)} tokens; {model!r} accepts {entry.context_length}"
                )
            rows = [
                Row(
                    tuple(prompt_token_ids),
                    params,
                    self._generator(params.seed, i),
                    min(params.max_tokens, room),
                )
                for i in range(params.n)
            ]
            loop = asyncio.get_running_loop()
            future: asyncio.Future[list[Completion]] = loop.create_future()
            release = functools.partial(self._release, module)
            job = Job(module, entry.vocab, rows, future, loop, release=release)
            self._worker.submit(job)
        except BaseException:
            self._release(module)
            raise
        return await self._wait(job)

    async def _wait(self, job: Job) -> list[Completion]:
        """The job's result; fails with the worker's failure instead of waiting on a dead or stuck worker.

        Cancelled (client gone, timeout) or failed: the job is marked abandoned, so the worker drops its rows
        at the next step and releases the module.
        """
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=self.config.watchdog_interval_s)
                if done:
                    return job.future.result()
                self._worker.check()
        finally:
            job.abandoned = not job.future.done()

    def check_healthy(self) -> None:
        """Raise ``EngineFailure`` (naming the cause) if the batch worker died or stalled."""
        self._worker.check()

    def pending_requests(self) -> int:
        """Requests submitted and not answered yet (queued, waiting for room in a batch, or decoding)."""
        return self._worker.live_jobs()

    @property
    def rows_dropped(self) -> int:
        """Rows of abandoned requests the worker dropped before they finished (for tests and benchmarks)."""
        return self._worker.rows_dropped

    @property
    def steps_run(self) -> int:
        """Decoding steps the worker has run so far (for tests and benchmarks)."""
        return self._worker.steps_run

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed((seed + index) % (2**63))

    @property
    def batches_run(self) -> int:
        """How many groups of requests the worker has admitted (prefilled together) so far."""
        return self._worker.batches_run

    async def close(self) -> None:
        """Stop the batch worker and drop every module."""
        await asyncio.to_thread(self._worker.close)
        with self._lock:
            self._entries.clear()

    def describe(self) -> dict[str, Any]:
        """Device, dtype and steps held per name (for logs and tests)."""
        with self._lock:
            return {
                "device": str(self.device),
                "dtype": str(self.dtype),
                "models": {
                    n: {"latest": e.latest, "in_memory": list(e.modules)} for n, e in self._entries.items()
                },
            }
