"""Worker protocol: typed messages survive framing, however the socket splits them."""

from __future__ import annotations

import socket
import threading

import msgspec
import pytest
from medserve.accel.protocol import (
    Abort,
    Add,
    BlockingChannel,
    Delta,
    Outputs,
    Sampling,
    Shutdown,
    Turn,
    encode_frame,
    frame_length,
    from_worker_decoder,
    to_worker_decoder,
)


def test_messages_round_trip_with_their_types() -> None:
    add = Add(
        request_id="r1",
        sampling=Sampling(max_tokens=8, temperature=0.0, stop=("\n\n",)),
        messages=(Turn("user", "患者发热 🙂"),),
    )
    decoded = to_worker_decoder.decode(encode_frame(add)[4:])
    assert decoded == add and isinstance(decoded, Add)
    outputs = Outputs([Delta("r1", "肺炎", None, 12, 3), Delta("r2", "", "stop", 5, 9)])
    assert from_worker_decoder.decode(encode_frame(outputs)[4:]) == outputs


def test_a_malformed_message_is_rejected_not_guessed() -> None:
    bad = msgspec.msgpack.encode({"type": "Add", "request_id": 3})
    with pytest.raises(msgspec.ValidationError):
        to_worker_decoder.decode(bad)


def test_oversized_frame_header_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        frame_length((1 << 31).to_bytes(4, "big"))


def test_channel_reassembles_frames_split_at_every_byte() -> None:
    server, worker = socket.socketpair()
    channel = BlockingChannel(worker)
    messages = [Abort(f"r{i}") for i in range(50)] + [Shutdown()]
    wire = b"".join(encode_frame(m) for m in messages)

    def trickle() -> None:
        for i in range(len(wire)):
            server.sendall(wire[i : i + 1])

    sender = threading.Thread(target=trickle)
    sender.start()
    received: list[object] = []
    while len(received) < len(messages):
        received += channel.receive(1.0)
    sender.join()
    assert received == messages


def test_channel_times_out_empty_and_reports_a_closed_peer() -> None:
    server, worker = socket.socketpair()
    channel = BlockingChannel(worker)
    assert channel.receive(0.01) == []
    server.close()
    with pytest.raises(EOFError):
        channel.receive(1.0)
