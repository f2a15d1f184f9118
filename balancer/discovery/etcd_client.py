"""A small etcd v3 client over etcd's HTTP/JSON gateway (the /v3/ paths every etcd server
serves beside gRPC), on aiohttp: key ranges, puts and deletes, leases, and watches.

The gateway rather than a gRPC client library: aiohttp is already a dependency, the
maintained asyncio gRPC clients for etcd lag behind etcd releases, and the few calls
discovery and `balancer register` make map one to one onto JSON requests. Keys and values
travel base64-encoded, 64-bit integers as strings (the gateway's proto3 JSON mapping).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from balancer.config.schema import Address
from balancer.discovery.records import RegistryUnavailable

# A watch response line is one message with its events; a registry for a pool holds a few
# hundred small keys, so a line beyond this is not etcd talking
MAX_WATCH_LINE = 16 * 1024 * 1024


class EtcdError(Exception):
    """etcd answered, and the answer is an error (a gRPC status code and message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"etcd: {message} (code {code})")
        self.code = code
        self.message = message


class Compacted(Exception):
    """The watch's start revision was compacted away: list the prefix again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) cover every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


class EtcdClient:
    """Calls to one etcd cluster: each goes to the endpoint that answered last, and on a
    connection failure to the next one in turn, so a dead member or a lost leader sends the
    client to another member. Raises RegistryUnavailable when no endpoint answers."""

    def __init__(self, endpoints: Sequence[Address], timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    def _url(self, index: int, path: str) -> str:
        return f"http://{self.endpoints[index]}/v3/{path}"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # no pooled connection outlives a member's restart by more than one failed call
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8, force_close=False),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one request; the decoded answer. EtcdError for etcd's own errors."""
        failures = []
        for step in range(len(self.endpoints)):
            index = (self._current + step) % len(self.endpoints)
            try:
                async with asyncio.timeout(self.timeout):
                    async with self.session.post(self._url(index, path), json=body) as resp:
                        raw = await resp.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                failures.append(f"{self.endpoints[index]}: {_reason(e)}")
                continue
            answer = _decode(raw)
            if "error" in answer or resp.status >= 400:
                code = int(answer.get("code", 0) or 0)
                message = str(answer.get("message") or answer.get("error") or resp.reason)
                if code == 14:  # UNAVAILABLE: this member cannot serve (no leader, stopping)
                    failures.append(f"{self.endpoints[index]}: {message}")
                    continue
                raise EtcdError(code, message)
            self._current = index
            return answer
        raise RegistryUnavailable("etcd unreachable: " + "; ".join(failures))

    # -- keys -------------------------------------------------------------------------------

    async def range_prefix(self, prefix: str) -> tuple[int, list[dict[str, Any]]]:
        """(revision, key-values) of every key under `prefix`, in one linearizable read."""
        p = prefix.encode()
        answer = await self.call("kv/range", {"key": b64(p), "range_end": b64(prefix_end(p))})
        return _revision(answer), list(answer.get("kvs", []))

    async def ping(self, prefix: str) -> int:
        """A linearizable count of the prefix (needs a leader): is the cluster serving?"""
        p = prefix.encode()
        body = {"key": b64(p), "range_end": b64(prefix_end(p)), "count_only": True}
        return _revision(await self.call("kv/range", body))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(await self.call("kv/put", body))

    async def delete(self, key: str) -> int:
        return _revision(await self.call("kv/deleterange", {"key": b64(key)}))

    async def compact(self, revision: int) -> None:
        await self.call("kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases -----------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self.call("lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh `lease`; its remaining TTL, 0 when it has already expired."""
        answer = await self.call("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0) or 0)

    async def revoke(self, lease: int) -> None:
        """End `lease` now: every key on it is deleted."""
        await self.call("lease/revoke", {"ID": str(lease)})

    # -- watches ----------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[dict[str, Any]]:
        """The watch responses for every change under `prefix` from `start_revision` on,
        as etcd streams them (each {"header", "events"}, the first with "created" and no
        events); ends when the stream does. Raises
        Compacted when the revision is gone, RegistryUnavailable when no member answers."""
        p = prefix.encode()
        body = {
            "create_request": {
                "key": b64(p),
                "range_end": b64(prefix_end(p)),
                "start_revision": str(start_revision),
            }
        }
        resp = await self._open_stream("watch", body)
        try:
            async for message in _lines(resp):
                if "error" in message:
                    err = message["error"]
                    raise EtcdError(int(err.get("grpc_code", err.get("code", 0)) or 0), str(err))
                result = message.get("result", {})
                if int(result.get("compact_revision", 0) or 0):
                    raise Compacted(int(result["compact_revision"]))
                if result.get("canceled"):
                    raise RegistryUnavailable(
                        f"etcd cancelled the watch: {result.get('cancel_reason', 'no reason')}"
                    )
                yield result  # the first one says the watch was created (no events)
        except (aiohttp.ClientError, OSError) as e:
            raise RegistryUnavailable(f"etcd watch broke: {_reason(e)}") from None
        finally:
            resp.release()
            resp.close()

    async def _open_stream(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        failures = []
        for step in range(len(self.endpoints)):
            index = (self._current + step) % len(self.endpoints)
            try:
                async with asyncio.timeout(self.timeout):
                    resp = await self.session.post(self._url(index, path), json=body)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                failures.append(f"{self.endpoints[index]}: {_reason(e)}")
                continue
            if resp.status >= 400:
                failures.append(f"{self.endpoints[index]}: HTTP {resp.status}")
                resp.close()
                continue
            self._current = index
            return resp
        raise RegistryUnavailable("etcd unreachable: " + "; ".join(failures))


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The newline-delimited JSON messages of a gateway stream, bounded in size."""
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        buf += chunk
        while True:
            end = buf.find(b"\n")
            if end < 0:
                break
            line = bytes(buf[:end]).strip()
            del buf[: end + 1]
            if line:
                yield _decode(line)
        if len(buf) > MAX_WATCH_LINE:
            raise RegistryUnavailable("etcd watch sent an oversized message")
    if buf.strip():
        yield _decode(bytes(buf))


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(raw)
    except ValueError:
        raise RegistryUnavailable(f"etcd sent something that is not JSON: {raw[:80]!r}") from None
    if not isinstance(answer, dict):
        raise RegistryUnavailable(f"etcd sent unexpected JSON: {raw[:80]!r}")
    return answer


def _revision(answer: dict[str, Any]) -> int:
    header = answer.get("header") or answer.get("result", {}).get("header") or {}
    return int(header.get("revision", 0) or 0)


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
