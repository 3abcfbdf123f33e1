"""What a web browser beside the server may do: the Host check (DNS rebinding), the Origin check, and CORS."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smolrun.errors import PermissionDenied

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
ANY = "*"
_METHODS = "GET, POST, DELETE, OPTIONS"


def host_name(value: str) -> str | None:
    """The host part of a Host header or an --allowed-hosts entry, lowercase, IPv6 in brackets, without its
    port or a final dot; None when it is no host name at all."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return value[: end + 1]
    if value.count(":") > 1:  # a bare IPv6 address (only an --allowed-hosts entry may be written so)
        try:
            return f"[{ipaddress.IPv6Address(value)}]"
        except ValueError:
            return None
    name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()) or any(c in name for c in "/@ "):
        return None
    return name.rstrip(".") or None


def is_loopback(bind: str) -> bool:
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def origin_key(origin: str) -> str:
    """An origin as compared: scheme and host lowercase, no trailing slash."""
    return origin.strip().rstrip("/").lower()


@dataclass(frozen=True)
class BrowserPolicy:
    """Which Host headers and Origins the server answers. `hosts` None: any Host (the check is off)."""

    hosts: frozenset[str] | None
    origins: frozenset[str]  # besides the server's own; ANY allows every origin

    @classmethod
    def build(cls, bind: str, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]) -> BrowserPolicy:
        """Bound to loopback, the loopback names and `allowed_hosts`; bound elsewhere, `allowed_hosts` (and the
        loopback names) when given, else any Host. `*` among them turns the check off."""
        hosts: frozenset[str] | None
        if ANY in allowed_hosts or (not allowed_hosts and not is_loopback(bind)):
            hosts = None
        else:
            names = {host_name(h) for h in allowed_hosts}
            hosts = LOOPBACK_NAMES | {n for n in names if n is not None}
        return cls(hosts, frozenset(ANY if o.strip() == ANY else origin_key(o) for o in allowed_origins))

    def host_allowed(self, host: str | None) -> bool:
        if self.hosts is None or host is None:  # no Host at all: HTTP/1.0, never a browser
            return True
        return host_name(host) in self.hosts

    def origin_allowed(self, origin: str) -> bool:
        return ANY in self.origins or origin_key(origin) in self.origins


def same_origin(origin: str, host: str | None) -> bool:
    """Whether `origin` is the server's own (the playground): its host and port are the request's Host. The
    scheme is not compared, so that the playground works behind a proxy that ends TLS."""
    _, sep, authority = origin.partition("://")
    return bool(sep) and host is not None and authority.rstrip("/").lower() == host.strip().lower()


class BrowserGuard:
    """Refuse, before anything is read or written, what a page on another site could send: a foreign Host (a
    DNS name rebound to this machine), an Origin that is neither ours nor allowed, a cross-site request without
    one; answer CORS for the allowed origins. Requests with neither header (curl, the SDKs) pass unchanged."""

    def __init__(self, app: ASGIApp, policy: BrowserPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not self.policy.host_allowed(host):
            await self._refuse(scope, receive, send, f"the Host header {host!r} is not one this server answers "
                               "(DNS rebinding). Start smolrun with --allowed-hosts NAME to allow it, or "
                               "--allowed-hosts '*' to turn the check off", "host_not_allowed")
            return
        origin = headers.get("origin")
        if origin is None:
            if headers.get("sec-fetch-site") == "cross-site" and not _navigation(scope, headers):
                await self._refuse(scope, receive, send, "cross-site requests are refused. Start smolrun with "
                                   "--allowed-origins ORIGIN to allow a web app's origin", "origin_not_allowed")
                return
            await self.app(scope, receive, send)
            return
        if same_origin(origin, host):
            await self.app(scope, receive, send)
            return
        if not self.policy.origin_allowed(origin):
            await self._refuse(scope, receive, send, f"the origin {origin!r} is not allowed. Start smolrun with "
                               f"--allowed-origins {origin} to allow it", "origin_not_allowed")
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await _preflight(origin, headers)(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = origin
                out["Access-Control-Expose-Headers"] = "*"
                out.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, with_cors)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str, code: str) -> None:
        error = PermissionDenied(message, code=code)
        await JSONResponse(error.to_dict(), status_code=error.status)(scope, receive, send)


def _navigation(scope: Scope, headers: Headers) -> bool:
    """A top-level page load from a link on another site: the page that linked cannot read the answer, and
    GET changes nothing here."""
    return scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"


def _preflight(origin: str, headers: Headers) -> Response:
    return Response(status_code=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": _METHODS,
        # Whatever the page asks to send: the bearer key, content types, an SDK's own headers.
        "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "authorization"),
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    })
