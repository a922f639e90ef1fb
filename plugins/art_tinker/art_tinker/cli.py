"""``art tinker serve``: run the loopback Tinker-API server."""

from __future__ import annotations

from pathlib import Path

import click


@click.group(name="tinker")
def tinker_group() -> None:
    """Tinker: the loopback Tinker-API server (TinkerBackend needs no command)."""


@tinker_group.command(name="serve")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind (loopback by default)."
)
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port."
)
@click.option(
    "--api-key",
    envvar="ART_TINKER_API_KEY",
    default=None,
    help="Key clients must send (X-API-Key); must start with 'tml-'. Default: $ART_TINKER_API_KEY or a random one.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".art") / "tinker_server",
    show_default=True,
    help="Directory for checkpoints (survives restarts).",
)
@click.option(
    "--device",
    default=None,
    help="torch device for training and sampling (default: cuda if present, else cpu).",
)
@click.option("--log-level", default="warning", show_default=True)
def serve_command(
    host: str, port: int, api_key: str | None, root: Path, device: str | None, log_level: str
) -> None:
    """Serve the Tinker API subset the tinker SDK needs, trained by art-local. Point the SDK at it with
    TINKER_BASE_URL=http://HOST:PORT and TINKER_API_KEY=<key>."""
    from art_tinker.server.serve import ServerConfig, default_api_key, serve

    generated = False
    if api_key is None:
        api_key, generated = default_api_key()
    if not api_key.startswith("tml-"):
        raise click.BadParameter(
            "the key must start with 'tml-' (the tinker SDK refuses other keys)", param_hint="--api-key"
        )
    if generated:
        click.echo(f"generated API key (set TINKER_API_KEY to it): {api_key}")
    serve(ServerConfig(host=host, port=port, api_key=api_key, root=root, device=device), log_level=log_level)


def main() -> None:
    """``python -m art_tinker.cli serve ...`` (the same command without the ``art`` CLI)."""
    tinker_group()


if __name__ == "__main__":
    main()
