"""Loaded by every Python child process whose PYTHONPATH includes tests/netguard."""

import os

if os.environ.get("NETGUARD_LOG"):
    import netguard

    netguard.install()
