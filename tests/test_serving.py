"""The serving helpers every shipped server uses: the listening socket, and the keep-alive check the soaks run."""

from __future__ import annotations

import asyncio
import socket

import pytest

from art_core.plugin_api import bind_socket, is_loopback, url_host
from art_core.testing.load import check_keep_alive


async def test_accepted_connections_have_nagle_off() -> None:
    """Keep-alive responses must not wait for delayed ACKs: asyncio sets TCP_NODELAY only for TCP-proto sockets."""
    flags: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted = transport.get_extra_info("socket")
            flags.append(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    listening = bind_socket("127.0.0.1", 0)
    server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
    _, writer = await asyncio.open_connection("127.0.0.1", listening.getsockname()[1])
    for _ in range(200):
        if flags:
            break
        await asyncio.sleep(0.01)
    writer.close()
    server.close()
    await server.wait_closed()
    assert flags == [1]


def test_a_taken_port_names_itself_and_the_fix() -> None:
    taken = bind_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}.*0 picks a free one"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()


def test_loopback_and_url_hosts() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    assert url_host("::1") == "[::1]" and url_host("127.0.0.1") == "127.0.0.1"


async def _models_server(*, close_after_first: bool) -> tuple[asyncio.Server, str]:
    """A minimal HTTP/1.1 server answering GET /v1/models; optionally closing each connection after one answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"Authorization: Bearer key" in head
                body = b'{"object": "list", "data": []}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                if close_after_first:
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, sock=bind_socket("127.0.0.1", 0))
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def test_keep_alive_check_passes_when_the_connection_survives_the_idle_time() -> None:
    server, url = await _models_server(close_after_first=False)
    async with server:
        await check_keep_alive(url, "key", idle_s=0.2)


async def test_keep_alive_check_fails_when_the_server_closes_idle_connections() -> None:
    server, url = await _models_server(close_after_first=True)
    async with server:
        with pytest.raises(AssertionError, match="closed an idle keep-alive connection.*timeout_keep_alive"):
            await check_keep_alive(url, "key", idle_s=0.2)
