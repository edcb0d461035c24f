"""Small pieces of the HTTP edge that run on every request: the decision id, the JSON answer and
the body reader (its size refusal and its chunked read)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from starlette.requests import ClientDisconnect, Request

from sigserve.api import lean
from sigserve.api.responses import JSONBytes, dumps
from sigserve.api.routes import decision_id


def test_decision_ids_are_distinct_version_4_uuids() -> None:
    seen = set()
    for _ in range(5000):
        text = decision_id()
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
        seen.add(text)
    assert len(seen) == 5000


async def test_json_bytes_sends_its_head_and_body() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    body = dumps({"action": "BUY", "confidence": 0.75})
    await JSONBytes(body, 409)({"type": "http"}, None, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 409
    assert dict(sent[0]["headers"]) == {b"content-length": str(len(body)).encode(),
                                        b"content-type": b"application/json"}
    assert orjson.loads(sent[1]["body"]) == {"action": "BUY", "confidence": 0.75}


def _request(messages: list[dict[str, Any]], length: int | None = None) -> Request:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


async def test_read_body_joins_chunks_and_leaves_the_body_on_the_request() -> None:
    request = _request([{"type": "http.request", "body": b'{"a":', "more_body": True},
                        {"type": "http.request", "body": b' 1}', "more_body": False}])
    assert await lean.read_body(request) == b'{"a": 1}'
    assert await request.body() == b'{"a": 1}'  # starlette's own reader sees the same bytes


async def test_read_body_refuses_what_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "MAX_BODY_BYTES", 8)
    with pytest.raises(lean.BodyTooLarge) as declared:  # by the declared length, nothing read
        await lean.read_body(_request([], length=9))
    assert declared.value.http_status == 413 and declared.value.details["bytes"] == 9
    with pytest.raises(lean.BodyTooLarge):  # by what arrives, in chunks, without a length
        await lean.read_body(_request([{"type": "http.request", "body": b"12345", "more_body": True},
                                       {"type": "http.request", "body": b"6789", "more_body": False}]))
    with pytest.raises(lean.BodyTooLarge):  # one message
        await lean.read_body(_request([{"type": "http.request", "body": b"123456789"}]))
    assert await lean.read_body(_request([{"type": "http.request", "body": b"12345678"}])) == b"12345678"


async def test_read_body_raises_on_a_disconnect() -> None:
    with pytest.raises(ClientDisconnect):
        await lean.read_body(_request([{"type": "http.disconnect"}]))
