"""A fault-injecting HTTP proxy between the bot and Synapse, on loopback.

Tests point the bot's homeserver URL at it to count calls, hold a call in flight (to kill the bot
in the middle of a push), or fail calls (to exercise retries).
"""

from __future__ import annotations

import asyncio
import json
import re

from aiohttp import ClientSession, ClientTimeout, web

from .synapse import free_port

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class Rule:
    def __init__(self, pattern: str, method: str | None) -> None:
        self.regex = re.compile(pattern)
        self.method = method

    def matches(self, request: web.Request) -> bool:
        return (self.method is None or request.method == self.method) and bool(
            self.regex.search(request.path)
        )


class Hold(Rule):
    """Let ``after`` matching calls through, then hold the rest until released."""

    def __init__(self, pattern: str, method: str | None, after: int) -> None:
        super().__init__(pattern, method)
        self.after = after
        self.seen = 0
        self.holding = asyncio.Event()
        self.released = asyncio.Event()
        self.dropped = asyncio.Event()  # a held caller went away; its call never went through


class Fail(Rule):
    """Answer ``times`` matching calls with ``status`` instead of forwarding them."""

    def __init__(self, pattern: str, method: str | None, status: int, times: int) -> None:
        super().__init__(pattern, method)
        self.status = status
        self.times = times


class Rewrite(Rule):
    """Pass matching calls through, then change the JSON answer with ``fn``."""

    def __init__(self, pattern: str, method: str | None, fn) -> None:
        super().__init__(pattern, method)
        self.fn = fn


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rules: list[Rule] = []
        self.calls: list[tuple[str, str]] = []  # (method, path) of every forwarded call
        self._runner: web.AppRunner | None = None
        self._http: ClientSession | None = None

    async def start(self) -> FaultProxy:
        self._http = ClientSession(timeout=ClientTimeout(total=None))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def close(self) -> None:
        for rule in self.rules:
            if isinstance(rule, Hold):
                rule.released.set()
        if self._runner:
            await self._runner.cleanup()
        if self._http:
            await self._http.close()

    def hold(self, pattern: str, after: int = 0, method: str | None = "PUT") -> Hold:
        rule = Hold(pattern, method, after)
        self.rules.append(rule)
        return rule

    def fail(self, pattern: str, status: int = 502, times: int = 1, method: str | None = None):
        rule = Fail(pattern, method, status, times)
        self.rules.append(rule)
        return rule

    def rewrite(self, pattern: str, fn, method: str | None = "GET") -> Rewrite:
        rule = Rewrite(pattern, method, fn)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        for rule in self.rules:
            if isinstance(rule, Hold):
                rule.released.set()
        self.rules = []

    def count(self, pattern: str, method: str | None = "PUT") -> int:
        regex = re.compile(pattern)
        return sum(1 for m, p in self.calls if (method is None or m == method) and regex.search(p))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        for rule in list(self.rules):
            if not rule.matches(request):
                continue
            if isinstance(rule, Fail) and rule.times > 0:
                rule.times -= 1
                return web.json_response(
                    {"errcode": "M_UNKNOWN", "error": "injected fault"}, status=rule.status
                )
            if isinstance(rule, Hold):
                rule.seen += 1
                if rule.seen > rule.after:
                    rule.holding.set()
                    # If the client goes away while held, aiohttp cancels this handler and
                    # the call never reaches Synapse.
                    try:
                        await rule.released.wait()
                    except asyncio.CancelledError:
                        rule.dropped.set()
                        raise
                    if request.transport is None or request.transport.is_closing():
                        rule.dropped.set()
                        return web.Response(status=499)
        rewrite = next(
            (r for r in self.rules if isinstance(r, Rewrite) and r.matches(request)), None
        )
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        assert self._http is not None
        async with self._http.request(
            request.method,
            f"{self.upstream}{request.rel_url}",
            data=body,
            headers=headers,
        ) as upstream:
            payload = await upstream.read()
            self.calls.append((request.method, request.path))
            if rewrite is not None and upstream.status == 200:
                payload = json.dumps(rewrite.fn(json.loads(payload))).encode()
            out_headers = {
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS
            }
            out_headers.pop("Content-Encoding", None)
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
