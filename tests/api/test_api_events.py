"""Live progress: the Server-Sent Event streams, over real HTTP, driven by the emulator's watch streams."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from kt_api import JOB, MakeStack, Stack
from kt_sse import Stream, sse

NS_EVENTS = "/v1/namespaces/team-a/events"
JOB_EVENTS = "/v1/namespaces/team-a/finetunejobs/support-bot/events"
FTJ_KEY = ("kubetune.io", "v1alpha1", "finetunejobs")


async def put_job(stack: Stack, name: str = "support-bot") -> None:
    await stack.kube.put_object("finetunejobs", {**JOB, "metadata": {"name": name, "namespace": "team-a"}})


async def set_phase(stack: Stack, phase: str, name: str = "support-bot", **status: Any) -> None:
    await stack.kube.patch_object("finetunejobs", "team-a", name, {"status": {"phase": phase, **status}})


async def phases(stream: Stream, count: int) -> list[tuple[str, str | None]]:
    seen = []
    for _ in range(count):
        frame = await stream.message()
        assert frame.event == "job", frame
        seen.append((frame.data["type"], frame.data["summary"]["phase"]))
    return seen


OOM_EVENT = {  # what kopf.event posts for a transition
    "metadata": {"name": "support-bot.1", "namespace": "team-a"}, "type": "Warning",
    "reason": "OutOfMemoryEscalated", "message": "attempt 1 on L4 ran out of GPU memory", "count": 1,
    "lastTimestamp": "2026-12-03T15:00:00Z",
    "involvedObject": {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "support-bot",
                       "namespace": "team-a"}}


def watch_requests(stack: Stack, plural: str = "finetunejobs") -> list[Any]:
    return [r for r in stack.kube if f"/{plural}" in str(r.url.path) and r.params.get("watch") == "true"]


async def test_snapshot_then_each_transition_and_the_kubernetes_events(stack: Stack) -> None:
    await put_job(stack)
    async with sse(stack.client, NS_EVENTS) as stream:
        first = await stream.message()
        assert first.event == "snapshot" and first.id
        [item] = first.data["items"]
        assert item["type"] == "ADDED" and item["summary"]["name"] == "support-bot"
        assert item["resource"]["spec"]["model"]["name"] == JOB["spec"]["model"]["name"]

        await set_phase(stack, "Running", step="10/100", loss="2.100")
        frame = await stream.message()
        assert frame.event == "job" and frame.data["type"] == "MODIFIED"
        assert frame.data["summary"] == {**frame.data["summary"], "phase": "Running", "step": "10/100",
                                         "loss": "2.100"}
        assert frame.data["resource"]["status"]["phase"] == "Running"

        await stack.kube.put_object("events", dict(OOM_EVENT))
        await stack.kube.put_object("events", {"metadata": {"name": "pod.1", "namespace": "team-a"},
                                               "type": "Normal", "reason": "Pulled", "message": "not ours",
                                               "involvedObject": {"kind": "Pod", "name": "x"}})
        await put_job(stack, "second")
        got = {f.event: f for f in (await stream.message(), await stream.message())}  # two watches: any order
        kevent, added = got["kevent"], got["job"]
        assert (kevent.event, kevent.data) == ("kevent", {
            "name": "support-bot", "type": "Warning", "reason": "OutOfMemoryEscalated",
            "message": "attempt 1 on L4 ran out of GPU memory", "time": "2026-12-03T15:00:00Z", "count": 1})
        assert (added.event, added.data["type"], added.data["summary"]["name"]) == ("job", "ADDED", "second")
        ids = [first.id, frame.id, kevent.id, added.id]
        assert len({i.split(".")[0] for i in ids}) == 1 and len(set(ids)) == 4

        await stack.kube.remove_object("finetunejobs", "team-a", "second")
        gone = await stream.message()
        assert (gone.data["type"], gone.data["summary"]["name"]) == ("DELETED", "second")


async def test_an_event_the_first_events_list_missed_still_reaches_the_stream(stack: Stack) -> None:
    """The Events list failed as the stream started: what a later list finds is news, not silent state."""
    await put_job(stack)
    await stack.kube.put_object("events", dict(OOM_EVENT))
    stack.kube.inject("GET", "events", 500, times=1)
    async with sse(stack.client, NS_EVENTS) as stream:
        first = await stream.message()
        assert first.event == "snapshot"
        seen = first.data["kevents"] or [(await stream.message()).data]
        assert [(e["name"], e["reason"]) for e in seen] == [("support-bot", "OutOfMemoryEscalated")]


async def test_an_identity_that_may_not_read_events_still_gets_its_jobs_at_once(stack: Stack) -> None:
    stack.kube.rules[:] = [r for r in stack.kube.rules if r.resource != "events"]
    await put_job(stack)
    started = asyncio.get_running_loop().time()
    async with sse(stack.client, NS_EVENTS) as stream:
        first = await stream.message()
        assert first.event == "snapshot" and first.data["kevents"] == []
        assert [i["summary"]["name"] for i in first.data["items"]] == ["support-bot"]
        assert asyncio.get_running_loop().time() - started < 10  # not after the 30 s pause of the Events watch
        await set_phase(stack, "Running")
        assert await phases(stream, 1) == [("MODIFIED", "Running")]
    assert ("alice", "list", "events", "team-a") in stack.kube.denied


async def test_reconnect_with_last_event_id_loses_no_transition(stack: Stack) -> None:
    await put_job(stack)
    async with sse(stack.client, JOB_EVENTS) as stream:
        snapshot = await stream.message()
        assert [i["summary"]["name"] for i in snapshot.data["items"]] == ["support-bot"]
        await set_phase(stack, "Queued")
        seen = await stream.message()
        last_id = seen.id
    # the browser is gone (a tab asleep, a flaky network) while the job moves on
    missed = ["Running", "Suspended", "Queued", "Running", "Succeeded"]
    for phase in missed:
        await set_phase(stack, phase)
    await put_job(stack, "other")  # another job's messages are not this stream's
    async with sse(stack.client, JOB_EVENTS, {"Last-Event-ID": str(last_id)}) as resumed:
        assert await phases(resumed, len(missed)) == [("MODIFIED", p) for p in missed]
        await set_phase(stack, "Succeeded", adapterUri="s3://adapters/support-bot/adapter/")
        live = await resumed.message()
        assert live.data["summary"]["adapterUri"] == "s3://adapters/support-bot/adapter/", live

    # an id this feed never gave (another replica, a restart) or one past the buffer: a fresh snapshot first
    for stale in ("0badc0de.3", "not-an-id"):
        async with sse(stack.client, JOB_EVENTS, {"Last-Event-ID": stale}) as fresh:
            first = await fresh.message()
            assert first.event == "snapshot"
            assert first.data["items"][0]["summary"]["phase"] == "Succeeded"


async def test_a_replay_buffer_too_short_for_the_gap_sends_a_snapshot(make_stack: MakeStack) -> None:
    async with make_stack(sse_replay=3) as stack:
        await put_job(stack)
        async with sse(stack.client, NS_EVENTS) as stream:
            last_id = (await stream.message()).id
        async with sse(stack.client, NS_EVENTS) as witness:  # stays on: once it has all 5, so has the buffer
            await witness.message()
            for step in range(5):
                await set_phase(stack, "Running", step=f"{step}/5")
            await phases(witness, 5)
        async with sse(stack.client, NS_EVENTS, {"Last-Event-ID": str(last_id)}) as resumed:
            first = await resumed.message()
            assert first.event == "snapshot"
            assert first.data["items"][0]["summary"]["step"] == "4/5"


async def test_every_listener_of_a_namespace_shares_one_watch(stack: Stack) -> None:
    await put_job(stack)
    async with sse(stack.client, NS_EVENTS) as a, sse(stack.client, NS_EVENTS) as b, \
            sse(stack.client, JOB_EVENTS) as c, sse(stack.client, JOB_EVENTS) as d:
        for stream in (a, b, c, d):
            assert (await stream.message()).event == "snapshot"
        assert len(watch_requests(stack)) == 1
        assert len(stack.kube.watchers[FTJ_KEY]) == 1
        await set_phase(stack, "Running")
        for stream in (a, b, c, d):
            assert await phases(stream, 1) == [("MODIFIED", "Running")]

        # the API server drops the watch: it lists again, watches again, and nobody misses a transition
        await stack.kube.close_watches()
        await set_phase(stack, "Succeeded")
        for stream in (a, b, c, d):
            assert await phases(stream, 1) == [("MODIFIED", "Succeeded")]
        assert len(watch_requests(stack)) == 2 and len(stack.kube.watchers[FTJ_KEY]) == 1


async def test_heartbeats_keep_an_idle_stream_open_and_a_revoked_binding_ends_it(make_stack: MakeStack) -> None:
    async with make_stack(sse_heartbeat=0.2, review_ttl=0) as stack, sse(stack.client, NS_EVENTS) as stream:
        assert (await stream.next()).event == "snapshot"
        assert (await stream.next(timeout=2)).comment == "ping"
        assert (await stream.next(timeout=2)).comment == "ping"
        stack.kube.rules[:] = [r for r in stack.kube.rules if r.subject != "team-a-devs"]  # the RoleBinding goes
        closed = await stream.next(timeout=2)
        assert closed.comment is not None and closed.comment.startswith("closed: you may not watch finetunejobs")
        with pytest.raises(EOFError):
            await stream.next(timeout=2)


@pytest.mark.parametrize("auth", ["passthrough", "serviceaccount"])
async def test_a_token_that_may_not_watch_the_namespace_is_refused(make_stack: MakeStack, auth: str) -> None:
    async with make_stack(auth=auth) as stack:
        for path, token, code in [
            ("/v1/namespaces/team-b/events", "team-a-token", 403),  # alice: team-a only
            ("/v1/namespaces/team-b/finetunejobs/their-job/events", "team-a-token", 403),
            ("/v1/namespaces/team-b/events", "team-b-token", 403),  # bob may get and list in team-b, not watch
            (NS_EVENTS, "nobody-knows-me", 401),
        ]:
            response = await stack.client.get(path, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == code, (path, token, response.text)
        async with httpx.AsyncClient(base_url=stack.url) as anonymous:
            assert (await anonymous.get(NS_EVENTS)).status_code == 401
        assert watch_requests(stack) == []  # refused before any watch started


async def test_serviceaccount_mode_watches_with_the_apis_own_token(make_stack: MakeStack) -> None:
    async with make_stack(auth="serviceaccount") as stack:
        await put_job(stack)
        async with sse(stack.client, JOB_EVENTS) as stream:
            assert (await stream.message()).data["items"][0]["summary"]["name"] == "support-bot"
            await set_phase(stack, "Running")
            assert await phases(stream, 1) == [("MODIFIED", "Running")]
        assert {r.headers.get("Authorization") for r in watch_requests(stack)} == {"Bearer api-token"}


async def test_a_token_allowed_to_watch_but_refused_the_list_gets_403_not_a_stream(stack: Stack) -> None:
    from kt_auth import Rule, User

    stack.kube.tokens["carol-token"] = User("carol")
    stack.kube.rules.append(Rule("carol", "watch", "finetunejobs.kubetune.io", "team-a"))  # watch, but no list
    response = await stack.client.get(NS_EVENTS, headers={"Authorization": "Bearer carol-token"})
    assert response.status_code == 403, response.text
    assert "Kubernetes refused this token's watch (HTTP 403)" in response.json()["detail"]
    async with sse(stack.client, NS_EVENTS) as stream:  # alice, on the same feed, is not affected
        assert (await stream.message()).event == "snapshot"


async def test_the_shared_watch_moves_to_a_present_listeners_token_when_its_owner_leaves(stack: Stack) -> None:
    from contextlib import AsyncExitStack

    from kt_auth import User

    stack.kube.tokens["dave-token"] = User("dave", ("team-a-devs",))
    await put_job(stack)
    async with AsyncExitStack() as alices, AsyncExitStack() as daves:
        leaves = await alices.enter_async_context(sse(stack.client, NS_EVENTS))  # first: the watch is alice's
        assert (await leaves.message()).event == "snapshot"
        stays = await daves.enter_async_context(sse(stack.client, NS_EVENTS, {"Authorization": "Bearer dave-token"}))
        assert (await stays.message()).event == "snapshot"
        assert [w.headers["Authorization"] for w in watch_requests(stack)] == ["Bearer team-a-token"]
        await set_phase(stack, "Queued")
        assert await phases(stays, 1) == [("MODIFIED", "Queued")]
        await alices.aclose()  # alice closes her tab; the API notices, and watches again with dave's token
        await set_phase(stack, "Running")  # while it moves: the relist still brings it
        for _ in range(100):
            if watch_requests(stack)[-1].headers["Authorization"] == "Bearer dave-token":
                break
            await asyncio.sleep(0.05)
        assert watch_requests(stack)[-1].headers["Authorization"] == "Bearer dave-token"
        await set_phase(stack, "Succeeded")
        assert await phases(stays, 2) == [("MODIFIED", "Running"), ("MODIFIED", "Succeeded")]  # none lost
        assert len(stack.kube.watchers[FTJ_KEY]) == 1
