"""Errors the server answers with, in the OpenAI schema: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An error that becomes one JSON response; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# pydantic names the branch of a union in an error's location (``('stop', 'list[str]', 0)``); these are
# not field names, so they are left out of the path shown to the client.
def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "dict", "list", "none"}
                                      or "[" in part or part.startswith(("function-", "literal")))


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if _is_union_tag(part):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def from_validation_error(e: ValidationError) -> ApiError:
    """One 400 naming the first offending field (and a couple more when there are several)."""
    errors = e.errors(include_url=False)
    msgs: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for err in errors:
        path = _loc_path(tuple(err.get("loc", ()))) or "body"
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "extra_forbidden":
            msg = "is not a recognized field"
        else:
            msg = err.get("msg", "invalid value")
            inputs.setdefault(path, err.get("input"))
        if msg not in msgs.setdefault(path, []):
            msgs[path].append(msg)
    seen: dict[str, str] = {}
    for path, ms in msgs.items():
        text = " or ".join(m[0].lower() + m[1:] if i else m for i, m in enumerate(ms))
        seen[path] = f"'{path}' {text}" if path not in inputs else f"'{path}': {text} (got {_short(inputs[path])})"
    parts = list(seen.values())
    message = "; ".join(parts[:3]) + (f" (and {len(parts) - 3} more)" if len(parts) > 3 else "")
    param = next(iter(seen), None)
    return bad_request(f"Invalid request: {message}", param=param)
