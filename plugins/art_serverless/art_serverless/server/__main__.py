"""``python -m art_serverless.server serve ...`` (same as ``art serverless serve ...``)."""

from art_serverless.cli import main

main()
