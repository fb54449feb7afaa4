from __future__ import annotations

import pytest

from harness import jspeer


@pytest.fixture
async def js(world, request):
    """Fresh matrix-js-sdk (Rust crypto) users: Element's engine, headless in Node."""
    problem = jspeer.available()
    if problem:
        pytest.skip(problem)
    peers = []

    async def make(name: str) -> jspeer.JsPeer:
        peer = await jspeer.JsPeer(world.synapse, f"{name}-{request.node.name[-8:]}").start()
        peers.append(peer)
        return peer

    yield make
    failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
    for peer in peers:
        await peer.stop()
        if failed:
            print(f"--- js peer {peer.user_id}\n" + "\n".join(peer.stderr[-300:]))
