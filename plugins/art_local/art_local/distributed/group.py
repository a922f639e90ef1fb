"""The parent's handle on one worker group: the launcher process, the channel to rank 0, bounded waits.

Methods block (each with a deadline); ``LocalBackend`` calls them through ``asyncio.to_thread`` so the user's
event loop keeps running (and the inference server keeps serving) during a step. A worker failure becomes
``DistributedWorkerError`` carrying the failed rank's traceback; the group is then unusable until closed.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from art_local.distributed.channel import (
    ChannelClosed,
    ProtocolError,
    recv_json,
    recv_message,
    send_message,
    wait_readable,
)
from art_local.distributed.config import CHANNEL_ENV, TOKEN_ENV, DistributedConfig
from art_local.distributed.protocol import ErrorReply, Request, ShutdownRequest

ReplyT = TypeVar("ReplyT")
_POLL_S = 0.2
# Messages of ranks that only failed because another rank died first (used to name the root cause).
_SECONDARY = (
    "Connection closed by peer",
    "Connection reset by peer",
    "DistBackendError",
    "NCCL communicator",
)


class DistributedWorkerError(RuntimeError):
    """A trainer worker failed; the message names the rank and carries its traceback."""


def _format_failure(report: dict[str, Any], log_path: Path) -> str:
    """The failed rank's headline and traceback, then one line per other failed rank."""
    if "launcher" in report:
        launcher = report["launcher"]
        return (
            f"the torchrun launcher failed: {launcher['message']}\n{launcher['traceback']}(log: {log_path})"
        )
    ranks: dict[str, dict[str, Any]] = report.get("ranks", {})

    def secondary(item: tuple[str, dict[str, Any]]) -> tuple[bool, bool, int, int]:
        rank, info = item
        message = str(info.get("message") or "")
        has_traceback = bool(info.get("traceback"))
        return (
            not has_traceback,
            any(s in message for s in _SECONDARY),
            info.get("timestamp") or 0,
            int(rank),
        )

    ordered = sorted(ranks.items(), key=secondary)
    if not ordered:
        return f"the worker group failed without a report (log: {log_path})"
    rank, root = ordered[0]
    cause = root.get("message") or (f"signal {root['signal']}" if root.get("signal") else "no message")
    lines = [f"trainer worker rank {rank} failed (exit code {root['exitcode']}): {cause}"]
    if root.get("traceback"):
        lines.append(f"worker traceback (rank {rank}):\n{root['traceback'].rstrip()}")
    lines += [
        f"rank {other} also stopped (exit code {info['exitcode']}): {info.get('message') or info.get('signal')}"
        for other, info in ordered[1:]
    ]
    lines.append(f"(worker log: {log_path})")
    return "\n".join(lines)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class WorkerGroup:
    """One torchrun worker group serving one model; ``start`` it, ``call`` requests, ``close`` it."""

    def __init__(
        self,
        config: DistributedConfig,
        process: subprocess.Popen[bytes],
        channel: socket.socket,
        run_dir: Path,
        log_path: Path,
        hello: dict[str, Any],
    ) -> None:
        self.config = config
        self._process, self._channel = process, channel
        self._run_dir, self.log_path = run_dir, log_path
        self.world_size = int(hello["world_size"])
        self.workers = [(str(host), int(pid)) for host, pid in hello["workers"]]  # (host, pid) by global rank
        self._lock = threading.Lock()
        self._failure: DistributedWorkerError | None = None
        self._closed = False

    @classmethod
    def start(cls, config: DistributedConfig, *, log_path: Path) -> WorkerGroup:
        """Launch the workers and wait (``start_timeout_s``) for rank 0 to connect and prove the token."""
        run_dir = Path(tempfile.mkdtemp(prefix="art-dist-"))  # 0700: only this user can reach the socket
        path = run_dir / "channel.sock"
        token = secrets.token_hex(32)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "art_local.distributed.launch", "--run-dir", str(run_dir)]
        command += ["--nproc-per-node", str(config.nproc_per_node), "--nnodes", str(config.nnodes)]
        command += ["--master-addr", config.master_addr, "--master-port", str(config.master_port)]
        command += ["--rdzv-timeout", str(int(config.start_timeout_s))]
        command += ["--shutdown-timeout", str(int(config.shutdown_timeout_s))]
        env = {**os.environ, **config.worker_env(), CHANNEL_ENV: str(path), TOKEN_ENV: token}
        try:
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    command,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C meant for the user's program does not hit the workers
                )
        except BaseException:
            listener.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        try:
            channel, hello = _accept(listener, process, token, config.start_timeout_s, run_dir, log_path)
        except BaseException:
            _stop(process, config.shutdown_timeout_s, [])
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        finally:
            listener.close()
        return cls(config, process, channel, run_dir, log_path, hello)

    @property
    def failed(self) -> bool:
        """True once a worker failed (only ``close`` is left to do)."""
        return self._failure is not None

    def call(self, request: Request, reply_type: type[ReplyT], *, timeout_s: float | None = None) -> ReplyT:
        """Send ``request``, wait for its reply (``request_timeout_s``); re-raise a worker's clean error."""
        timeout = self.config.request_timeout_s if timeout_s is None else timeout_s
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(f"another request to the trainer workers was still running after {timeout} s")
        try:
            if self._closed:
                raise RuntimeError("this worker group is closed; register the model again")
            if self._failure is not None:
                raise DistributedWorkerError(
                    f"the trainer workers failed earlier; close the backend (await backend.close()) and register "
                    f"the model again to restart them. The failure was:\n{self._failure}"
                )
            reply = self._exchange(request, timeout)
        finally:
            self._lock.release()
        if isinstance(reply, ErrorReply):
            error = reply.error or DistributedWorkerError(reply.summary)
            error.add_note(f"raised by trainer worker rank 0:\n{reply.traceback}")
            raise error
        if not isinstance(reply, reply_type):
            raise ProtocolError(f"expected {reply_type.__name__} for {type(request).__name__}, got {reply!r}")
        return reply

    def _exchange(self, request: Request, timeout_s: float) -> object:
        """One request and its reply; any failure half-way leaves the stream unusable, so the group is failed."""
        deadline = time.monotonic() + timeout_s
        try:
            send_message(self._channel, request, timeout_s=timeout_s)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply within {timeout_s} s")
                if wait_readable(self._channel, min(_POLL_S, left)):
                    return recv_message(self._channel, timeout_s=max(left, 1.0))
                if self._process.poll() is not None:
                    raise self._fail("the torchrun launcher exited")
        except DistributedWorkerError:
            raise
        except (ChannelClosed, BrokenPipeError, ConnectionResetError) as error:
            raise self._fail(f"rank 0 closed the channel ({error})") from None
        except TimeoutError:
            self._stop_after(f"{type(request).__name__} timed out")
            raise TimeoutError(
                f"{type(request).__name__} got no reply from the trainer workers within {timeout_s} s; they were "
                f"stopped (raise DistributedConfig.request_timeout_s for longer steps; log: {self.log_path})"
            ) from None
        except BaseException as error:  # an unreadable reply, an interrupt: the stream is out of step
            self._stop_after(f"{type(error).__name__} during {type(request).__name__}")
            raise

    def _fail(self, why: str) -> DistributedWorkerError:
        """Wait for torchrun to stop every rank and turn its failure report into the error to raise."""
        wait_s = self.config.shutdown_timeout_s + 30
        try:
            self._process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            _stop(self._process, self.config.shutdown_timeout_s, self.workers)
        report_path = self._run_dir / "failure.json"
        if report_path.is_file():
            text = _format_failure(json.loads(report_path.read_text()), self.log_path)
        else:
            code = self._process.returncode
            text = f"{why}; the worker group exited with code {code} and no report. Log tail:\n{_tail(self.log_path)}"
        self._failure = DistributedWorkerError(text)
        return self._failure

    def _stop_after(self, why: str) -> None:
        _stop(self._process, self.config.shutdown_timeout_s, self.workers)
        self._failure = DistributedWorkerError(f"{why}; the workers were stopped (log: {self.log_path})")

    def close(self) -> None:
        """Ask the workers to exit (bounded), stop whatever is left, remove the socket directory. Idempotent."""
        grace = self.config.shutdown_timeout_s
        locked = self._lock.acquire(timeout=grace)  # a request still running is cut short below
        try:
            if self._closed:
                return
            self._closed = True
            try:
                if locked and self._failure is None and self._process.poll() is None:
                    send_message(self._channel, ShutdownRequest(), timeout_s=grace)
                    self._process.wait(timeout=grace + 30)
            except (OSError, TimeoutError, subprocess.TimeoutExpired):
                pass  # stopped below
            finally:
                self._channel.close()
                _stop(self._process, grace, self.workers)
                shutil.rmtree(self._run_dir, ignore_errors=True)
        finally:
            if locked:
                self._lock.release()


def _accept(
    listener: socket.socket,
    process: subprocess.Popen[bytes],
    token: str,
    timeout_s: float,
    run_dir: Path,
    log_path: Path,
) -> tuple[socket.socket, dict[str, Any]]:
    """Rank 0's connection and hello, watching the launcher; a wrong token is refused."""
    deadline = time.monotonic() + timeout_s
    listener.settimeout(_POLL_S)
    while time.monotonic() < deadline:
        try:
            channel, _ = listener.accept()
        except TimeoutError:
            if process.poll() is not None:
                report = run_dir / "failure.json"
                if report.is_file():
                    failure = _format_failure(json.loads(report.read_text()), log_path)
                    raise DistributedWorkerError(failure) from None
                raise DistributedWorkerError(
                    f"the trainer workers exited (code {process.returncode}) before connecting; log tail:\n"
                    f"{_tail(log_path)}"
                ) from None
            continue
        hello = recv_json(channel, timeout_s=max(1.0, deadline - time.monotonic()))
        if hmac.compare_digest(str(hello.get("token", "")).encode(), token.encode()):
            return channel, hello
        channel.close()  # not our worker: keep waiting for the real one
    raise TimeoutError(
        f"the trainer workers did not connect within {timeout_s} s (DistributedConfig.start_timeout_s); "
        f"log tail:\n{_tail(log_path)}"
    )


def _is_our_worker(pid: int) -> bool:
    try:
        return b"art_local.distributed.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes], grace_s: float, workers: list[tuple[str, int]]) -> None:
    """SIGTERM the launcher (its agent stops the workers), then SIGKILL it and any worker of ours left here."""
    steps: list[tuple[Callable[[], None], float]] = [
        (lambda: process.send_signal(signal.SIGTERM), grace_s + 5),
        (process.kill, 10.0),
    ]
    for send, wait_s in steps:
        if process.poll() is not None:
            break
        send()
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    here = socket.gethostname()
    for host, pid in workers:
        if host == here and _is_our_worker(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
