"""vLLM's OpenAI server as a subprocess: checks before the start, the launch, one HTTP client, sleep, stop.

Every failure names vLLM and the fix: a missing interpreter or package and an unservable CPU head size are
refused before launching; a start that dies carries the tail of vLLM's own output and, when known, the fix;
a vLLM that dies later turns every request into an error that says it exited, with its exit code and log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from art_local.inference.protocol import RequestError
from art_local.inference.vllm_config import (
    VLLMEngineConfig,
    VLLMRuntime,
    check_model_for_cpu,
    launch_env,
    memory_fraction,
    probe_runtime,
    start_failure_hint,
)

BASE_ALIAS = "art-base"  # vLLM's served name for the base weights
KEEPALIVE_S = 2.0  # below vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def vllm_command(
    config: VLLMEngineConfig,
    base_model: str,
    port: int,
    api_key: str,
    *,
    gpu_memory_utilization: float = 0.85,
    sleep_mode: bool = False,
) -> list[str]:
    """The command line of vLLM's OpenAI server for ``base_model``."""
    command = [
        config.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", base_model,
        "--served-model-name", BASE_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--api-key", api_key,
        "--enable-lora",
        "--max-loras", str(config.max_loras),
        "--max-lora-rank", str(config.max_lora_rank),
        "--return-tokens-as-token-ids",
        "--logprobs-mode", "raw_logprobs",
        "--max-logprobs", "20",
        "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--tensor-parallel-size", str(config.tensor_parallel_size),
    ]  # fmt: skip
    if config.max_model_len is not None:
        command += ["--max-model-len", str(config.max_model_len)]
    if sleep_mode:
        command.append("--enable-sleep-mode")
    return command + list(config.extra_args)


async def _group_gone(pgid: int, timeout_s: float) -> None:
    """Wait (bounded) until no process of group ``pgid`` is left, the orphans' reaping included."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.1)


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends SIGTERM when the thread that forked it exits."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn_tied_to_us(command: list[str], log: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group from a thread that lives exactly as long as it does, so that
    if this process dies (SIGTERM, SIGKILL) vLLM gets SIGTERM instead of holding the GPU as an orphan."""
    started: queue.Queue[subprocess.Popen[bytes] | BaseException] = queue.Queue()

    def keeper() -> None:
        try:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except BaseException as error:
            started.put(error)
            return
        started.put(process)
        process.wait()

    threading.Thread(target=keeper, name="art-vllm-keeper", daemon=True).start()
    outcome = started.get(timeout=60.0)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class VLLMExitedError(RuntimeError):
    """vLLM's process is gone; the backend cannot serve until it is restarted."""


class VLLMProcess:
    """The vLLM server subprocess and the one ``httpx.AsyncClient`` that talks to it."""

    def __init__(self, config: VLLMEngineConfig, base_model: str) -> None:
        self.config, self.base_model = config, base_model
        self.api_key = os.urandom(24).hex()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime: VLLMRuntime | None = None
        self.sleeps = False  # launched with sleep mode (GPU) or the dev endpoints (CPU) for sleep/wake
        self.start_seconds: float | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="art-vllm-", suffix=".log", delete=False)
        self._process: subprocess.Popen[bytes] | None = None
        # one connection pool per event loop that talks to vLLM (an AsyncClient is bound to its loop): the HTTP
        # server's loop carries every rollout, the caller's loop the adapter loads and sleep/wake
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._clients_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The vLLM server's process id (None before start and after stop)."""
        return None if self._process is None else self._process.pid

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client (connection pool) of the running event loop, made on its first request."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            client = self._clients.get(loop)
            if client is None:
                client = httpx.AsyncClient(
                    base_url=self.url,
                    headers={"Authorization": f"Bearer {self.api_key}"},
                    timeout=httpx.Timeout(self.config.request_timeout_s, connect=10.0),
                    # idle connections expire before vLLM's uvicorn closes them (5 s keep-alive): reusing one it
                    # is closing fails a request with ReadError('') (seen between RL steps)
                    limits=httpx.Limits(
                        max_connections=None, max_keepalive_connections=64, keepalive_expiry=KEEPALIVE_S
                    ),
                )
                self._clients[loop] = client
            return client

    def clients_made(self) -> int:
        """How many HTTP clients exist (one per event loop that has talked to vLLM)."""
        with self._clients_lock:
            return len(self._clients)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines vLLM printed."""
        text = Path(self._log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _launch(self) -> subprocess.Popen[bytes]:
        """Checks that need no launch, then the launch itself (blocking; run in a thread)."""
        runtime = probe_runtime(self.config.python)
        if not runtime.cuda:
            check_model_for_cpu(self.base_model)
        self.runtime = runtime
        self.sleeps = bool(self.config.sleep_during_train)
        command = vllm_command(
            self.config,
            self.base_model,
            self.port,
            self.api_key,
            gpu_memory_utilization=memory_fraction(self.config, cuda=runtime.cuda),
            sleep_mode=self.sleeps and runtime.cuda,  # vLLM's CPU build refuses --enable-sleep-mode
        )
        env = launch_env(self.config, cuda=runtime.cuda, sleep=self.sleeps)
        return _spawn_tied_to_us(command, self._log, env)

    async def start(self) -> None:
        """Launch vLLM and wait for ``/health``; on failure the error carries vLLM's output and the fix."""
        started = time.monotonic()
        try:
            self._process = await asyncio.to_thread(self._launch)
        except BaseException:
            await self.stop()  # removes the log file
            raise
        deadline = started + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                await self._fail(f"vLLM exited with code {self._process.returncode} while starting")
            with contextlib.suppress(httpx.TransportError):
                if (await self.client.get("/health", timeout=5.0)).status_code == 200:
                    self.start_seconds = time.monotonic() - started
                    return
            await asyncio.sleep(0.5)
        await self._fail(
            f"vLLM did not answer /health within {self.config.start_timeout_s:.0f} s "
            "(raise VLLMEngineConfig(start_timeout_s=...) if it was still loading)"
        )

    async def _fail(self, headline: str) -> None:
        tail = self.log_tail()
        hint = start_failure_hint(tail)
        await self.stop()
        raise RuntimeError(f"{headline}:\n{tail}" + (f"\n{hint}" if hint else ""))

    def _exited(self) -> VLLMExitedError | None:
        process = self._process
        if process is None:
            return VLLMExitedError("the vLLM server was stopped (the backend was closed)")
        if process.poll() is None:
            return None
        return VLLMExitedError(
            f"the vLLM server (pid {process.pid}) exited with code {process.returncode}; close this "
            f"LocalBackend and create a new one to restart it. vLLM's last output:\n{self.log_tail()}"
        )

    async def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """One request to vLLM; a non-2xx answer raises with vLLM's text, a dead vLLM with its exit."""
        exited = self._exited()
        if exited is not None:
            raise exited
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        payload = None if body is None else dict(body)
        try:
            try:
                response = await self.client.request(method, path, json=payload, timeout=timeout)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                if path != "/v1/completions" or self._exited() is not None:
                    raise
                # a pooled connection vLLM closed as we sent: sampling has no side effect, so send it again
                response = await self.client.request(method, path, json=payload, timeout=timeout)
        except httpx.TransportError as error:
            await asyncio.sleep(0.2)  # a dying process: let it be reaped so the error can say so
            exited = self._exited()
            if exited is not None:
                raise exited from error
            raise RuntimeError(f"vLLM {path} failed: {error!r}") from error
        if 400 <= response.status_code < 500 and path == "/v1/completions":
            # vLLM refused the request itself (a limit it has and we did not check): the client's error, 400
            raise RequestError(f"vLLM refused the request: {response.text[:2000]}")
        if response.status_code >= 400:
            raise RuntimeError(f"vLLM {path} answered {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content.strip().startswith(b"{") else response.text

    async def post(self, path: str, body: Mapping[str, Any], timeout_s: float | None = None) -> Any:
        """POST ``body`` to vLLM."""
        return await self.request("POST", path, body, timeout_s)

    async def sleep(self) -> None:
        """vLLM sleep level 1 (GPU: weights to host memory, KV cache freed) once in-flight requests end."""
        await self.request("POST", "/sleep?level=1&mode=wait")

    async def wake_up(self) -> None:
        """Undo ``sleep``; vLLM schedules requests again."""
        await self.request("POST", "/wake_up")

    async def is_sleeping(self) -> bool:
        """What vLLM's ``/is_sleeping`` says."""
        return bool((await self.request("GET", "/is_sleeping", timeout_s=30.0))["is_sleeping"])

    async def _close_clients(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, {}
        here = asyncio.get_running_loop()
        for loop, client in clients.items():
            if loop is here:
                await client.aclose()
            elif loop.is_running():  # the HTTP server's loop: close its pool there, briefly
                done = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(done), 5.0)
            # a loop that has stopped took its connections with it

    async def stop(self) -> None:
        """SIGTERM vLLM's process group (its engine workers too), then SIGKILL what is left of it after the
        server exits or 30 s pass; remove the log."""
        process, self._process = self._process, None
        await self._close_clients()
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 30.0)
            except subprocess.TimeoutExpired:
                pass
            # the group outlives a leader that was killed (its EngineCore): nothing of it may stay behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait, 10.0)
            await _group_gone(process.pid, timeout_s=10.0)
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._log.name)
