"""Loaded automatically by Python in test subprocesses whose PYTHONPATH holds this folder."""

import loopback_only

loopback_only.install()
