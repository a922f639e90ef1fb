"""``art serverless serve``: self-host the serverless-RL API (contributed to the ``art`` CLI by this plugin).

Only click is imported here; the server (fastapi, uvicorn, the backend) loads when the command runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

API_KEY_ENV = "ART_SERVERLESS_API_KEY"


def parse_backend_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs → constructor keywords; values are JSON when they parse as JSON, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(
                f"{pair!r} is not KEY=VALUE (e.g. device=cpu)", param_hint="--backend-option"
            )
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


@click.group("serverless")
def serverless() -> None:
    """The serverless-RL API: self-host a server that ServerlessBackend can train through."""


@serverless.command("serve")
@click.option("--backend", default="local", show_default=True, help="Installed backend that runs the jobs.")
@click.option(
    "--backend-option",
    "backend_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Backend constructor argument (repeatable).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to bind; anything but loopback exposes the server.",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port (0 picks a free one).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"File holding the API key (created with a random key if missing). Default: ${API_KEY_ENV}, else DATA_DIR/api_key.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".art/serverless"),
    show_default=True,
    help="Where models, jobs, events and checkpoints persist.",
)
@click.option(
    "--entity", default="local", show_default=True, help="Entity given to models registered without one."
)
@click.option(
    "--max-body-mb",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body accepted.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve_command(
    backend: str,
    backend_option: tuple[str, ...],
    host: str,
    port: int,
    api_key_file: Path | None,
    data_dir: Path,
    entity: str,
    max_body_mb: int,
    log_level: str,
) -> None:
    """Serve the serverless-RL API, running training jobs on an installed backend (local by default)."""
    import logging

    from art_serverless.server.app import ServerConfig
    from art_serverless.server.serve import read_or_create_api_key, serve

    options = parse_backend_options(backend_option)
    if api_key_file is None and os.environ.get(API_KEY_ENV):
        api_key = os.environ[API_KEY_ENV]
        source = f"${API_KEY_ENV}"
    else:
        key_path = api_key_file or data_dir / "api_key"
        try:
            api_key = read_or_create_api_key(key_path)
        except (OSError, ValueError) as error:
            raise click.ClickException(str(error)) from error
        source = str(key_path)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(
            data_dir=data_dir,
            api_key=api_key,
            backend=backend,
            backend_options=options,
            default_entity=entity,
            max_body_bytes=max_body_mb * 2**20,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"art serverless: API key from {source}", err=True)
    serve(config, host=host, port=port, log_level=log_level)


def main(argv: list[str] | None = None) -> None:
    """``python -m art_serverless.server``: the same command without the ``art`` launcher."""
    serverless.main(args=argv, prog_name="art serverless")
