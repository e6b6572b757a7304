"""The fault suite's own LLM endpoint (``ArmServer``) reports only what it measures: a client
that drops its connection, as a killed service does, is a debug line, not a traceback."""

from __future__ import annotations

import logging
import socket
import struct

import pytest

from tests.faults.harness import ArmServer, wait_until

pytestmark = pytest.mark.faults


def test_a_connection_reset_by_the_client_is_logged_at_debug_level(capfd, caplog) -> None:
    server = ArmServer(truth={}, accuracy={"a": 0.5}).start()
    try:
        with caplog.at_level(logging.DEBUG, logger="tests.faults.harness"):
            client = socket.create_connection(("127.0.0.1", server.port))
            client.sendall(b"POST /a/v1/chat/completions HTT")  # the server waits for the rest
            # closing with a zero linger time resets the connection, as a killed process's does
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            wait_until(
                lambda: any("dropped its connection" in r.getMessage() for r in caplog.records),
                timeout=10,
                message="the reset to be logged",
                interval=0.02,
            )
        (record,) = [r for r in caplog.records if "dropped its connection" in r.getMessage()]
        assert record.levelno == logging.DEBUG and "reset" in record.getMessage().lower()
    finally:
        server.kill()
    # what socketserver prints above the traceback of an error it is left to handle
    assert "Exception occurred during processing of request" not in capfd.readouterr().err
