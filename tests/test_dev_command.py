"""`streamledger dev` (what `make dev` runs) refuses to start beside a running copy."""

from __future__ import annotations

import socket

from click.testing import CliRunner

from streamledger.process_cli import dev


def test_dev_says_which_port_is_taken_instead_of_starting(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        monkeypatch.setenv("STREAMLEDGER_GATEWAY_PORT", str(port))
        # An unreachable broker: the check must come before anything tries to use it.
        monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        result = CliRunner().invoke(dev, [])
    assert result.exit_code == 1
    assert f"port {port} (the gateway's, STREAMLEDGER_GATEWAY_PORT) already in use" in result.output
    assert "Traceback" not in result.output
