"""TEST FIXTURE: ``art serverless serve`` with the toy backend registered in-process (subprocess launcher)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverless_toy_backend import ToyPlugin

from art_core.plugins import register_plugin
from art_serverless.cli import main

register_plugin(ToyPlugin, name="serverless-toy-fixture")
main(sys.argv[1:])
