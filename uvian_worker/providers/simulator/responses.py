"""The JSON bodies and errors both protocols answer with, in OpenAI's error shape."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

JSON_TYPE = "application/json"


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise bad_request("the body is not JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def json_response(
    payload: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, headers=headers, content_type=JSON_TYPE
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json_response(
        {"error": {"message": message, "type": kind, "code": code}}, status, headers
    )


def bad_request(message: str) -> web.HTTPBadRequest:
    error = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return web.HTTPBadRequest(text=orjson.dumps(error).decode(), content_type=JSON_TYPE)


def abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()
