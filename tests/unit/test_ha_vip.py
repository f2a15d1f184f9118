"""Gratuitous ARP frames, byte by byte, and what the VIP accepts."""

from __future__ import annotations

import struct

import pytest

from balancer.ha.vip import ARPOP_REPLY, ARPOP_REQUEST, VipAddress, build_garp

MAC = bytes.fromhex("02005e0000aa")
VIP = bytes([198, 18, 0, 100])


def fields(frame: bytes) -> dict:
    dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    return {
        "dst": dst,
        "src": src,
        "ethertype": ethertype,
        "arp": (htype, ptype, hlen, plen),
        "op": op,
        "sha": frame[22:28],
        "spa": frame[28:32],
        "tha": frame[32:38],
        "tpa": frame[38:42],
        "pad": frame[42:],
    }


def test_garp_request_announces_ip_at_mac() -> None:
    frame = build_garp(MAC, "198.18.0.100", ARPOP_REQUEST)
    f = fields(frame)
    assert len(frame) == 60  # minimum Ethernet frame without FCS
    assert f["dst"] == b"\xff" * 6 and f["src"] == MAC and f["ethertype"] == 0x0806
    assert f["arp"] == (1, 0x0800, 6, 4)
    assert f["op"] == ARPOP_REQUEST
    assert f["sha"] == MAC and f["spa"] == VIP and f["tpa"] == VIP  # sender IP == target IP
    assert f["tha"] == b"\x00" * 6
    assert f["pad"] == b"\x00" * 18


def test_garp_reply_repeats_sender_mac_as_target() -> None:
    # Linux treats a reply as gratuitous only when target MAC == sender MAC.
    f = fields(build_garp(MAC, "198.18.0.100", ARPOP_REPLY))
    assert f["op"] == ARPOP_REPLY
    assert f["sha"] == f["tha"] == MAC
    assert f["spa"] == f["tpa"] == VIP


def test_garp_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_garp(b"\x00" * 5, "198.18.0.100")
    with pytest.raises(ValueError):
        build_garp(MAC, "2001:db8::1")


def test_vip_address_parses_cidr_without_touching_netlink() -> None:
    v = VipAddress("eth0", "198.18.0.100/24")
    assert (v.interface, v.ip, v.prefixlen) == ("eth0", "198.18.0.100", 24)
    assert VipAddress("eth0", "198.18.0.100").prefixlen == 32
    with pytest.raises(ValueError, match="IPv4"):
        VipAddress("eth0", "2001:db8::100/64")
