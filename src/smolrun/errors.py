"""The one error tree of smolrun; each class knows its HTTP status and OpenAI error type.

    SmolrunError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── SchemaError               400 (code invalid_json_schema): a schema we cannot guarantee
    │   └── ContextLengthExceeded     400 (code context_length_exceeded)
    ├── AuthenticationFailed          401 invalid_request_error (code invalid_api_key)
    ├── PermissionDenied              403 invalid_request_error: a Host or Origin a browser page may not use
    ├── NotFound                      404 invalid_request_error
    │   └── ModelNotFound             404 (code model_not_found): no such model name
    │   └── PayloadTooLarge           413 (code file_too_large)
    ├── ModelUnavailable              503 server_error: known model, weights not on this machine
    ├── SandboxUnavailable            503 server_error: no sandbox here, so no code execution
    ├── EngineUnavailable             503 server_error: no server of a remote engine (vLLM) answers
    ├── ServerShuttingDown            503 server_error: the engine closed before the request was finished
    ├── StorageFull                   507 server_error (code insufficient_storage): the data directory's disk
    ├── QueueFull                     429 rate_limit_error
    ├── BackendMissing                500 server_error: an optional extra is not installed
    └── GenerationFailed              500 server_error: the grammar matcher failed mid-generation

The CLI prints `message` on one line and exits with `exit_code`.
"""

from __future__ import annotations

import logging


class SmolrunError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    exit_code: int = 1

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(SmolrunError):
    status = 400
    type = "invalid_request_error"
    exit_code = 2


class SchemaError(InvalidRequest):
    code = "invalid_json_schema"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "file_too_large"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(SmolrunError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(SmolrunError):
    status = 403
    type = "invalid_request_error"


class NotFound(SmolrunError):
    status = 404
    type = "invalid_request_error"
    exit_code = 2


class ModelNotFound(NotFound):
    code = "model_not_found"


class ModelUnavailable(SmolrunError):
    status = 503
    exit_code = 2


class SandboxUnavailable(SmolrunError):
    """Code is never run unsandboxed instead."""

    status = 503
    exit_code = 2


class EngineUnavailable(SmolrunError):
    status = 503
    exit_code = 2


class ServerShuttingDown(SmolrunError):
    """Every live and queued request hears this when its engine closes, rather than waiting for ever."""

    status = 503


SHUTTING_DOWN = "the server is shutting down: the request was not finished"


class StorageFull(SmolrunError):
    """Nothing half-written stays behind, and deletes still work, so space can be freed through the API."""

    status = 507
    code = "insufficient_storage"


class QueueFull(SmolrunError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class BackendMissing(SmolrunError):
    exit_code = 2


class GenerationFailed(SmolrunError):
    pass


def first_line(exc: BaseException) -> str:
    """A foreign exception's message as one line for ours: its first line, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def client_error(exc: Exception, where: str) -> SmolrunError:
    """What a client hears of an exception (as a 500 before a response starts, as an event in a stream): ours
    as it is; any other, a bug, as an internal error, its traceback logged here with `where` it happened."""
    if isinstance(exc, SmolrunError):
        return exc
    logging.getLogger("smolrun").error("unexpected error %s", where, exc_info=exc)
    return SmolrunError(f"internal error: {type(exc).__name__}")
