"""One Kubernetes watch per namespace, fanned out to every event-stream listener of that namespace.

A `Feed` holds, for one namespace: the FineTuneJobs as its watch sees them, the recent Kubernetes Events about
them, a bounded replay buffer of the messages it sent, and its listeners (one queue each). Two watch loops run
while it has listeners (and `linger` seconds after the last one leaves, so a reconnect finds the buffer):
FineTuneJobs, and core/v1 Events whose involvedObject is a FineTuneJob. Each loop lists, then watches from the
list's resourceVersion; a 410 Expired or a broken stream lists again, and the difference against what it
knew is sent as ordinary messages, so no transition is lost across a watch restart.

The first snapshot waits for both first lists, so an Event made while the Events list was still on its way is in
the snapshot or in a message after it, never in neither. A first Events list that fails (refused, or an error)
does not hold the streams back: they start with jobs only, and the Events a later list finds are sent as news.

Message ids are `<epoch>.<seq>`: seq counts the namespace's messages, epoch names this feed (another API
replica or a restart has another epoch). A Last-Event-ID of this epoch still in the buffer resumes exactly
after it; any other id gets a fresh snapshot first.

Whose token watches: the API's own in serviceaccount mode; in passthrough mode the token of the listener
that joined last (every listener was authorized to watch this namespace's FineTuneJobs); when that listener
leaves, the watch starts again with a present listener's token. A token Kubernetes refuses (401/403) ends its
listeners' streams and the watch goes on with another listener's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from kubetune import wire
from kubetune.api.deps import summarize
from kubetune.api.kube import job_path
from kubetune.spec import KIND

log = logging.getLogger("kubetune.api.feed")
KEVENTS_KEPT = 200  # recent Events per namespace, for snapshots
WATCH_SECONDS = 290  # each watch request asks the API server to end it after this (then it watches again)


class Refused(RuntimeError):
    """Kubernetes answered 401 or 403 to this token."""


@dataclass(frozen=True)
class Message:
    seq: int
    event: str  # job | kevent | snapshot
    name: str | None  # the FineTuneJob it is about (None: the whole namespace)
    data: Mapping[str, Any]
    epoch: str

    @property
    def id(self) -> str:
        return f"{self.epoch}.{self.seq}"

    def frame(self) -> bytes:
        return f"id: {self.id}\nevent: {self.event}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n".encode()


def job_data(kind: str, obj: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": kind, "summary": summarize(dict(obj)).model_dump(by_alias=True), "resource": obj}


def kevent_data(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """A core/v1 Event about a FineTuneJob as a `kevent` message's data; None for Events about anything else."""
    involved = event.get("involvedObject") or {}
    if involved.get("kind") != KIND or not involved.get("name"):
        return None
    meta = event.get("metadata") or {}
    when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or \
        meta.get("creationTimestamp")
    return {"name": involved["name"], "type": event.get("type") or "Normal", "reason": event.get("reason") or "",
            "message": event.get("message") or "", "time": when, "count": event.get("count") or 1}


def parse_last_id(value: str | None) -> tuple[str, int] | None:
    epoch, _, seq = (value or "").strip().partition(".")
    return (epoch, int(seq)) if epoch and seq.isdigit() else None


@dataclass(eq=False)
class Listener:
    token: str
    name: str | None  # one FineTuneJob's stream, or None: the namespace's
    queue: asyncio.Queue[Message | None]
    closed: str | None = None  # why the API ended this stream
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, message: Message) -> bool:
        return self.name is None or message.name in (None, self.name)

    def close(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
            self.gone.set()
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)


TokenSource = Callable[[], str | None]  # the API's own token (serviceaccount mode), else None


@dataclass(eq=False)
class Feed:
    namespace: str
    client: httpx.AsyncClient
    own_token: TokenSource
    replay: int = 1000
    linger: float = 30.0
    queue_size: int = 1000
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    kevents: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    buffer: deque[Message] = field(init=False)
    listeners: list[Listener] = field(default_factory=list)
    seq: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    watches: int = 0  # watch requests made (tests: one feed, one watch per resource)
    jobs_listed: bool = False
    events_settled: bool = False  # Events listed, or their first list failed: from now on Events are news
    watching: dict[str, str] = field(default_factory=dict)  # path -> the token its watch runs with
    on_idle: Callable[[Feed], None] | None = None
    _idle: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.buffer = deque(maxlen=self.replay)

    # --- listeners -----------------------------------------------------------------------------------------

    async def join(self, token: str, name: str | None, last_id: str | None) -> tuple[Listener, list[Message]]:
        """Register a listener; returns it and what to send first (a replay, or a snapshot)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        listener = Listener(token, name, asyncio.Queue(self.queue_size))
        self.listeners.append(listener)
        if not self.tasks:
            self._start()
        waits = [asyncio.ensure_future(self.ready.wait()), asyncio.ensure_future(listener.gone.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.leave(listener)
            raise
        finally:
            for waiting in waits:
                waiting.cancel()
        first = self.first(listener, parse_last_id(last_id))
        floor = max((m.seq for m in first), default=self.seq)
        queued = [listener.queue.get_nowait() for _ in range(listener.queue.qsize())]
        for message in queued:  # published while it waited: in `first` already, unless newer
            if message is None or message.seq > floor:
                listener.queue.put_nowait(message)
        return listener, first

    def _start(self) -> None:
        self.tasks = [asyncio.create_task(self._run(self._watch_jobs), name=f"watch-jobs-{self.namespace}"),
                      asyncio.create_task(self._run(self._watch_events), name=f"watch-events-{self.namespace}")]

    def leave(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self.listeners.remove(listener)
        if not self.listeners and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(self.linger, self.stop)
        elif self.listeners and listener.token in self.watching.values() and \
                all(other.token != listener.token for other in self.listeners):
            for task in self.tasks:  # its owner has gone: watch on with a present listener's token (a relist
                task.cancel()  # sends what changed in between, as after any broken watch)
            self._start()

    def first(self, listener: Listener, last: tuple[str, int] | None) -> list[Message]:
        if last is not None and last[0] == self.epoch and last[1] <= self.seq and \
                (last[1] >= self.seq or (self.buffer and self.buffer[0].seq <= last[1] + 1)):
            return [m for m in self.buffer if m.seq > last[1] and listener.wants(m)]
        return [self.snapshot(listener.name)]

    def snapshot(self, name: str | None) -> Message:
        items = [job_data("ADDED", obj) for key, obj in sorted(self.jobs.items()) if name in (None, key)]
        kevents = [e for e in self.kevents.values() if name in (None, e["name"])]
        return Message(self.seq, "snapshot", name, {"items": items, "kevents": kevents}, self.epoch)

    def publish(self, event: str, name: str, data: Mapping[str, Any]) -> None:
        self.seq += 1
        message = Message(self.seq, event, name, data, self.epoch)
        self.buffer.append(message)
        for listener in list(self.listeners):
            if listener.closed is None and listener.wants(message):
                try:
                    listener.queue.put_nowait(message)
                except asyncio.QueueFull:  # a reader this far behind resumes with Last-Event-ID
                    listener.close("too slow")

    def stop(self) -> None:
        self._idle = None
        if self.listeners:
            return
        for task in self.tasks:
            task.cancel()
        self.tasks = []
        if self.on_idle is not None:
            self.on_idle(self)

    def token(self) -> str | None:
        own = self.own_token()
        if own:
            return own
        live = [listener for listener in self.listeners if listener.closed is None]
        return live[-1].token if live else None

    def refuse(self, token: str, code: int) -> None:
        for listener in self.listeners:
            if listener.token == token:
                listener.close(f"Kubernetes refused this token's watch (HTTP {code})")

    # --- the two watches ----------------------------------------------------------------------------------

    def _on_jobs_list(self, items: Iterable[Mapping[str, Any]]) -> None:
        fresh = {str(o["metadata"]["name"]): dict(o) for o in items if (o.get("metadata") or {}).get("name")}
        if self.ready.is_set():  # a relist after a snapshot was served: what changed meanwhile, as messages
            for name, obj in fresh.items():
                old = self.jobs.get(name)
                if old is None or old["metadata"].get("resourceVersion") != obj["metadata"].get("resourceVersion"):
                    self.publish("job", name, job_data("ADDED" if old is None else "MODIFIED", obj))
            for name in sorted(set(self.jobs) - set(fresh)):
                self.publish("job", name, job_data("DELETED", self.jobs[name]))
        self.jobs = fresh
        self.jobs_listed = True
        self._ready_when_both_listed()

    def _ready_when_both_listed(self) -> None:
        if self.jobs_listed and self.events_settled:
            self.ready.set()

    def _on_job(self, kind: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name") or "")
        if not name or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        if kind == "DELETED":
            self.jobs.pop(name, None)
        else:
            self.jobs[name] = obj
        self.publish("job", name, job_data(kind, obj))

    def _on_events_list(self, items: Iterable[Mapping[str, Any]]) -> None:
        for item in items:
            self._on_event("ADDED", dict(item), quiet=not self.events_settled)
        self._settle_events()

    def _settle_events(self) -> None:
        self.events_settled = True
        self._ready_when_both_listed()

    def _on_event(self, kind: str, obj: dict[str, Any], quiet: bool = False) -> None:
        data = kevent_data(obj) if kind in ("ADDED", "MODIFIED") else None
        if data is None:
            return
        key = str((obj.get("metadata") or {}).get("uid") or (obj.get("metadata") or {}).get("name"))
        if self.kevents.get(key) == data:
            return  # a relist repeats what was sent
        self.kevents[key] = data
        self.kevents.move_to_end(key)
        while len(self.kevents) > KEVENTS_KEPT:
            self.kevents.popitem(last=False)
        if not quiet:
            self.publish("kevent", data["name"], data)

    async def _watch_jobs(self) -> None:
        await self._watch(job_path(self.namespace), self._on_jobs_list, self._on_job)

    async def _watch_events(self) -> None:
        try:
            await self._watch(wire.collection_path("v1", "events", quote(self.namespace, safe="")),
                              self._on_events_list, self._on_event)
        except Refused:
            self._settle_events()
            await asyncio.sleep(30)  # this identity may not read Events: the streams carry jobs only
            raise
        except Exception:
            self._settle_events()
            raise

    async def _run(self, loop: Callable[[], Any]) -> None:
        """Keep one watch going (with backoff) until the feed stops."""
        delay = 0.2
        while True:
            try:
                await loop()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broken stream, a refused token, garbage: list again after a pause
                log.info(f"watch in {self.namespace} ended: {exc!r}; again in {delay:.1f}s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _check(self, response: httpx.Response, path: str, token: str) -> None:
        code = response.status_code
        if code in (401, 403):
            if not path.endswith("/events"):
                self.refuse(token, code)
            raise Refused(f"{path}: HTTP {code}")
        if code >= 400:
            raise RuntimeError(f"{path}: HTTP {code}")

    async def _watch(self, path: str, on_list: Callable[[Iterable[Mapping[str, Any]]], None],
                     on_event: Callable[[str, dict[str, Any]], None]) -> None:
        token = self.token()
        if token is None:
            await asyncio.sleep(0.2)
            return
        headers = {"Authorization": f"Bearer {token}"}
        self.watching[path] = token
        listed = await self.client.get(path, headers=headers)
        self._check(listed, path, token)
        body = listed.json()
        on_list([i for i in body.get("items") or [] if isinstance(i, dict)])
        version = (body.get("metadata") or {}).get("resourceVersion") or ""
        while True:
            params = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                      "timeoutSeconds": str(WATCH_SECONDS)}
            self.watches += 1
            async with self.client.stream("GET", path, params=params, headers=headers,
                                          timeout=httpx.Timeout(10.0, read=WATCH_SECONDS + 30)) as response:
                self._check(response, path, token)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise RuntimeError(f"watch {path}: {obj.get('code')} {obj.get('message')}")
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") != "BOOKMARK":
                        on_event(str(event.get("type")), obj)


class Feeds:
    """The feeds of this API process, one per namespace, made on first use and dropped when idle."""

    def __init__(self, client: httpx.AsyncClient, own_token: TokenSource, replay: int, linger: float,
                 queue_size: int) -> None:
        self.client, self.own_token = client, own_token
        self.replay, self.linger, self.queue_size = replay, linger, queue_size
        self.feeds: dict[str, Feed] = {}

    def get(self, namespace: str) -> Feed:
        feed = self.feeds.get(namespace)
        if feed is None:
            feed = Feed(namespace, self.client, self.own_token, self.replay, self.linger, self.queue_size,
                        on_idle=self._forget)
            self.feeds[namespace] = feed
        return feed

    def _forget(self, feed: Feed) -> None:
        if self.feeds.get(feed.namespace) is feed:
            del self.feeds[feed.namespace]

    def close(self) -> None:
        for feed in list(self.feeds.values()):
            for listener in feed.listeners:
                listener.close("the API is shutting down")
            for task in feed.tasks:
                task.cancel()
        self.feeds.clear()
