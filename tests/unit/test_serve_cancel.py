"""serve: POST /v1/batches/{id}/cancel right after the batch was created waits for its task to register it, on
an event: however long that takes (it hashes the input first), never a poll that gives up (review defect 9:
500 x 10 ms, then a 409 "it never started" for a batch that was about to start).

In process, on the virtual clock: a poll's sleeps would pass at once. The input is a FIFO, so the batch's
task registers it only when the test feeds it."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest
from aiohttp import ClientTimeout, FormData
from aiohttp.test_utils import TestClient, TestServer

from hfbatch.serve.app import BatchServer, ServeOptions
from hfbatch.testing.clock import run_virtual

LINES = b"".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}).encode()
                 + b"\n" for i in range(3))


def feed_once(fifo: Path) -> None:
    """Give the batch's task its input through the FIFO, leaving a plain file with the same content at that path
    for the run's later reads (the scan)."""
    with open(fifo, "wb") as w:  # returns once the task has opened the FIFO for reading
        w.write(LINES)
        tmp = fifo.with_name(fifo.name + ".tmp")
        tmp.write_bytes(LINES)
        os.replace(tmp, fifo)
    # closing the writer ends the task's read: it hashes what it got and registers the batch


def test_cancel_right_after_create_waits_for_the_registration(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HFBATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HFBATCH_ROUTER_URL", "http://127.0.0.1:9")  # nothing is sent: the batch is cancelled
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    async def main() -> None:
        server = BatchServer(ServeOptions(), "hf_test", 1 << 20)
        feeder: threading.Thread | None = None
        stored: Path | None = None
        client = TestClient(TestServer(server.app()), timeout=ClientTimeout(total=None))  # virtual time flies
        await client.start_server()
        try:
            form = FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", LINES, filename="in.jsonl")
            r = await client.post("/v1/files", data=form, headers={"Authorization": "Bearer hf_test"})
            assert r.status == 200, await r.text()
            fid = (await r.json())["id"]
            stored = server.store.data_path(fid)
            stored.unlink()
            os.mkfifo(stored, 0o600)

            r = await client.post("/v1/batches", json={"input_file_id": fid, "endpoint": "/v1/chat/completions",
                                                       "completion_window": "24h"},
                                  headers={"Authorization": "Bearer hf_test"})
            assert r.status == 200, await r.text()
            bid = (await r.json())["id"]
            cancel = asyncio.ensure_future(client.post(f"/v1/batches/{bid}/cancel",
                                                       headers={"Authorization": "Bearer hf_test"}))
            for _ in range(600):  # a minute of virtual time (a poll would have given up), in steps: real I/O goes on
                await asyncio.sleep(0.1)
            assert not cancel.done(), f"the cancel did not wait: {(await (await cancel).json())}"

            feeder = threading.Thread(target=feed_once, args=(stored,), daemon=True)
            feeder.start()
            answer = await cancel
            feeder.join(10)
            body = await answer.json()
            assert answer.status == 200, body
            assert body["status"] in ("cancelling", "cancelled"), body
            for _ in range(100):  # the run closes every request out as cancelled
                batch = await (await client.get(f"/v1/batches/{bid}",
                                                headers={"Authorization": "Bearer hf_test"})).json()
                if batch["status"] == "cancelled":
                    break
                await asyncio.sleep(1)
            assert batch["status"] == "cancelled", batch
        finally:
            if feeder is None and stored is not None:  # failed before: the task may still wait for its input
                threading.Thread(target=feed_once, args=(stored,), daemon=True).start()
            server.shutdown.set()
            if server.tasks:
                await asyncio.wait(list(server.tasks.values()), timeout=30)
            await client.close()

    run_virtual(main())
