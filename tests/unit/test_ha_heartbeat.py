"""Heartbeat wire format, authentication, replay checks and crash probing, over loopback UDP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from balancer.config import Address
from balancer.ha import heartbeat as hbmod
from balancer.ha.heartbeat import (
    FLAG_PREEMPT,
    FLAG_READY,
    FLAG_RESIGNING,
    Heartbeat,
    HeartbeatEndpoint,
    InstanceRecord,
    Rejected,
    decode,
    encode,
    load_key,
)
from balancer.ha.state import Role

KEY = b"0123456789abcdef-shared-secret"
OTHER_KEY = b"fedcba9876543210-other-secret!"


def heartbeat(**overrides: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "node_id": "lb1",
        "priority": 150,
        "role": Role.ACTIVE,
        "epoch": 1_700_000_000_000_000_000,
        "seq": 42,
        "timestamp_ns": time.time_ns(),
        "flags": FLAG_READY | FLAG_PREEMPT,
    }
    fields.update(overrides)
    return Heartbeat(**fields)


def remac(body: bytes, key: bytes = KEY) -> bytes:
    return body + hmac.new(key, body, hashlib.sha256).digest()


def reason_of(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(Rejected) as e:
        decode(data, key)
    return e.value.reason


# ---------------------------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------------------------


def test_roundtrip_keeps_every_field() -> None:
    hb = heartbeat(flags=FLAG_RESIGNING | FLAG_READY | FLAG_PREEMPT, node_id="nœud-1")
    assert decode(encode(hb, KEY), KEY) == hb
    assert hb.resigning and hb.ready and hb.preempt
    plain = heartbeat(flags=0, role=Role.PASSIVE)
    got = decode(encode(plain, KEY), KEY)
    assert got == plain
    assert not (got.resigning or got.ready or got.preempt)


def test_encode_rejects_bad_node_id() -> None:
    with pytest.raises(ValueError):
        encode(heartbeat(node_id=""), KEY)
    with pytest.raises(ValueError):
        encode(heartbeat(node_id="x" * 65), KEY)


def test_tampered_byte_anywhere_fails_authentication() -> None:
    data = encode(heartbeat(), KEY)
    for i in range(5, len(data)):  # past magic and version, which fail earlier and otherwise
        bad = bytearray(data)
        bad[i] ^= 0x01
        assert reason_of(bytes(bad)) == hbmod.BAD_AUTH, f"byte {i}"


def test_wrong_key_fails_authentication() -> None:
    assert reason_of(encode(heartbeat(), OTHER_KEY)) == hbmod.BAD_AUTH


def test_forged_mac_fails_authentication() -> None:
    data = encode(heartbeat(), KEY)
    assert reason_of(data[:-32] + os.urandom(32)) == hbmod.BAD_AUTH
    assert reason_of(data[:-32] + hashlib.sha256(data[:-32]).digest()) == hbmod.BAD_AUTH


def test_short_or_foreign_datagrams_are_malformed() -> None:
    data = encode(heartbeat(), KEY)
    assert reason_of(b"") == hbmod.MALFORMED
    assert reason_of(data[:40]) == hbmod.MALFORMED
    assert reason_of(b"VRRP" + data[4:]) == hbmod.MALFORMED


def test_unknown_version_is_rejected_as_such() -> None:
    body = encode(heartbeat(version=3), KEY)[:-32]
    assert reason_of(remac(body)) == hbmod.BAD_VERSION


# ---------------------------------------------------------------------------------------------
# Version 2: several floating IPs in one heartbeat
# ---------------------------------------------------------------------------------------------


def two_instances(**overrides: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "node_id": "lb1",
        "epoch": 1_700_000_000_000_000_000,
        "seq": 7,
        "timestamp_ns": time.time_ns(),
        "records": (
            InstanceRecord("198.18.0.100", 150, Role.ACTIVE, FLAG_PREEMPT),
            InstanceRecord("198.18.0.101", 100, Role.PASSIVE, FLAG_READY | FLAG_PREEMPT),
        ),
    }
    fields.update(overrides)
    return Heartbeat.of_instances(**fields)


def test_version_2_roundtrip_keeps_every_instance() -> None:
    hb = two_instances()
    got = decode(encode(hb, KEY), KEY)
    assert got == hb and got.version == 2
    assert [(r.address, r.priority, r.role, r.ready) for r in got.records] == [
        ("198.18.0.100", 150, Role.ACTIVE, False),
        ("198.18.0.101", 100, Role.PASSIVE, True),
    ]
    # the first record doubles as the heartbeat's own fields
    assert (got.priority, got.role, got.preempt) == (150, Role.ACTIVE, True)
    # a version-1 heartbeat is one record without an address
    (only,) = decode(encode(heartbeat(), KEY), KEY).records
    assert (only.address, only.priority, only.role, only.ready) == (None, 150, Role.ACTIVE, True)


def test_version_1_wire_format_is_unchanged() -> None:
    # what a release before active-active sends and expects, byte for byte
    hb = heartbeat(node_id="lb1", flags=FLAG_READY, seq=3, timestamp_ns=5)
    body = encode(hb, KEY)[:-32]
    assert body == (
        b"BLHA\x01\x02\x01\x96"
        + (1_700_000_000_000_000_000).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
        + (5).to_bytes(8, "big")
        + b"\x03lb1"
    )


def test_a_single_instance_peer_rejects_version_2_cleanly() -> None:
    """An old node reads magic, then the version byte at offset 4, and stops: the same offsets
    in both versions, so it counts an unknown version instead of misreading the records."""
    data = encode(two_instances(), KEY)
    assert data[:5] == b"BLHA\x02"
    assert reason_of_versions(data, (1,)) == hbmod.BAD_VERSION
    # and a node with several instances refuses version 1: it cannot say which address it means
    assert reason_of_versions(encode(heartbeat(), KEY), (2,)) == hbmod.BAD_VERSION
    assert "several ha.instances" in hbmod._REJECT_HINTS[hbmod.BAD_VERSION]


def reason_of_versions(data: bytes, versions: tuple[int, ...]) -> str:
    with pytest.raises(Rejected) as e:
        decode(data, KEY, versions)
    return e.value.reason


def test_version_2_tampered_anywhere_fails_authentication() -> None:
    data = encode(two_instances(), KEY)
    for i in range(5, len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        assert reason_of(bytes(bad)) == hbmod.BAD_AUTH, f"byte {i}"


def test_version_2_inconsistent_fields_are_malformed() -> None:
    body = bytearray(encode(two_instances(), KEY)[:-32])
    no_count = bytearray(body)
    no_count[5] = 0
    assert reason_of(remac(bytes(no_count))) == hbmod.MALFORMED
    more = bytearray(body)
    more[5] = 3  # claims a record that is not there
    assert reason_of(remac(bytes(more))) == hbmod.MALFORMED
    bad_role = bytearray(body)
    bad_role[-2] = 9
    assert reason_of(remac(bytes(bad_role))) == hbmod.MALFORMED
    twice = two_instances(
        records=(
            InstanceRecord("198.18.0.100", 150, Role.ACTIVE),
            InstanceRecord("198.18.0.100", 100, Role.PASSIVE),
        )
    )
    assert reason_of(encode(twice, KEY)) == hbmod.MALFORMED
    with pytest.raises(ValueError):
        Heartbeat.of_instances("lb1", 1, 1, 1, ())
    many = [InstanceRecord(f"198.18.1.{i}", 100, Role.PASSIVE) for i in range(33)]
    with pytest.raises(ValueError):
        encode(two_instances(records=tuple(many)), KEY)


def test_authenticated_but_inconsistent_fields_are_malformed() -> None:
    body = bytearray(encode(heartbeat(), KEY)[:-32])
    bad_role = bytearray(body)
    bad_role[6] = 7
    assert reason_of(remac(bytes(bad_role))) == hbmod.MALFORMED
    bad_len = bytearray(body)
    bad_len[32] = 99
    assert reason_of(remac(bytes(bad_len))) == hbmod.MALFORMED
    bad_utf8 = bytes(body[:-3]) + b"\xff\xfe\xfd"
    assert reason_of(remac(bad_utf8)) == hbmod.MALFORMED


def test_load_key_strips_whitespace_and_calls_short_keys_weak(tmp_path, caplog) -> None:
    good = tmp_path / "ha.key"
    good.write_bytes(b"  0123456789abcdef\n")
    good.chmod(0o600)
    with caplog.at_level("WARNING", logger="balancer.ha"):
        assert load_key(str(good)) == b"0123456789abcdef"
    assert "weak" not in caplog.text
    short = tmp_path / "short.key"
    short.write_bytes(b"secret \n\n")
    short.chmod(0o600)
    with caplog.at_level("WARNING", logger="balancer.ha"):
        assert load_key(str(short)) == b"secret"
    assert "a 6-byte HA key is weak" in caplog.text
    empty = tmp_path / "empty.key"
    empty.write_bytes(b" \n")
    with pytest.raises(ValueError, match="empty"):
        load_key(str(empty))
    with pytest.raises(FileNotFoundError):
        load_key(str(tmp_path / "missing.key"))


def test_load_key_warns_about_loose_permissions(tmp_path, caplog) -> None:
    key = tmp_path / "ha.key"
    key.write_bytes(b"0123456789abcdef")
    key.chmod(0o644)
    with caplog.at_level("WARNING", logger="balancer.ha"):
        load_key(str(key))
    assert "chmod 600" in caplog.text


def test_endpoint_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError):
        HeartbeatEndpoint(
            node_id="a",
            key=b"",
            bind=Address("127.0.0.1", 0),
            peers=(),
            on_heartbeat=lambda *a: None,
        )


# ---------------------------------------------------------------------------------------------
# Over real UDP sockets on loopback
# ---------------------------------------------------------------------------------------------


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


LOOPS: dict[str, Callable[[Awaitable[Any]], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.fixture(params=sorted(LOOPS))
def run(request) -> Callable[[Awaitable[Any]], Any]:
    return LOOPS[request.param]


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[Heartbeat, str, float]] = []
        self.crashed: list[tuple[str, float]] = []

    def heartbeat(self, hb: Heartbeat, host: str, now: float) -> None:
        self.items.append((hb, host, now))

    def crash(self, host: str) -> None:
        self.crashed.append((host, time.monotonic()))

    async def wait(self, n: int, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.items) < n:
            assert time.monotonic() < deadline, f"got {len(self.items)} of {n} heartbeats"
            await asyncio.sleep(0.005)


def endpoint(node_id: str, port: int, peers: list[int], inbox: Inbox, **kw: Any):
    return HeartbeatEndpoint(
        node_id=node_id,
        key=kw.pop("key", KEY),
        bind=Address("127.0.0.1", port),
        peers=[Address("127.0.0.1", p) for p in peers],
        on_heartbeat=inbox.heartbeat,
        on_peer_crashed=inbox.crash,
        **kw,
    )


async def settle(ep: HeartbeatEndpoint, total: int, timeout: float = 1.0) -> None:
    """Wait until `total` datagrams were accepted or rejected."""
    deadline = time.monotonic() + timeout
    while ep.received + sum(ep.rejected.values()) < total:
        assert time.monotonic() < deadline, (ep.received, ep.rejected)
        await asyncio.sleep(0.005)


def test_two_endpoints_exchange_heartbeats(run) -> None:
    async def main() -> None:
        pa, pb = free_udp_port(), free_udp_port()
        ia, ib = Inbox(), Inbox()
        a = endpoint("lb1", pa, [pb], ia)
        b = endpoint("lb2", pb, [pa], ib)
        await a.start()
        await b.start()
        try:
            a.send(Role.ACTIVE, 150, FLAG_PREEMPT)
            a.send(Role.ACTIVE, 150, FLAG_PREEMPT)
            b.send(Role.PASSIVE, 100, FLAG_READY)
            await ib.wait(2)
            await ia.wait(1)
            hb, host, now = ib.items[-1]
            assert (hb.node_id, hb.role, hb.priority, hb.preempt, hb.seq) == (
                "lb1",
                Role.ACTIVE,
                150,
                True,
                2,
            )
            assert host == "127.0.0.1"
            assert abs(now - time.monotonic()) < 1.0
            assert ia.items[0][0].node_id == "lb2" and ia.items[0][0].ready
            assert a.sent == 2 and b.received == 2 and a.received == 1
            assert sum(b.rejected.values()) == 0
            assert not ia.crashed and not ib.crashed
        finally:
            a.close()
            b.close()

    run(main())


def test_bad_datagrams_are_rejected_and_counted_by_reason(run) -> None:
    async def main() -> None:
        pb = free_udp_port()
        ib = Inbox()
        b = endpoint("lb2", pb, [free_udp_port()], ib)
        await b.start()
        target = ("127.0.0.1", pb)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.9", 0))  # loopback, but not in peers
        try:
            now = time.time_ns()
            good = encode(heartbeat(seq=5, timestamp_ns=now), KEY)
            sends = [
                (peer, good),  # accepted
                (peer, good),  # the same again: replay
                (peer, encode(heartbeat(seq=4, timestamp_ns=now), KEY)),  # older seq: replay
                (peer, encode(heartbeat(seq=6, timestamp_ns=now), KEY)),  # accepted
                (peer, encode(heartbeat(seq=7), OTHER_KEY)),  # wrong key
                (peer, good[:-1] + bytes([good[-1] ^ 1])),  # tampered
                (peer, encode(heartbeat(seq=8, timestamp_ns=now - 10**10), KEY)),  # 10 s old
                (peer, encode(heartbeat(seq=9, timestamp_ns=now + 10**10), KEY)),  # 10 s ahead
                (peer, encode(heartbeat(seq=10, node_id="lb2"), KEY)),  # our own id
                (peer, b"garbage"),
                (stranger, encode(heartbeat(seq=11), KEY)),  # valid, from an unknown address
                (peer, encode(heartbeat(seq=12), KEY)),  # accepted
            ]
            for sock, data in sends:
                sock.sendto(data, target)
                await asyncio.sleep(0.002)  # keep the order
            await settle(b, len(sends))
            assert b.received == 3
            assert [hb.seq for hb, _, _ in ib.items] == [5, 6, 12]
            assert b.rejected == {
                hbmod.UNKNOWN_PEER: 1,
                hbmod.MALFORMED: 1,
                hbmod.BAD_VERSION: 0,
                hbmod.BAD_AUTH: 2,
                hbmod.STALE: 2,
                hbmod.REPLAY: 2,
                hbmod.SELF: 1,
            }
        finally:
            peer.close()
            stranger.close()
            b.close()

    run(main())


def test_rejections_are_logged_once_per_sender_and_reason(run, caplog) -> None:
    # A peer with another key is otherwise invisible: both nodes take the VIP, and only a
    # counter in /status said why.
    async def main() -> None:
        pb = free_udp_port()
        b = endpoint("lb2", pb, [free_udp_port()], Inbox())
        await b.start()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stranger.bind(("127.0.0.9", 0))
        try:
            for seq in range(1, 4):
                peer.sendto(encode(heartbeat(seq=seq), OTHER_KEY), ("127.0.0.1", pb))
                stranger.sendto(encode(heartbeat(seq=seq), KEY), ("127.0.0.1", pb))
            await settle(b, 6)
        finally:
            peer.close()
            stranger.close()
            b.close()

    with caplog.at_level("WARNING", logger="balancer.ha"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    auth = next(w for w in warnings if "127.0.0.1" in w)
    assert "auth" in auth and "a different auth_key_file on the two nodes" in auth
    stranger_warning = next(w for w in warnings if "127.0.0.9" in w)
    assert "not in ha.peers" in stranger_warning


def test_restarted_peer_with_new_epoch_is_accepted_old_epoch_is_a_replay(run) -> None:
    async def main() -> None:
        clock = [100.0]
        pb = free_udp_port()
        ib = Inbox()
        b = endpoint("lb2", pb, [free_udp_port()], ib, clock=lambda: clock[0])
        await b.start()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        target = ("127.0.0.1", pb)
        sent = 0

        async def send(epoch: int, seq: int) -> None:
            nonlocal sent
            peer.sendto(encode(heartbeat(epoch=epoch, seq=seq), KEY), target)
            sent += 1
            await settle(b, sent)

        try:
            await send(1000, 50)
            await send(2000, 1)  # restarted: new epoch, seq from 1
            assert b.received == 2
            await send(1000, 51)  # the old incarnation's next message: a replay
            assert b.rejected[hbmod.REPLAY] == 1
            # A restart whose clock went back is accepted once the current one is silent.
            clock[0] += b.incarnation_timeout + 0.1
            await send(1500, 1)
            assert b.received == 3
            await send(2000, 2)  # and the newer epoch is no replay of it
            assert b.received == 4
        finally:
            peer.close()
            b.close()

    run(main())


def test_crash_detected_from_port_unreachable(run) -> None:
    async def main() -> None:
        ia = Inbox()
        dead = free_udp_port()  # nothing listens there
        a = endpoint("lb1", free_udp_port(), [dead], ia)
        await a.start()
        try:
            t0 = time.monotonic()
            a.send(Role.PASSIVE, 100)
            deadline = t0 + 1.0
            while not ia.crashed:
                assert time.monotonic() < deadline, "no crash reported"
                await asyncio.sleep(0.001)
            host, at = ia.crashed[0]
            assert host == "127.0.0.1"
            assert at - t0 < 0.05, "two refusals on loopback take well under 50 ms"
            assert a.crashes_detected == 1
            assert a.sent == 2, "the heartbeat and one probe"
        finally:
            a.close()

    run(main())


def test_live_peer_is_never_reported_crashed(run) -> None:
    async def main() -> None:
        pa, pb = free_udp_port(), free_udp_port()
        ia, ib = Inbox(), Inbox()
        a = endpoint("lb1", pa, [pb], ia)
        b = endpoint("lb2", pb, [pa], ib)
        await a.start()
        await b.start()
        try:
            for _ in range(10):
                a.send(Role.ACTIVE, 150)
                await asyncio.sleep(0.005)
            await ib.wait(10)
            assert not ia.crashed and a.crashes_detected == 0
        finally:
            a.close()
            b.close()

    run(main())


def test_one_refusal_is_not_a_crash_two_within_the_window_are(run) -> None:
    async def main() -> None:
        clock = [10.0]
        ia = Inbox()
        # The peer's port is open, so only the refusals this test feeds in exist.
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 0))
        a = endpoint("lb1", free_udp_port(), [sink.getsockname()[1]], ia, clock=lambda: clock[0])
        await a.start()
        try:
            link = a._links[0]
            a.send(Role.ACTIVE, 150)
            sent = a.sent
            link.error_received(ConnectionRefusedError())
            assert a.sent == sent + 1, "a probe goes out at once"
            clock[0] += a.confirm_window + 0.01
            link.error_received(ConnectionRefusedError())  # too late: a new first refusal
            assert not ia.crashed
            clock[0] += a.confirm_window / 2
            link.error_received(ConnectionRefusedError())
            assert [h for h, _ in ia.crashed] == ["127.0.0.1"]
            link.error_received(OSError(113, "No route to host"))  # not a refusal
            assert len(ia.crashed) == 1
        finally:
            a.close()
            sink.close()

    run(main())


def test_dual_stack_listener_accepts_ipv4_peers(run) -> None:
    async def main() -> None:
        pb = free_udp_port()
        ib = Inbox()
        b = HeartbeatEndpoint(
            node_id="lb2",
            key=KEY,
            bind=Address("::", pb),  # dual stack: IPv4 senders arrive as ::ffff:a.b.c.d
            peers=[Address("127.0.0.1", free_udp_port())],
            on_heartbeat=ib.heartbeat,
        )
        await b.start()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        try:
            peer.sendto(encode(heartbeat(), KEY), ("127.0.0.1", pb))
            await ib.wait(1)
            assert ib.items[0][1] == "127.0.0.1"
            assert b.rejected[hbmod.UNKNOWN_PEER] == 0
        finally:
            peer.close()
            b.close()

    run(main())


def test_rejection_warnings_are_capped_whatever_the_senders(run, caplog) -> None:
    # spoofed datagrams from ever new source addresses must not flood the log
    async def main() -> None:
        pb = free_udp_port()
        b = endpoint("lb2", pb, [free_udp_port()], Inbox())
        await b.start()
        senders = []
        try:
            for i in range(1, hbmod.REJECT_LOG_BURST + 11):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((f"127.0.1.{i}", 0))
                senders.append(s)
                s.sendto(encode(heartbeat(seq=i), KEY), ("127.0.0.1", pb))
            await settle(b, hbmod.REJECT_LOG_BURST + 10)
        finally:
            for s in senders:
                s.close()
            b.close()

    with caplog.at_level("WARNING", logger="balancer.ha"):
        run(main())
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == hbmod.REJECT_LOG_BURST


def test_version_2_over_udp_shares_the_replay_sequence_with_version_1(run) -> None:
    async def main() -> None:
        pa, pb = free_udp_port(), free_udp_port()
        ia, ib = Inbox(), Inbox()
        a = endpoint("lb1", pa, [pb], ia)
        old = endpoint("lb2", pb, [pa], ib, versions=(1,))  # a single-instance-only receiver
        await a.start()
        await old.start()
        try:
            records = (
                InstanceRecord("198.18.0.100", 150, Role.ACTIVE),
                InstanceRecord("198.18.0.101", 100, Role.PASSIVE, FLAG_READY),
            )
            a.send_records(records)
            a.send(Role.ACTIVE, 150)
            await settle(old, 2)
            assert old.rejected[hbmod.BAD_VERSION] == 1 and old.received == 1
            assert ib.items[0][0].seq == 2  # one sequence across both formats
            multi = endpoint("lb2", free_udp_port(), [pa], Inbox(), versions=(2,))
            assert multi.versions == (2,)
        finally:
            a.close()
            old.close()

    run(main())
