"""Client limits shared by every listener: connection caps and the per-IP request rate."""

from __future__ import annotations

import dataclasses

from balancer.config import Config, LimitsConfig


class ClientLimits:
    """Counts client connections in total and per IP, and meters requests per IP.

    The rate limit is a token bucket per client IP refilled at `rate_per_ip` tokens per
    second with a burst of one second's worth, so a client may spike briefly but not sustain
    more than the rate. Idle buckets are forgotten by `sweep()`.
    """

    __slots__ = ("config", "total", "per_ip", "_buckets")

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self._buckets: dict[str, list[float]] = {}

    def admit(self, ip: str) -> bool:
        """A new connection from `ip`: may it stay? (If True, call `release()` when it ends.)"""
        cfg = self.config
        if cfg.max_connections and self.total >= cfg.max_connections:
            return False
        n = self.per_ip.get(ip, 0)
        if cfg.max_connections_per_ip and n >= cfg.max_connections_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] = n + 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        n = self.per_ip.get(ip, 0) - 1
        if n > 0:
            self.per_ip[ip] = n
        else:
            self.per_ip.pop(ip, None)

    def retry_after(self, ip: str, now: float) -> float:
        """0 if a request from `ip` may pass now, else seconds until it may."""
        rate = self.config.rate_per_ip
        if not rate:
            return 0.0
        bucket = self._buckets.get(ip)
        burst = max(rate, 1.0)
        if bucket is None:
            self._buckets[ip] = [burst - 1.0, now]
            return 0.0
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / rate

    def sweep(self, now: float) -> None:
        """Forget buckets that have been full for a while (their IPs went quiet)."""
        rate = self.config.rate_per_ip
        if not rate:
            self._buckets.clear()
            return
        idle = max(2.0, 2.0 / rate)
        for ip in [ip for ip, (_, last) in self._buckets.items() if now - last > idle]:
            del self._buckets[ip]


def process_limits(cfg: Config) -> LimitsConfig:
    """The limits one process enforces: `max_connections` is split between the processes
    (each takes ceil(max / workers)); the per-IP caps and rate apply in each process as
    written (a client's connections land on whichever process the kernel picks)."""
    limits = cfg.limits
    if cfg.workers > 1 and limits.max_connections:
        share = -(-limits.max_connections // cfg.workers)
        return dataclasses.replace(limits, max_connections=share)
    return limits
