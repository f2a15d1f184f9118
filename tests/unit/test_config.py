"""Tests of the config loader: defaults, syntaxes, every semantic check with its location."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import trustme
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import balancer.strategies
from balancer.config import (
    MAX_NODE_ID_BYTES,
    AccessLogConfig,
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    ConfigError,
    DiscoveryConfig,
    DnsDiscoveryConfig,
    EtcdDiscoveryConfig,
    HaConfig,
    HaInstanceConfig,
    HealthCheckConfig,
    LimitsConfig,
    ListenerConfig,
    PassiveHealthConfig,
    PoolConfig,
    Problem,
    QueueConfig,
    Route,
    StickyConfig,
    TimeoutsConfig,
    TlsCertificate,
    load,
    parse,
    parse_address,
    parse_duration,
)

REPO = Path(__file__).resolve().parents[2]
# the strategies INTERFACE.md promises; some may not be registered yet while they are written
INTERFACE_STRATEGIES = [
    "consistent_hash",
    "least_connections",
    "least_load",
    "random_two",
    "round_robin",
    "weighted_round_robin",
]

MINIMAL = """\
listeners:
  - name: http
    bind: "127.0.0.1:8080"
    routes: [{pool: web}]
pools:
  web:
    backends:
      - {name: app1, address: "127.0.0.1:9001"}
"""


def problems_of(text: str | bytes, **kwargs: object) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(text, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def line_of(text: str, marker: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if line.rstrip().endswith(marker)]
    assert len(lines) == 1, f"marker {marker!r} must end exactly one line"
    return lines[0]


def expect(
    text: str, location: str, fragment: str, *, marker: str = "# <-", only: bool = True
) -> Problem:
    """Parse `text`; assert a problem at `location`, on the line ending in `marker`, whose
    message contains `fragment` (and, with `only`, that it is the only problem)."""
    text = textwrap.dedent(text)
    found = problems_of(text)
    line = line_of(text, marker)
    listing = "\n".join(str(p) for p in found)
    hits = [p for p in found if p.location == location and p.line == line]
    assert hits, f"no problem at {location} line {line}; got:\n{listing}"
    assert any(fragment in p.message for p in hits), f"{fragment!r} not in:\n{listing}"
    if only:
        assert len(found) == 1, f"expected one problem, got:\n{listing}"
    return hits[0]


@pytest.fixture
def all_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every strategy of INTERFACE.md counts as registered, whichever are written yet."""
    names = sorted(set(balancer.strategies.registered_names()) | set(INTERFACE_STRATEGIES))
    monkeypatch.setattr(balancer.strategies, "registered_names", lambda: names)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A certificate, its key, and a key that does not match it, as files."""
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    site = ca.issue_cert("example.com")
    other = ca.issue_cert("other.example.com")
    paths = {
        "cert": str(directory / "site.pem"),
        "key": str(directory / "site.key"),
        "other_key": str(directory / "other.key"),
    }
    site.cert_chain_pems[0].write_to_path(paths["cert"])
    site.private_key_pem.write_to_path(paths["key"])
    other.private_key_pem.write_to_path(paths["other_key"])
    return paths


# ---------------------------------------------------------------------------------------------
# Defaults and values
# ---------------------------------------------------------------------------------------------


def test_minimal_config_takes_every_default() -> None:
    config = parse(MINIMAL)
    assert config.listeners == (
        ListenerConfig(name="http", bind=Address("127.0.0.1", 8080), routes=(Route(pool="web"),)),
    )
    listener = config.listeners[0]
    assert (listener.mode, listener.pool, listener.tls, listener.redirect_https) == (
        "http",
        None,
        None,
        None,
    )
    pool = config.pools["web"]
    assert pool == PoolConfig(
        name="web", backends=(BackendConfig(name="app1", address=Address("127.0.0.1", 9001)),)
    )
    assert (pool.strategy, pool.hash_key, pool.sticky, pool.health_check) == (
        "round_robin",
        None,
        None,
        None,
    )
    assert pool.passive_health == PassiveHealthConfig()
    assert (pool.slow_start, pool.panic_threshold, pool.retries) == (0.0, 0, 2)
    assert pool.queue == QueueConfig(size=100, timeout=5.0)
    assert pool.backends[0].weight == 1 and pool.backends[0].max_connections == 0
    assert config.admin == AdminConfig(bind=Address("127.0.0.1", 9000), token=None, token_file=None)
    assert config.limits == LimitsConfig(
        max_connections=10000,
        max_connections_per_ip=0,
        max_header_bytes=65536,
        max_headers=100,
        max_body_bytes=0,
        rate_per_ip=0.0,
    )
    assert config.timeouts == TimeoutsConfig(
        connect=2.0,
        backend=30.0,
        client_header=10.0,
        client_idle=60.0,
        drain=30.0,
        upstream_idle=4.0,
    )
    assert config.ha is None
    assert config.access_log == AccessLogConfig(format="plain", path=None)
    assert config.workers == 1
    assert config.source is None


def test_empty_sections_and_nulls_take_defaults() -> None:
    config = parse(
        MINIMAL
        + textwrap.dedent(
            """\
            admin:
            limits: {}
            timeouts:
            access_log: {}
            ha:
            """
        )
    )
    assert config.admin == AdminConfig()
    assert config.limits == LimitsConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.access_log == AccessLogConfig()
    assert config.ha is None


@pytest.mark.parametrize(
    ("sticky", "expected"),
    [
        ("{}", StickyConfig()),
        ("true", StickyConfig()),
        ("false", None),
        ("", None),
        ("{cookie: SRV, ttl: 30m}", StickyConfig(cookie="SRV", ttl=1800.0)),
    ],
)
def test_sticky_forms(sticky: str, expected: StickyConfig | None) -> None:
    text = MINIMAL.replace("  web:\n", f"  web:\n    sticky: {sticky}\n")
    assert parse(text).pools["web"].sticky == expected


def test_section_defaults_when_given_empty() -> None:
    text = MINIMAL.replace(
        "  web:\n", "  web:\n    health_check: {}\n    passive_health: {}\n    queue: {}\n"
    )
    pool = parse(text).pools["web"]
    assert pool.health_check == HealthCheckConfig(
        type="http",
        path="/healthz",
        host=None,
        interval=1.0,
        timeout=0.5,
        rise=2,
        fall=2,
        expect_status=(200, 399),
    )
    assert pool.passive_health == PassiveHealthConfig(
        consecutive_failures=5, ejection_time=10.0, max_ejection_time=300.0, max_ejected_percent=50
    )
    assert pool.queue == QueueConfig()


def test_every_key_is_read(all_strategies: None, certs: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "ha.key"
    key_file.write_bytes(b"secret-ha-key-0123456789")
    token_file = tmp_path / "admin.token"
    token_file.write_text("t0ken\n")
    text = f"""\
workers: 1
listeners:
  - name: https
    bind: "[::]:8443"
    tls:
      min_version: 1.3
      certificates: [{{cert: "{certs["cert"]}", key: "{certs["key"]}"}}]
    routes:
      - {{host: "*.example.com", path_prefix: /img/, pool: api}}
      - {{pool: web}}
  - {{name: redirect, bind: "0.0.0.0:8081", redirect_https: "https://{{host}}:8443"}}
  - {{name: db, bind: "0.0.0.0:15432", mode: tcp, pool: db}}
pools:
  web:
    strategy: consistent_hash
    hash_key: "cookie:session"
    sticky: {{cookie: SRV, ttl: 2h, key_file: sticky.key}}
    health_check:
      {{type: http, path: /ping, host: www.example.com, interval: 2s, timeout: 1s,
       rise: 3, fall: 4, expect_status: 204}}
    passive_health:
      {{consecutive_failures: 0, ejection_time: 1s, max_ejection_time: 1m, max_ejected_percent: 30}}
    slow_start: 1m30s
    panic_threshold: 40
    retries: 0
    queue: {{size: 0, timeout: 250ms}}
    backends:
      - {{name: a, address: "app.internal:80", weight: 1000, max_connections: 7}}
  api:
    strategy: least_load
    health_check: {{expect_status: "200-299"}}
    backends: [{{name: a, address: "[::1]:81"}}]
  db:
    health_check: {{type: tcp}}
    backends: [{{name: pg, address: "127.0.0.1:5432"}}]
admin: {{bind: "0.0.0.0:9000", token_file: admin.token}}
limits:
  {{max_connections: 1, max_connections_per_ip: 2, max_header_bytes: 3, max_headers: 4,
   max_body_bytes: 5, rate_per_ip: 2.5}}
timeouts:
  {{connect: 1s, backend: 2s, client_header: 3s, client_idle: 4s, drain: 5s, upstream_idle: 6s}}
ha:
  node_id: lb1
  interface: eth0
  virtual_ip: "198.18.0.100/24"
  priority: 254
  bind: "198.18.0.11:5405"
  peers: ["198.18.0.12:5405", "[2001:db8::2]:5405"]
  advert_interval: 200ms
  dead_after: 1s
  preempt: false
  auth_key_file: ha.key
  notify: "/usr/local/bin/on-role"
access_log: {{format: json, path: access.log}}
"""
    config = parse(text, base_dir=str(tmp_path))
    assert config.workers == 1
    https, redirect, db = config.listeners
    assert https.bind == Address("::", 8443)
    assert https.tls is not None and https.tls.min_version == "1.3"
    assert https.tls.certificates == (TlsCertificate(cert=certs["cert"], key=certs["key"]),)
    assert https.routes == (
        Route(pool="api", host="*.example.com", path_prefix="/img/"),
        Route(pool="web"),
    )
    assert redirect.redirect_https == "https://{host}:8443" and redirect.routes == ()
    assert (db.mode, db.pool, db.routes) == ("tcp", "db", ())
    web = config.pools["web"]
    assert (web.strategy, web.hash_key) == ("consistent_hash", "cookie:session")
    assert web.sticky == StickyConfig(
        cookie="SRV", ttl=7200.0, key_file=str(tmp_path / "sticky.key")
    )
    assert web.health_check == HealthCheckConfig(
        type="http",
        path="/ping",
        host="www.example.com",
        interval=2.0,
        timeout=1.0,
        rise=3,
        fall=4,
        expect_status=(204, 204),
    )
    assert web.passive_health == PassiveHealthConfig(0, 1.0, 60.0, 30)
    assert (web.slow_start, web.panic_threshold, web.retries) == (90.0, 40, 0)
    assert web.queue == QueueConfig(size=0, timeout=0.25)
    assert web.backends == (BackendConfig("a", Address("app.internal", 80), 1000, 7),)
    api = config.pools["api"]
    assert api.health_check is not None and api.health_check.expect_status == (200, 299)
    assert api.backends[0].address == Address("::1", 81)
    assert config.pools["db"].health_check == HealthCheckConfig(type="tcp")
    assert list(config.pools) == ["web", "api", "db"]
    assert config.admin == AdminConfig(Address("0.0.0.0", 9000), None, str(token_file))
    assert config.limits == LimitsConfig(1, 2, 3, 4, 5, 2.5)
    assert config.timeouts == TimeoutsConfig(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert config.ha == HaConfig(
        node_id="lb1",
        interface="eth0",
        virtual_ip="198.18.0.100/24",
        auth_key_file=str(key_file),
        peers=(Address("198.18.0.12", 5405), Address("2001:db8::2", 5405)),
        priority=254,
        bind=Address("198.18.0.11", 5405),
        advert_interval=0.2,
        dead_after=1.0,
        preempt=False,
        notify="/usr/local/bin/on-role",
    )
    assert config.access_log == AccessLogConfig(format="json", path=str(tmp_path / "access.log"))


def ha_text(body: str) -> str:
    return MINIMAL + "ha:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def test_ha_defaults(tmp_path: Path) -> None:
    (tmp_path / "ha.key").write_bytes(b"k" * 32)
    body = """\
        node_id: lb1
        interface: eth0
        virtual_ip: 198.18.0.100
        peers: ["198.18.0.12:5405"]
        auth_key_file: ha.key
        """
    ha = parse(ha_text(body), base_dir=str(tmp_path)).ha
    assert ha == HaConfig(
        node_id="lb1",
        interface="eth0",
        virtual_ip="198.18.0.100/32",
        auth_key_file=str(tmp_path / "ha.key"),
        peers=(Address("198.18.0.12", 5405),),
        priority=100,
        bind=Address("0.0.0.0", 5405),
        advert_interval=1.0,
        dead_after=3.0,
        preempt=True,
        notify=None,
    )
    # dead_after follows advert_interval when not given
    ha = parse(ha_text(body + "advert_interval: 200ms\n"), base_dir=str(tmp_path)).ha
    assert ha is not None and ha.dead_after == pytest.approx(0.6)


def test_reload_refuses_what_only_a_restart_can_apply(tmp_path: Path) -> None:
    # a reload changing the ha section (or going between one process and several) is
    # rejected with the reason, not applied with those settings silently kept
    from balancer.config import check_reloadable as _check_reloadable

    key = tmp_path / "ha.key"
    key.write_bytes(b"k" * 32)
    old = parse(ha_text(ha_body(str(key), priority="150")))
    _check_reloadable(old, parse(ha_text(ha_body(str(key), priority="150"))))
    with pytest.raises(ConfigError) as e:
        _check_reloadable(old, parse(ha_text(ha_body(str(key), priority="100"))))
    assert [(p.location, "a restart" in p.message) for p in e.value.problems] == [("ha", True)]
    with pytest.raises(ConfigError) as e:
        _check_reloadable(old, parse(MINIMAL + "workers: 2\n"))
    assert [p.location for p in e.value.problems] == ["workers", "ha"]


def test_access_log_off_unquoted_is_off() -> None:
    # YAML 1.1 reads `off` as false; the operator meant the format
    assert parse(MINIMAL + "access_log: {format: off}\n").access_log.format == "off"


def test_yaml_anchors_and_merge_keys() -> None:
    text = """\
checks: &checks {interval: 2s, timeout: 1s}
"""
    # an unknown top-level key holding the anchor is still an error; merges work inside pools
    assert [p.location for p in problems_of(text + MINIMAL)] == ["checks"]
    text = MINIMAL.replace(
        "  web:\n",
        "  base: &base\n    health_check: &hc {interval: 2s, rise: 5}\n"
        "    backends: [{name: b, address: '127.0.0.1:1'}]\n"
        "  web:\n    <<: *base\n    health_check: {<<: *hc, rise: 1}\n",
    )
    pools = parse(text).pools
    assert pools["web"].health_check == HealthCheckConfig(interval=2.0, rise=1)
    assert pools["web"].backends[0].name == "app1"
    assert pools["base"].health_check == HealthCheckConfig(interval=2.0, rise=5)


# ---------------------------------------------------------------------------------------------
# Durations and addresses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1h30m", 5400.0),
        ("7d", 7 * 86400.0),  # days, as in nginx and HAProxy (a sticky ttl of a week)
        ("1d12h", 129600.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        (" 3s ", 3.0),
        ("0", 0.0),
        ("0s", 0.0),
        (0, 0.0),
        (0.0, 0.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [5, 1.5, "5", "2.5", -3])
def test_parse_duration_bare_number_needs_unit(value: object) -> None:
    with pytest.raises(ValueError, match="a unit is required"):
        parse_duration(value)


@pytest.mark.parametrize(
    "value", ["", "s", "2 seconds", "2x", "-1s", "1.s", "ms5", "1e3s", True, None, [1], "nan"]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "h")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        ("0.0.0.0:1", Address("0.0.0.0", 1)),
        ("example.com:65535", Address("example.com", 65535)),
        ("app_1.internal.:80", Address("app_1.internal.", 80)),
        ("localhost:9000", Address("localhost", 9000)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[::]:443", Address("::", 443)),
        ("[2001:db8::7]:80", Address("2001:db8::7", 80)),
        ("[fe80::1%eth0]:80", Address("fe80::1%eth0", 80)),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address


def test_address_str_round_trips() -> None:
    for text in ("127.0.0.1:8080", "[::1]:8080", "example.com:1"):
        assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("127.0.0.1", "missing port"),
        ("::1:8080", "needs brackets"),
        ("127.0.0.1:0", "out of range 1..65535"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:", "invalid port"),
        ("127.0.0.1:http", "invalid port"),
        (":8080", "host is missing"),
        ("[1.2.3.4]:80", "brackets are only for IPv6"),
        ("[::1]8080", "expected"),
        ("[nothost]:80", "not an IPv6 address"),
        ("999.1.1.1:80", "not a valid IPv4"),
        ("bad host:80", "not a valid IP address or host name"),
        ("-bad.example:80", "not a valid"),
        (8080, "got an integer"),
        (None, "got nothing"),
    ],
)
def test_parse_address_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_address(value)


def test_parse_address_port_zero_only_when_allowed() -> None:
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == Address("127.0.0.1", 0)
    # a listener may bind port 0 (any free port); a backend never has port 0
    assert parse(MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0")).listeners[0].bind.port == 0
    expect(
        """\
        listeners: [{name: http, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
        pools:
          web:
            backends:
              - {name: app1, address: "127.0.0.1:0"}   # <-
        """,
        "pools.web.backends[0].address",
        "port 0 is out of range 1..65535",
    )


# ---------------------------------------------------------------------------------------------
# Problem and ConfigError
# ---------------------------------------------------------------------------------------------


def test_problem_str_omits_unknown_parts() -> None:
    assert str(Problem("pools.web", "bad", 3, "lb.yaml")) == "lb.yaml:3: pools.web: bad"
    assert str(Problem("pools.web", "bad", None, "lb.yaml")) == "lb.yaml: pools.web: bad"
    assert str(Problem("", "bad", 3, "lb.yaml")) == "lb.yaml:3: bad"
    assert str(Problem("pools.web", "bad", 3)) == "3: pools.web: bad"
    assert str(Problem("pools.web", "bad")) == "pools.web: bad"


def test_config_error_lists_one_problem_per_line() -> None:
    error = ConfigError([Problem("a", "x", 1, "f"), Problem("b", "y", 2, "f")])
    assert str(error) == "f:1: a: x\nf:2: b: y"
    assert len(error.problems) == 2


def test_problems_carry_the_source_name() -> None:
    found = problems_of("listeners: 5\n", source="lb.yaml")
    assert [str(p) for p in found] == [
        "lb.yaml: pools: at least one pool is required",
        "lb.yaml:1: listeners: expected a list of listeners, got an integer",
    ]


# ---------------------------------------------------------------------------------------------
# Document-level problems
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file(text: str) -> None:
    (problem,) = problems_of(text)
    assert problem.location == "" and problem.line is None
    assert "empty" in problem.message


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "a list"), ("hello\n", "a string"), ("42\n", "an integer")]
)
def test_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    (problem,) = problems_of(text)
    assert problem.line == 1
    assert problem.message == (
        f"the top level must be a mapping (listeners:, pools:, ...), got {kind}"
    )


def test_yaml_syntax_error_is_located() -> None:
    text = MINIMAL + "admin:\n  bind: [unclosed\n"
    (problem,) = problems_of(text, source="lb.yaml")
    # the flow sequence opened on line 10 is still open at the end of the stream
    assert problem.line == 11 and problem.location == ""
    assert "column" in problem.message and "syntax" in problem.message
    (problem,) = problems_of("pools:\n  web: a: b\n")
    assert (problem.line, problem.message) == (
        2,
        "YAML syntax error at column 9: mapping values are not allowed here",
    )


def test_tab_indentation_is_a_located_syntax_error() -> None:
    (problem,) = problems_of("pools:\n\tweb: {}\n")
    assert problem.line == 2 and "syntax error at column 1" in problem.message


def test_several_documents_are_refused() -> None:
    (problem,) = problems_of(MINIMAL + "---\n" + MINIMAL)
    assert problem.line == 9 and "single document" in problem.message


def test_control_character_is_located() -> None:
    (problem,) = problems_of("pools:\n  web: \x00\n")
    assert problem.line == 2 and "invalid character" in problem.message


def test_non_utf8_bytes_are_located() -> None:
    (problem,) = problems_of(b"listeners:\n  - name: caf\xe9\n")
    assert problem.line == 2
    assert problem.message == "not valid UTF-8: byte 0xe9 at column 14"


def test_utf8_bytes_with_bom_parse() -> None:
    assert parse(b"\xef\xbb\xbf" + MINIMAL.encode()).pools["web"].name == "web"


def test_deep_nesting_does_not_crash() -> None:
    text = "pools: " + "[" * 5000 + "]" * 5000 + "\n"
    assert problems_of(text)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("!!int abc", "invalid value 'abc'"), ("2001-13-45", "invalid value"), ("!foo 3", "!foo")],
)
def test_odd_yaml_values_are_problems(value: str, fragment: str) -> None:
    found = problems_of(
        MINIMAL.replace('"127.0.0.1:9001"}', f'"127.0.0.1:9001", weight: {value}}}')
    )
    assert [(p.location, p.line) for p in found] == [("pools.web.backends[0].weight", 8)]
    assert fragment in found[0].message


def test_unknown_key_with_suggestion() -> None:
    problem = expect(
        """\
        listeners: [{name: http, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
        pools:
          web:
            strategyy: round_robin   # <-
            backends: [{name: app1, address: "127.0.0.1:9001"}]
        """,
        "pools.web.strategyy",
        "unknown key 'strategyy'",
    )
    assert problem.message == "unknown key 'strategyy' (did you mean 'strategy'?)"


def test_unknown_key_without_close_match() -> None:
    problem = expect(MINIMAL + "frobnicate: 1   # <-\n", "frobnicate", "unknown key")
    assert problem.message == "unknown key 'frobnicate'"


def test_non_string_key() -> None:
    expect(MINIMAL + "limits: {1: 2}   # <-\n", "limits", "a key must be a string, got an integer")


def test_duplicate_key_is_reported_at_the_second() -> None:
    problem = expect(
        """\
        listeners: [{name: http, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
        pools:
          web:
            backends: [{name: app1, address: "127.0.0.1:9001"}]
            retries: 1
            retries: 3   # <-
        """,
        "pools.web.retries",
        "duplicate key 'retries' (first at line 5)",
    )
    assert "silently" in problem.message


def test_duplicate_pool_name() -> None:
    expect(
        """\
        listeners: [{name: http, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
        pools:
          web:
            backends: [{name: app1, address: "127.0.0.1:9001"}]
          web:   # <-
            backends: [{name: app2, address: "127.0.0.1:9002"}]
        """,
        "pools.web",
        "duplicate key 'web' (first at line 3)",
    )


def test_several_problems_are_reported_together_in_line_order() -> None:
    text = textwrap.dedent(
        """\
        listeners:
          - name: http
            bind: "127.0.0.1:80800"   # <1
            routes: [{pool: nope}]    # <2
        pools:
          web:
            strategy: round_robin
            health_check: {interval: 1, timeout: 2s}   # <3
            backends:
              - {name: app1, address: "127.0.0.1:9001", weight: "abc"}   # <4
              - {name: app1, address: "127.0.0.1:9002"}                  # <5
        timeouts: {drain: 0s}   # <6
        """
    )
    found = problems_of(text)
    assert [(p.location, p.line) for p in found] == [
        ("listeners[0].bind", line_of(text, "# <1")),
        ("listeners[0].routes[0].pool", line_of(text, "# <2")),
        ("pools.web.health_check.interval", line_of(text, "# <3")),
        ("pools.web.backends[0].weight", line_of(text, "# <4")),
        ("pools.web.backends[1].name", line_of(text, "# <5")),
        ("timeouts.drain", line_of(text, "# <6")),
    ]
    assert found[1].message == "pool 'nope' is not defined (pools: web)"
    assert found[2].message.startswith("a unit is required")
    assert found[3].message == "expected an integer 1..1000, got a string"
    assert found[4].message.startswith("duplicate backend name 'app1'")
    assert found[5].message == "must be greater than 0"


# ---------------------------------------------------------------------------------------------
# Listeners
# ---------------------------------------------------------------------------------------------

POOLS = """\
pools:
  web:
    backends: [{name: app1, address: "127.0.0.1:9001"}]
  db:
    backends: [{name: pg, address: "127.0.0.1:5432"}]
"""


def listeners(body: str) -> str:
    return "listeners:\n" + textwrap.indent(textwrap.dedent(body), "  ") + POOLS


def test_listeners_required() -> None:
    (problem,) = problems_of(POOLS)
    assert (problem.location, problem.line) == ("listeners", None)
    assert problem.message == "at least one listener is required"
    expect("listeners: []   # <-\n" + POOLS, "listeners", "at least one listener is required")
    expect("listeners: {}   # <-\n" + POOLS, "listeners", "expected a list of listeners")


def test_pools_required() -> None:
    listener = 'listeners: [{name: http, bind: "127.0.0.1:8080", redirect_https: "https://x"}]\n'
    (problem,) = problems_of(listener)
    assert (problem.location, problem.line, problem.message) == (
        "pools",
        None,
        "at least one pool is required",
    )
    expect(listener + "pools: {}   # <-\n", "pools", "at least one pool is required")
    expect(listener + "pools: [web]   # <-\n", "pools", "expected a mapping of pool names")


def test_listener_name_and_bind_required() -> None:
    text = listeners("- {routes: [{pool: web}]}   # <-\n")
    found = problems_of(text)
    line = line_of(text, "# <-")
    assert [(p.location, p.line, p.message) for p in found] == [
        ("listeners[0].name", line, "'name' is required"),
        ("listeners[0].bind", line, "'bind' is required"),
    ]


def test_duplicate_listener_names() -> None:
    expect(
        listeners(
            """\
            - {name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}
            - {name: web, bind: "127.0.0.1:8081", routes: [{pool: web}]}   # <-
            """
        ),
        "listeners[1].name",
        "duplicate listener name 'web' (also listeners[0])",
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "[::]:8080"),
    ],
)
def test_listener_binds_must_not_collide(first: str, second: str) -> None:
    expect(
        listeners(
            f"""\
            - {{name: a, bind: "{first}", routes: [{{pool: web}}]}}
            - {{name: b, bind: "{second}", routes: [{{pool: web}}]}}   # <-
            """
        ),
        "listeners[1].bind",
        "is already bound by listeners[0].bind",
    )


def test_distinct_binds_and_port_zero_do_not_collide() -> None:
    config = parse(
        listeners(
            """\
            - {name: a, bind: "127.0.0.1:8080", routes: [{pool: web}]}
            - {name: b, bind: "127.0.0.2:8080", routes: [{pool: web}]}
            - {name: c, bind: "127.0.0.1:0", routes: [{pool: web}]}
            - {name: d, bind: "127.0.0.1:0", routes: [{pool: web}]}
            """
        )
    )
    assert len(config.listeners) == 4


def test_listener_bind_must_not_collide_with_admin() -> None:
    expect(
        listeners('- {name: a, bind: "0.0.0.0:9000", routes: [{pool: web}]}   # <-\n'),
        "listeners[0].bind",
        "0.0.0.0:9000 is already bound by admin.bind",
    )


def test_http_listener_needs_routes_or_redirect() -> None:
    expect(
        listeners('- {name: a, bind: "127.0.0.1:8080"}   # <-\n'),
        "listeners[0]",
        "an http listener needs routes (or redirect_https)",
    )


def test_http_listener_not_both_routes_and_redirect() -> None:
    expect(
        listeners(
            """\
            - name: a
              bind: "127.0.0.1:8080"
              routes: [{pool: web}]
              redirect_https: "https://{host}"   # <-
            """
        ),
        "listeners[0].redirect_https",
        "either routes or redirect_https, not both",
    )


def test_http_listener_with_pool() -> None:
    expect(
        listeners(
            """\
            - name: a
              bind: "127.0.0.1:8080"
              routes: [{pool: web}]
              pool: web   # <-
            """
        ),
        "listeners[0].pool",
        "'pool' is for tcp listeners",
    )


def test_empty_routes() -> None:
    expect(
        listeners('- {name: a, bind: "127.0.0.1:8080", routes: []}   # <-\n'),
        "listeners[0].routes",
        "routes must not be empty",
    )


def test_tcp_listener_needs_pool() -> None:
    expect(
        listeners('- {name: db, bind: "127.0.0.1:15432", mode: tcp}   # <-\n'),
        "listeners[0].pool",
        "a tcp listener needs 'pool'",
    )


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("routes", "[{pool: web}]", "has no routes"),
        ("tls", "{certificates: []}", "does not terminate TLS"),
        ("redirect_https", '"https://{host}"', "redirect_https is for http listeners"),
    ],
)
def test_tcp_listener_refuses_http_keys(key: str, value: str, fragment: str) -> None:
    expect(
        listeners(
            f"""\
            - name: db
              bind: "127.0.0.1:15432"
              mode: tcp
              pool: db
              {key}: {value}   # <-
            """
        ),
        f"listeners[0].{key}",
        fragment,
    )


def test_listener_mode() -> None:
    expect(
        listeners('- {name: a, bind: "127.0.0.1:8080", mode: udp, pool: db}   # <-\n'),
        "listeners[0].mode",
        "must be one of http | tcp, got 'udp'",
    )


def test_route_pool_must_exist() -> None:
    problem = expect(
        listeners(
            """\
            - name: a
              bind: "127.0.0.1:8080"
              routes:
                - {path_prefix: /api/, pool: wbe}   # <-
            """
        ),
        "listeners[0].routes[0].pool",
        "pool 'wbe' is not defined",
    )
    assert problem.message == "pool 'wbe' is not defined (did you mean 'web'?) (pools: db, web)"


def test_tcp_pool_must_exist() -> None:
    expect(
        listeners(
            """\
            - name: db
              bind: "127.0.0.1:15432"
              mode: tcp
              pool: postgres   # <-
            """
        ),
        "listeners[0].pool",
        "pool 'postgres' is not defined",
    )


def test_route_to_a_pool_with_problems_is_not_flagged() -> None:
    text = (
        'listeners: [{name: a, bind: "127.0.0.1:8080", routes: [{pool: web}]}]\n'
        "pools:\n  web: {backends: []}   # <-\n"
    )
    expect(text, "pools.web.backends", "a pool needs at least one backend")


@pytest.mark.parametrize(
    ("route", "location", "fragment"),
    [
        ("{host: 5, pool: web}", "host", "expected a string, got an integer"),
        ("{host: [a], pool: web}", "host", "expected a string, got a list"),
        ("{host: 'a b', pool: web}", "host", "invalid host"),
        ("{host: '', pool: web}", "host", "must not be empty"),
        ("{path_prefix: api/, pool: web}", "path_prefix", "must start with '/'"),
        ("{path_prefix: 3, pool: web}", "path_prefix", "expected a string"),
        ("{host: example.com}", "pool", "'pool' is required"),
        ("{pool: web, path: /x}", "path", "unknown key 'path'"),
        ("web", "", "expected a mapping, got a string"),
    ],
)
def test_route_fields(route: str, location: str, fragment: str) -> None:
    loc = "listeners[0].routes[0]" + (f".{location}" if location else "")
    expect(
        listeners(
            f"""\
            - name: a
              bind: "127.0.0.1:8080"
              routes:
                - {route}   # <-
            """
        ),
        loc,
        fragment,
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"http://{host}:8443"', "must be an https:// URL"),
        ('"https://{host}{path}"', "the only placeholder allowed is {host}"),
        ('"https://{host!r}"', "the only placeholder allowed is {host}"),
        ('"https://{host"', "invalid template"),
        ('"https://"', "names no host"),
        ("true", "expected a string"),
    ],
)
def test_redirect_https_template(value: str, fragment: str) -> None:
    expect(
        listeners(f'- {{name: a, bind: "127.0.0.1:8080", redirect_https: {value}}}   # <-\n'),
        "listeners[0].redirect_https",
        fragment,
    )


def test_redirect_https_fixed_host_is_fine() -> None:
    config = parse(
        listeners('- {name: a, bind: "127.0.0.1:8080", redirect_https: "https://example.com"}\n')
    )
    assert config.listeners[0].redirect_https == "https://example.com"


# ---------------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------------


def tls_listener(tls: str) -> str:
    return listeners(
        f"""\
        - name: https
          bind: "127.0.0.1:8443"
          routes: [{{pool: web}}]
          tls: {tls}
        """
    )


def test_tls_with_real_certificate(certs: dict[str, str]) -> None:
    config = parse(
        tls_listener(f'{{certificates: [{{cert: "{certs["cert"]}", key: "{certs["key"]}"}}]}}')
    )
    tls = config.listeners[0].tls
    assert tls is not None and tls.min_version == "1.2"
    assert tls.certificates == (TlsCertificate(certs["cert"], certs["key"]),)


def test_tls_needs_a_certificate() -> None:
    text = tls_listener("{min_version: '1.2'}   # <-")
    expect(text, "listeners[0].tls.certificates", "at least one certificate is required")
    text = tls_listener("{certificates: []}   # <-")
    expect(text, "listeners[0].tls.certificates", "at least one certificate is required")


def test_tls_files_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    text = textwrap.dedent(
        tls_listener(f'{{certificates: [{{cert: "{missing}", key: "{tmp_path}"}}]}}   # <-')
    )
    found = problems_of(text)
    line = line_of(text, "# <-")
    assert [(p.location, p.line) for p in found] == [
        ("listeners[0].tls.certificates[0].cert", line),
        ("listeners[0].tls.certificates[0].key", line),
    ]
    assert found[0].message == f"cannot read {missing}: No such file or directory"
    assert found[1].message == f"cannot read {tmp_path}: Is a directory"


def test_tls_key_must_match_certificate(certs: dict[str, str]) -> None:
    text = tls_listener(
        f'{{certificates: [{{cert: "{certs["cert"]}", key: "{certs["other_key"]}"}}]}}   # <-'
    )
    problem = expect(text, "listeners[0].tls.certificates[0]", "does not match")
    assert (
        problem.message
        == f"the key {certs['other_key']} does not match the certificate {certs['cert']}"
    )


def test_tls_file_that_is_not_pem(certs: dict[str, str]) -> None:
    text = tls_listener(
        f'{{certificates: [{{cert: "{certs["key"]}", key: "{certs["key"]}"}}]}}   # <-'
    )
    expect(text, "listeners[0].tls.certificates[0]", "cannot load certificate")


def test_tls_min_version(certs: dict[str, str]) -> None:
    pair = f'[{{cert: "{certs["cert"]}", key: "{certs["key"]}"}}]'
    for written, expected in (("1.3", "1.3"), ('"1.3"', "1.3"), ("1.2", "1.2")):
        config = parse(tls_listener(f"{{min_version: {written}, certificates: {pair}}}"))
        assert config.listeners[0].tls is not None
        assert config.listeners[0].tls.min_version == expected
    text = tls_listener(f'{{min_version: "1.1", certificates: {pair}}}   # <-')
    expect(text, "listeners[0].tls.min_version", "must be one of 1.2 | 1.3")


# ---------------------------------------------------------------------------------------------
# Pools and backends
# ---------------------------------------------------------------------------------------------

LISTENER = 'listeners: [{name: http, bind: "127.0.0.1:8080", routes: [{pool: web}]}]\n'


def pool(body: str) -> str:
    return LISTENER + "pools:\n  web:\n" + textwrap.indent(textwrap.dedent(body), "    ")


ONE_BACKEND = 'backends: [{name: app1, address: "127.0.0.1:9001"}]\n'


@pytest.mark.parametrize(
    ("backends", "fragment"),
    [
        ("", "a pool needs at least one backend"),
        ("[]", "a pool needs at least one backend"),
        ("{}", "expected a list of backends, got a mapping"),
        ("app1", "expected a list of backends, got a string"),
    ],
)
def test_pool_needs_backends(backends: str, fragment: str) -> None:
    expect(
        pool(f"strategy: round_robin\nbackends: {backends}   # <-\n"),
        "pools.web.backends",
        fragment,
    )


def test_pool_without_backends_key() -> None:
    expect(
        LISTENER + "pools:\n  web: {strategy: round_robin}   # <-\n",
        "pools.web.backends",
        "a pool needs at least one backend",
    )


def test_pool_must_be_a_mapping() -> None:
    expect(
        LISTENER + "pools:\n  web: [app1]   # <-\n", "pools.web", "expected a mapping, got a list"
    )


def test_pool_name_characters() -> None:
    text = (
        LISTENER.replace("{pool: web}", "{pool: 'w b'}")
        + "pools:\n  w b:   # <-\n    "
        + ONE_BACKEND
    )
    expect(text, "pools.w b", "invalid pool name 'w b'")


def test_duplicate_backend_names_and_addresses() -> None:
    text = textwrap.dedent(
        pool(
            """\
            backends:
              - {name: app1, address: "127.0.0.1:9001"}
              - {name: app1, address: "127.0.0.1:9002"}   # <1
              - {name: app3, address: "127.0.0.1:9001"}   # <2
            """
        )
    )
    found = problems_of(text)
    assert [(p.location, p.line, p.message) for p in found] == [
        (
            "pools.web.backends[1].name",
            line_of(text, "# <1"),
            "duplicate backend name 'app1' in this pool (also pools.web.backends[0])",
        ),
        (
            "pools.web.backends[2].address",
            line_of(text, "# <2"),
            "duplicate backend address 127.0.0.1:9001 in this pool (also pools.web.backends[0])",
        ),
    ]


def test_same_backend_in_two_pools_is_fine() -> None:
    text = pool(ONE_BACKEND) + "  api:\n    " + ONE_BACKEND
    assert set(parse(text).pools) == {"web", "api"}


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        (
            "weight: 0",
            "weight 0 is not allowed: to stop sending traffic to a backend, set its state to disabled via the admin API",
        ),
        ("weight: 1001", "must be 1..1000, got 1001"),
        ("weight: -1", "must be 1..1000, got -1"),
        ('weight: "abc"', "expected an integer 1..1000, got a string"),
        ("weight: 1.5", "expected an integer 1..1000, got a number"),
        ("weight: true", "expected an integer 1..1000, got a boolean"),
        ("max_connections: -1", "must be >= 0, got -1"),
        ("max_connections: many", "expected an integer >= 0, got a string"),
        ("address: 9001", 'expected "host:port" (a string), got an integer'),
        ("address: '[::1]'", 'expected "[IPv6]:port"'),
        ("name: 'app 1'", "invalid name 'app 1'"),
        ("name: 7", "expected a string, got an integer (put it in quotes)"),
        ("nmae: app1", "unknown key 'nmae' (did you mean 'name'?)"),
    ],
)
def test_backend_fields(field: str, fragment: str) -> None:
    key = field.split(":")[0]
    if key == "nmae":
        backend = f'{{{field}, name: app1, address: "127.0.0.1:9001"}}'
    elif key in ("name", "address"):
        other = 'address: "127.0.0.1:9001"' if key == "name" else "name: app1"
        backend = f"{{{other}, {field}}}"
    else:
        backend = f'{{name: app1, address: "127.0.0.1:9001", {field}}}'
    expect(pool(f"backends:\n  - {backend}   # <-\n"), f"pools.web.backends[0].{key}", fragment)


def test_backend_name_and_address_required() -> None:
    text = textwrap.dedent(pool("backends:\n  - {weight: 2}   # <-\n"))
    line = line_of(text, "# <-")
    assert [(p.location, p.line, p.message) for p in problems_of(text)] == [
        ("pools.web.backends[0].name", line, "'name' is required"),
        ("pools.web.backends[0].address", line, "'address' is required"),
    ]


def test_backend_entry_must_be_a_mapping() -> None:
    expect(
        pool('backends:\n  - "127.0.0.1:9001"   # <-\n'),
        "pools.web.backends[0]",
        "expected a mapping, got a string",
    )


def test_unknown_strategy_lists_the_registered_ones() -> None:
    names = balancer.strategies.registered_names()
    problem = expect(
        pool("strategy: round_robbin   # <-\n" + ONE_BACKEND),
        "pools.web.strategy",
        "unknown strategy",
    )
    assert problem.message == (
        f"unknown strategy 'round_robbin' (did you mean 'round_robin'?); valid: {', '.join(names)}"
    )


def test_strategy_must_be_a_string() -> None:
    expect(
        pool("strategy: [round_robin]   # <-\n" + ONE_BACKEND), "pools.web.strategy", "got a list"
    )


def test_registered_plugin_strategy_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balancer.strategies, "registered_names", lambda: ["mine", "round_robin"])
    assert parse(pool("strategy: mine\n" + ONE_BACKEND)).pools["web"].strategy == "mine"


@pytest.mark.parametrize("hash_key", ["header:X-User", "cookie:session", "path", "client_ip"])
def test_consistent_hash_keys(all_strategies: None, hash_key: str) -> None:
    text = pool(f"strategy: consistent_hash\nhash_key: '{hash_key}'\n" + ONE_BACKEND)
    assert parse(text).pools["web"].hash_key == hash_key


def test_consistent_hash_needs_hash_key(all_strategies: None) -> None:
    expect(
        pool("strategy: consistent_hash   # <-\n" + ONE_BACKEND),
        "pools.web.hash_key",
        "strategy consistent_hash needs hash_key: header:NAME, cookie:NAME, path or client_ip",
    )


@pytest.mark.parametrize("hash_key", ["header:", "header:X User", "cookie", "query:x", "ip", "5"])
def test_consistent_hash_key_form(all_strategies: None, hash_key: str) -> None:
    expect(
        pool(f"strategy: consistent_hash\nhash_key: '{hash_key}'   # <-\n" + ONE_BACKEND),
        "pools.web.hash_key",
        f"invalid hash_key '{hash_key}': expected header:NAME, cookie:NAME, path or client_ip",
    )


@pytest.mark.parametrize("strategy", ["", "strategy: round_robin\n"])
def test_hash_key_on_other_strategies(strategy: str) -> None:
    expect(
        pool(strategy + "hash_key: path   # <-\n" + ONE_BACKEND),
        "pools.web.hash_key",
        "hash_key only applies to strategy consistent_hash, not round_robin",
    )


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        ("slow_start: -1s", "cannot be negative"),
        ("slow_start: 10", "a unit is required"),
        ("panic_threshold: 101", "must be 0..100, got 101"),
        ("panic_threshold: -1", "must be 0..100"),
        ("retries: 11", "must be 0..10, got 11"),
        ("retries: two", "expected an integer 0..10"),
    ],
)
def test_pool_scalars(field: str, fragment: str) -> None:
    key = field.split(":")[0]
    expect(pool(f"{field}   # <-\n" + ONE_BACKEND), f"pools.web.{key}", fragment)


@pytest.mark.parametrize(
    ("section", "location", "fragment"),
    [
        ("queue: {size: -1}", "queue.size", "must be >= 0"),
        ("queue: {timeout: 0s}", "queue.timeout", "must be greater than 0"),
        ("queue: {length: 5}", "queue.length", "unknown key 'length'"),
        ("queue: 5", "queue", "expected a mapping, got an integer"),
        (
            "passive_health: {consecutive_failures: -1}",
            "passive_health.consecutive_failures",
            "must be >= 0",
        ),
        (
            "passive_health: {ejection_time: 0s}",
            "passive_health.ejection_time",
            "must be greater than 0",
        ),
        (
            "passive_health: {max_ejected_percent: 101}",
            "passive_health.max_ejected_percent",
            "must be 0..100",
        ),
        (
            "passive_health: {ejection_time: 10m}",
            "passive_health.max_ejection_time",
            "must be at least ejection_time (600s)",
        ),
        ("passive_health: []", "passive_health", "expected a mapping, got a list"),
    ],
)
def test_pool_sections(section: str, location: str, fragment: str) -> None:
    expect(pool(f"{section}   # <-\n" + ONE_BACKEND), f"pools.web.{location}", fragment)


# ---------------------------------------------------------------------------------------------
# Health checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        ("type: udp", "must be one of http | tcp | grpc, got 'udp'"),
        ("rise: 0", "must be >= 1, got 0"),
        ("fall: 0", "must be >= 1, got 0"),
        ("interval: 0s", "must be greater than 0"),
        ("interval: 0", "must be greater than 0"),
        ("timeout: 0ms", "must be greater than 0"),
        ("interval: 5", "a unit is required: write '5s' for seconds or '5ms' for milliseconds"),
        ("path: healthz", "must start with '/', got 'healthz'"),
        ("expect_status: 99", "status codes are 100..599"),
        ("expect_status: '399-200'", "is empty"),
        ("expect_status: 2xx", "expected a status such as 200"),
        ("host: 'a/b'", "invalid host"),
    ],
)
def test_health_check_fields(field: str, fragment: str) -> None:
    key = field.split(":")[0]
    expect(
        pool(f"health_check:\n  {field}   # <-\n" + ONE_BACKEND),
        f"pools.web.health_check.{key}",
        fragment,
    )


def test_health_check_timeout_not_above_interval() -> None:
    problem = expect(
        pool("health_check:\n  interval: 1s\n  timeout: 1500ms   # <-\n" + ONE_BACKEND),
        "pools.web.health_check.timeout",
        "must not exceed interval",
    )
    assert problem.message == (
        "timeout (1.5s) must not exceed interval (1s): a check would still be running when the"
        " next one starts"
    )
    # against the default interval of 1s too
    expect(
        pool("health_check: {timeout: 2s}   # <-\n" + ONE_BACKEND),
        "pools.web.health_check.timeout",
        "timeout (2s) must not exceed interval (1s)",
    )
    # equal is fine
    check = (
        parse(pool("health_check: {interval: 1s, timeout: 1s}\n" + ONE_BACKEND))
        .pools["web"]
        .health_check
    )
    assert check is not None and check.timeout == check.interval == 1.0


def test_health_check_unset_timeout_follows_a_short_interval() -> None:
    # the operator wrote only `interval: 200ms`: the default timeout (500ms) must not turn
    # that into an error about a key they never set
    check = parse(pool("health_check: {interval: 200ms}\n" + ONE_BACKEND)).pools["web"].health_check
    assert check is not None and check.interval == check.timeout == 0.2
    # a longer interval keeps the default timeout
    check = parse(pool("health_check: {interval: 5s}\n" + ONE_BACKEND)).pools["web"].health_check
    assert check is not None and check.timeout == 0.5


# ---------------------------------------------------------------------------------------------
# Sticky
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sticky", "location", "fragment"),
    [
        ("{cookie: 'my cookie'}", "cookie", "invalid cookie name 'my cookie'"),
        ("{cookie: 'a;b'}", "cookie", "invalid cookie name"),
        ("{cookie: 'x=y'}", "cookie", "invalid cookie name"),
        ("{ttl: 0s}", "ttl", "must be greater than 0"),
        ("{ttl: 3600}", "ttl", "a unit is required"),
        (
            "{key_file: /nonexistent-dir/sticky.key}",
            "key_file",
            "directory /nonexistent-dir does not exist",
        ),
        ("{cokie: X}", "cokie", "unknown key 'cokie' (did you mean 'cookie'?)"),
        ("yes please", "", "expected a mapping, true or false, got a string"),
        ("[a]", "", "expected a mapping, got a list"),
    ],
)
def test_sticky_fields(sticky: str, location: str, fragment: str) -> None:
    loc = "pools.web.sticky" + (f".{location}" if location else "")
    expect(pool(f"sticky: {sticky}   # <-\n" + ONE_BACKEND), loc, fragment)


def test_sticky_key_file_that_holds_no_key_is_a_located_problem(tmp_path: Path) -> None:
    # `balancer check` passed such a file and `balancer run` then died in a traceback
    (tmp_path / "bad.key").write_text("# only a comment\n")
    problem = expect(
        pool(f"sticky: {{key_file: {tmp_path}/bad.key}}   # <-\n" + ONE_BACKEND),
        "pools.web.sticky.key_file",
        "bad.key: no key in the file",
    )
    assert problem.line is not None
    # the key kept beside the config when key_file is not set is checked the same way
    (tmp_path / "sticky.key").write_text("\n")
    found = problems_of(pool("sticky: {cookie: SRV}\n" + ONE_BACKEND), base_dir=str(tmp_path))
    assert [p.location for p in found] == ["pools.web.sticky"]
    assert "sticky.key: no key in the file" in found[0].message
    # a passphrase is a key (weak ones are logged when the daemon loads them)
    (tmp_path / "pass.key").write_text("not a key!\n")
    cfg = parse(pool(f"sticky: {{key_file: {tmp_path}/pass.key}}\n" + ONE_BACKEND))
    assert cfg.pools["web"].sticky is not None
    # a raw binary key (as `openssl rand 32 > key`, like the HA auth_key_file) is a key
    (tmp_path / "raw.key").write_bytes(b"\xff\x00" * 16)
    cfg = parse(pool(f"sticky: {{key_file: {tmp_path}/raw.key}}\n" + ONE_BACKEND))
    sticky = cfg.pools["web"].sticky
    assert sticky is not None and sticky.key_file == str(tmp_path / "raw.key")


# ---------------------------------------------------------------------------------------------
# Admin, limits, timeouts, access log, workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bind", ["0.0.0.0:9000", "[::]:9000", "198.18.0.5:9000", "admin.example.com:9000"]
)
def test_admin_off_loopback_needs_a_token(bind: str) -> None:
    problem = expect(
        MINIMAL + f'admin:\n  bind: "{bind}"   # <-\n', "admin.bind", "needs token or token_file"
    )
    assert "least privilege" in problem.message


@pytest.mark.parametrize(
    "bind", ["127.0.0.1:9000", "127.0.0.2:9000", "[::1]:9000", "localhost:9000"]
)
def test_admin_on_loopback_needs_no_token(bind: str) -> None:
    assert parse(MINIMAL + f'admin: {{bind: "{bind}"}}\n').admin.token is None


def test_admin_token(tmp_path: Path) -> None:
    config = parse(MINIMAL + 'admin: {bind: "0.0.0.0:9000", token: s3cret}\n')
    assert config.admin == AdminConfig(Address("0.0.0.0", 9000), "s3cret", None)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    config = parse(MINIMAL + f'admin: {{bind: "0.0.0.0:9000", token_file: "{token_file}"}}\n')
    assert config.admin == AdminConfig(Address("0.0.0.0", 9000), None, str(token_file))
    expect(
        MINIMAL + f'admin: {{token: a, token_file: "{token_file}"}}   # <-\n',
        "admin.token_file",
        "give token or token_file, not both",
    )
    expect(
        MINIMAL + "admin: {token_file: /nonexistent/token}   # <-\n",
        "admin.token_file",
        "cannot read /nonexistent/token",
    )
    expect(MINIMAL + "admin: {token: ''}   # <-\n", "admin.token", "must not be empty")


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        ("max_connections: -1", "must be >= 0"),
        ("max_connections_per_ip: -5", "must be >= 0"),
        ("max_header_bytes: 64k", "expected an integer >= 0, got a string"),
        ("max_headers: -1", "must be >= 0"),
        ("max_body_bytes: -1", "must be >= 0"),
        ("rate_per_ip: -0.5", "must be a finite number >= 0"),
        ("rate_per_ip: .inf", "must be a finite number >= 0"),
        ("rate_per_ip: fast", "expected a number >= 0, got a string"),
    ],
)
def test_limits(field: str, fragment: str) -> None:
    key = field.split(":")[0]
    expect(MINIMAL + f"limits:\n  {field}   # <-\n", f"limits.{key}", fragment)


@pytest.mark.parametrize(
    "key", ["connect", "backend", "client_header", "client_idle", "drain", "upstream_idle"]
)
@pytest.mark.parametrize(
    ("value", "fragment"), [("0s", "must be greater than 0"), ("30", "a unit is required")]
)
def test_timeouts(key: str, value: str, fragment: str) -> None:
    expect(MINIMAL + f"timeouts:\n  {key}: {value}   # <-\n", f"timeouts.{key}", fragment)


def test_access_log(tmp_path: Path) -> None:
    expect(
        MINIMAL + "access_log: {format: xml}   # <-\n",
        "access_log.format",
        "must be one of plain | json | off",
    )
    expect(
        MINIMAL + "access_log: {path: /nonexistent-dir/access.log}   # <-\n",
        "access_log.path",
        "directory /nonexistent-dir does not exist",
    )
    config = parse(MINIMAL + f"access_log: {{path: {tmp_path}/a.log}}\n")
    assert config.access_log.path == str(tmp_path / "a.log")


@pytest.mark.parametrize(
    ("value", "fragment"), [("0", "must be >= 1, got 0"), ("two", "expected an integer >= 1")]
)
def test_workers(value: str, fragment: str) -> None:
    expect(MINIMAL + f"workers: {value}   # <-\n", "workers", fragment)


# ---------------------------------------------------------------------------------------------
# HA
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ha_key(tmp_path: Path) -> str:
    path = tmp_path / "ha.key"
    path.write_bytes(b"k" * 32)
    return str(path)


def ha_body(ha_key: str, **changes: str | None) -> str:
    fields = {
        "node_id": "lb1",
        "interface": "eth0",
        "virtual_ip": "198.18.0.100/24",
        "peers": '["198.18.0.12:5405"]',
        "auth_key_file": ha_key,
    }
    fields.update(changes)  # type: ignore[arg-type]
    return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)


def test_ha_required_keys_are_all_reported() -> None:
    text = MINIMAL + "ha: {priority: 10}   # <-\n"
    line = line_of(text, "# <-")
    found = problems_of(text)
    assert [(p.location, p.line) for p in found] == [
        ("ha.node_id", line),
        ("ha.interface", line),
        ("ha.virtual_ip", line),
        ("ha.auth_key_file", line),
        ("ha.peers", line),
    ]


@pytest.mark.parametrize(
    ("change", "location", "fragment"),
    [
        ({"priority": "0"}, "priority", "must be 1..254, got 0"),
        ({"priority": "255"}, "priority", "must be 1..254, got 255"),
        ({"virtual_ip": "198.18.0.300/24"}, "virtual_ip", "expected an address with prefix"),
        ({"virtual_ip": "198.18.0.1/40"}, "virtual_ip", "expected an address with prefix"),
        ({"virtual_ip": "2001:db8::1/64"}, "virtual_ip", "only an IPv4 virtual IP is supported"),
        ({"node_id": "n" * 65}, "node_id", "a node_id is at most 64 bytes, got 65"),
        (
            {"auth_key_file": "/nonexistent/ha.key"},
            "auth_key_file",
            "cannot read /nonexistent/ha.key",
        ),
        ({"peers": "[]"}, "peers", "at least one peer is required"),
        ({"peers": '"198.18.0.12:5405"'}, "peers", "expected a list of addresses, got a string"),
        ({"peers": '["peer.example.com:5405"]'}, "peers[0]", "a peer must be an IP address"),
        ({"peers": '["198.18.0.12"]'}, "peers[0]", "missing port"),
        ({"interface": "a-very-long-interface"}, "interface", "invalid network interface name"),
        (
            {"advert_interval": "1s", "dead_after": "1s"},
            "dead_after",
            "dead_after (1s) must be longer than advert_interval (1s)",
        ),
        (
            {"dead_after": "500ms"},
            "dead_after",
            "dead_after (500ms) must be longer than advert_interval (1s)",
        ),
        ({"preempt": "maybe"}, "preempt", "expected true or false, got a string"),
        ({"bind": '"0.0.0.0:0"'}, "bind", "out of range 1..65535"),
        ({"notify": "[a]"}, "notify", "expected a string, got a list"),
    ],
)
def test_ha_fields(ha_key: str, change: dict[str, str], location: str, fragment: str) -> None:
    key = location.split("[")[0]
    lines = ha_body(ha_key, **change).splitlines()
    marked = "".join(line + ("   # <-\n" if line.startswith(f"{key}:") else "\n") for line in lines)
    expect(ha_text(marked), f"ha.{location}", fragment)


def test_ha_key_file_empty_is_a_located_problem_and_a_short_one_passes(tmp_path: Path) -> None:
    # `balancer run` refuses an empty key; a short password (keepalived style) it accepts
    # with a warning, so check must not refuse it either
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    lines = ha_body(str(empty)).splitlines()
    marked = "".join(
        line + ("   # <-\n" if line.startswith("auth_key_file:") else "\n") for line in lines
    )
    expect(ha_text(marked), "ha.auth_key_file", "holds no key")
    short = tmp_path / "short.key"
    short.write_text("secret\n")
    assert parse(ha_text(ha_body(str(short)))).ha.auth_key_file == str(short)


# ---------------------------------------------------------------------------------------------
# Files: load(), relative paths, the shipped examples
# ---------------------------------------------------------------------------------------------


def test_load_reads_a_file_and_records_its_path(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_text(MINIMAL)
    config = load(str(path))
    assert config.source == str(path)
    assert config.pools["web"].backends[0].name == "app1"


def test_load_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load(str(missing))
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"
    with pytest.raises(ConfigError, match="Is a directory"):
        load(str(tmp_path))


def test_load_locates_problems_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_bytes(MINIMAL.replace("app1", "a b").encode())
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (
        str(info.value)
        == f"{path}:8: pools.web.backends[0].name: invalid name 'a b': use letters, digits, '_', '-' and '.'"
    )


def test_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "lb.yaml"
    path.write_bytes(MINIMAL.encode() + b"workers: \xff\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    (problem,) = info.value.problems
    assert (problem.source, problem.line) == (str(path), 9)


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, certs: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    shutil.copy(certs["cert"], etc / "tls" / "site.pem")
    shutil.copy(certs["key"], etc / "tls" / "site.key")
    (etc / "ha.key").write_bytes(b"k" * 32)
    (etc / "admin.token").write_text("t")
    (etc / "logs").mkdir()
    (etc / "lb.yaml").write_text(
        textwrap.dedent(
            """\
            listeners:
              - name: https
                bind: "127.0.0.1:8443"
                tls: {certificates: [{cert: tls/site.pem, key: ./tls/site.key}]}
                routes: [{pool: web}]
            pools:
              web:
                sticky: {key_file: sticky.key}
                backends: [{name: app1, address: "127.0.0.1:9001"}]
            admin: {token_file: admin.token}
            access_log: {path: logs/access.log}
            ha:
              node_id: lb1
              interface: eth0
              virtual_ip: 198.18.0.100/24
              peers: ["198.18.0.12:5405"]
              auth_key_file: ../etc/ha.key
            """
        )
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the file, not to where balancer was started
    config = load(os.path.relpath(etc / "lb.yaml"))
    tls = config.listeners[0].tls
    assert tls is not None
    assert tls.certificates == (
        TlsCertificate(str(etc / "tls" / "site.pem"), str(etc / "tls" / "site.key")),
    )
    sticky = config.pools["web"].sticky
    assert sticky is not None and sticky.key_file == str(etc / "sticky.key")
    assert config.admin.token_file == str(etc / "admin.token")
    assert config.access_log.path == str(etc / "logs" / "access.log")
    assert config.ha is not None and config.ha.auth_key_file == str(etc / "ha.key")
    assert config.source == str(etc / "lb.yaml")


def test_example_config_parses(all_strategies: None, certs: dict[str, str], tmp_path: Path) -> None:
    """config/balancer.yaml, with /etc/balancer files supplied and its ha block uncommented."""
    text = (REPO / "config" / "balancer.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("# ha:")
    end = start + 1
    while end < len(lines) and lines[end].startswith("#   "):
        end += 1
    assert end - start > 10, "the commented ha block was not found whole"
    lines[start:end] = [line[2:] for line in lines[start:end]]
    etc = tmp_path / "etc-balancer"
    etc.mkdir()
    shutil.copy(certs["cert"], etc / "site.pem")
    shutil.copy(certs["key"], etc / "site.key")
    (etc / "ha.key").write_bytes(b"k" * 32)
    config = parse("\n".join(lines).replace("/etc/balancer/", f"{etc}/"), source="balancer.yaml")

    assert [listener.name for listener in config.listeners] == ["http", "https", "redirect", "db"]
    assert config.listeners[1].tls is not None
    assert config.listeners[2].redirect_https == "https://{host}:8443"
    assert config.listeners[3].mode == "tcp"
    assert set(config.pools) == {"web", "api", "images", "db"}
    web = config.pools["web"]
    assert web.sticky == StickyConfig(key_file=str(etc / "sticky.key"))
    assert web.health_check is not None and web.health_check.expect_status == (200, 399)
    assert config.pools["images"].hash_key == "path"
    assert config.ha is not None and config.ha.dead_after == 1.0
    assert config.ha.auth_key_file == str(etc / "ha.key")
    # the values the example shows as defaults really are the defaults
    assert config.limits == LimitsConfig()
    assert config.timeouts == TimeoutsConfig()
    assert config.admin == AdminConfig()
    assert web.passive_health == PassiveHealthConfig()
    assert web.queue == QueueConfig()


def test_example_config_names_every_strategy_and_top_level_key() -> None:
    text = (REPO / "config" / "balancer.yaml").read_text()
    for name in INTERFACE_STRATEGIES:
        assert name in text
    for key in (
        "listeners:",
        "pools:",
        "admin:",
        "limits:",
        "timeouts:",
        "# ha:",
        "access_log:",
        "workers:",
    ):
        assert key in text


def test_example_config_as_shipped_only_misses_its_files(all_strategies: None) -> None:
    found = problems_of((REPO / "config" / "balancer.yaml").read_text())
    for problem in found:
        assert "/etc/balancer" in problem.message, str(problem)


def test_demo_config_parses() -> None:
    demo = REPO / "config" / "demo.yaml"
    assert demo.is_symlink() and os.readlink(demo) == "../balancer/demo/demo.yaml"
    config = load(str(demo))
    packaged = load(str(REPO / "balancer" / "demo" / "demo.yaml"))
    assert dataclasses.replace(config, source=None) == dataclasses.replace(packaged, source=None)
    (listener,) = config.listeners
    assert (listener.name, listener.bind, listener.routes) == (
        "http",
        Address("127.0.0.1", 8080),
        (Route("web"),),
    )
    assert config.admin.bind == Address("127.0.0.1", 9000)
    web = config.pools["web"]
    assert list(config.pools) == ["web"]
    assert web.strategy == "round_robin" and web.sticky is None
    assert [(b.name, b.address) for b in web.backends] == [
        ("app1", Address("127.0.0.1", 9101)),
        ("app2", Address("127.0.0.1", 9102)),
        ("app3", Address("127.0.0.1", 9103)),
    ]
    assert web.health_check is not None
    assert (web.health_check.type, web.health_check.path, web.health_check.interval) == (
        "http",
        "/healthz",
        1.0,
    )
    assert "# sticky:" in demo.read_text()


# ---------------------------------------------------------------------------------------------
# No input produces anything but a Config or a ConfigError
# ---------------------------------------------------------------------------------------------

KEYS = [
    "listeners", "pools", "admin", "limits", "timeouts", "ha", "access_log", "workers",
    "name", "bind", "mode", "routes", "pool", "tls", "redirect_https", "host", "path_prefix",
    "certificates", "min_version", "cert", "key", "strategy", "hash_key", "sticky",
    "health_check", "passive_health", "slow_start", "panic_threshold", "retries", "queue",
    "backends", "address", "weight", "max_connections", "cookie", "ttl", "key_file", "type",
    "path", "interval", "timeout", "rise", "fall", "expect_status", "consecutive_failures",
    "ejection_time", "max_ejection_time", "max_ejected_percent", "size", "token", "token_file",
    "max_connections_per_ip", "max_header_bytes", "max_headers", "max_body_bytes", "rate_per_ip",
    "connect", "backend", "client_header", "client_idle", "drain", "upstream_idle", "node_id",
    "interface", "virtual_ip", "priority", "peers", "advert_interval", "dead_after", "preempt",
    "auth_key_file", "notify", "format", "web", "db", "<<",
]  # fmt: skip
PLAUSIBLE = [
    "1s", "250ms", "0", "127.0.0.1:8080", "[::1]:1", "0.0.0.0:0", "http", "tcp", "web", "db",
    "round_robin", "consistent_hash", "header:X", "cookie:", "path", "/x", "x", "1.2", "200-399",
    "https://{host}", "{host", "198.18.0.1/24", "json", "off", "/nonexistent/file", ".",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(PLAUSIBLE)
)
keys = st.sampled_from(KEYS) | st.text(max_size=8)
nested = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
    max_leaves=40,
)
mapping_of = st.dictionaries(st.sampled_from(KEYS), nested, max_size=8)
documents = (
    st.fixed_dictionaries(
        {},
        optional={
            "listeners": st.lists(mapping_of, max_size=3) | nested,
            "pools": st.dictionaries(
                st.sampled_from(["web", "db", "x y", ""]), mapping_of, max_size=3
            )
            | nested,
            "admin": mapping_of | nested,
            "limits": mapping_of | nested,
            "timeouts": mapping_of | nested,
            "ha": mapping_of | nested,
            "access_log": mapping_of | nested,
            "workers": nested,
        },
    )
    | nested
)


def assert_config_or_config_error(text: str | bytes) -> None:
    try:
        config = parse(text)
    except ConfigError as e:
        assert e.problems
        for problem in e.problems:
            assert isinstance(problem, Problem) and problem.message
            assert problem.line is None or problem.line >= 1
        str(e)
    else:
        assert isinstance(config, Config)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_random_documents_never_crash(document: object) -> None:
    assert_config_or_config_error(yaml.safe_dump(document))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_crashes(text: str) -> None:
    assert_config_or_config_error(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    assert_config_or_config_error(data)


EXAMPLE_TEXT = (REPO / "config" / "balancer.yaml").read_text()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_example_never_crashes(data: st.DataObject) -> None:
    text = EXAMPLE_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        start = data.draw(st.integers(0, len(text)))
        end = data.draw(st.integers(start, min(len(text), start + 20)))
        text = (
            text[:start]
            + data.draw(
                st.sampled_from(["", " ", "\n", ":", "-", "[", "{", "0", "x", "  ", "*a", "&a "])
            )
            + text[end:]
        )
    assert_config_or_config_error(text)


def test_tcp_pool_health_check_defaults_to_tcp_connect() -> None:
    text = """
listeners:
  - {name: db, bind: "127.0.0.1:15432", mode: tcp, pool: db}
  - {name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}
pools:
  db:
    health_check: {interval: 1s}
    backends: [{name: a, address: "127.0.0.1:5432"}]
  db_http:
    health_check: {type: http}
    backends: [{name: a, address: "127.0.0.1:5433"}]
  web:
    health_check: {interval: 1s}
    backends: [{name: a, address: "127.0.0.1:9001"}]
"""
    cfg = parse(text)
    assert cfg.pools["db"].health_check.type == "tcp"  # behind a tcp listener, no type given
    assert cfg.pools["web"].health_check.type == "http"
    assert cfg.pools["db_http"].health_check.type == "http"  # explicit type is kept


def test_admin_metrics_switch() -> None:
    base = """
listeners: [{name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
pools: {web: {backends: [{name: a, address: "127.0.0.1:9001"}]}}
"""
    assert parse(base).admin.metrics is True
    assert parse(base + "admin: {metrics: false}\n").admin.metrics is False
    with pytest.raises(ConfigError) as e:
        parse(base + "admin: {metrics: maybe}\n")
    assert e.value.problems[0].location == "admin.metrics"


def test_workers_count_auto_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    base = """
listeners: [{name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}]
pools: {web: {backends: [{name: a, address: "127.0.0.1:9001"}]}}
"""
    assert parse(base).workers == 1
    assert parse(base + "workers: 1\n").workers == 1
    assert parse(base + "workers: 4\n").workers == 4
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert parse(base + "workers: auto\n").workers == 16
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert parse(base + "workers: auto\n").workers == 1


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0", "must be >= 1, got 0"),
        ("-1", "must be >= 1, got -1"),
        ("many", "expected an integer >= 1 or 'auto', got a string 'many'"),
        ("2.5", "expected an integer >= 1 or 'auto', got a number"),
        ("true", "expected an integer >= 1 or 'auto', got a boolean"),
        ("[2]", "expected an integer >= 1 or 'auto', got a list"),
        ("100000", "must be at most 256, got 100000"),
    ],
)
def test_workers_bad_values_are_located(value: str, fragment: str) -> None:
    expect(MINIMAL + f"workers: {value}   # <-\n", "workers", fragment)


def test_workers_refuse_a_listener_on_port_zero() -> None:
    text = """\
workers: 2
listeners:
  - name: http
    bind: "127.0.0.1:0"   # <-
    routes: [{pool: web}]
pools:
  web:
    backends:
      - {name: app1, address: "127.0.0.1:9001"}
"""
    expect(text, "listeners[0].bind", "port 0 (any free port) cannot be shared by 2 worker")
    assert parse(text.replace("workers: 2", "workers: 1")).listeners[0].bind.port == 0


# ---------------------------------------------------------------------------------------------
# HTTP/2, gRPC and the PROXY protocol
# ---------------------------------------------------------------------------------------------


def test_listener_http2_and_proxy_protocol_defaults(certs: dict[str, str]) -> None:
    tls = f'{{certificates: [{{cert: "{certs["cert"]}", key: "{certs["key"]}"}}]}}'
    config = parse(
        listeners(
            f"""\
            - {{name: plain, bind: "127.0.0.1:8080", routes: [{{pool: web}}]}}
            - {{name: https, bind: "127.0.0.1:8443", routes: [{{pool: web}}], tls: {tls}}}
            - {{name: db, bind: "127.0.0.1:15432", mode: tcp, pool: db}}
            """
        )
    )
    plain, https, db = config.listeners
    assert (plain.http2, https.http2, db.http2) == (False, True, False)
    assert (plain.proxy_protocol, https.proxy_protocol, db.proxy_protocol) == (False,) * 3
    # built by hand, the same default applies
    assert ListenerConfig(name="x", bind=Address("127.0.0.1", 1), tls=https.tls).http2 is True
    assert ListenerConfig(name="x", bind=Address("127.0.0.1", 1)).http2 is False


def test_listener_http2_and_proxy_protocol_given(certs: dict[str, str]) -> None:
    tls = f'{{certificates: [{{cert: "{certs["cert"]}", key: "{certs["key"]}"}}]}}'
    config = parse(
        listeners(
            f"""\
            - {{name: h2c, bind: "127.0.0.1:8080", http2: true, routes: [{{pool: web}}]}}
            - {{name: h1, bind: "127.0.0.1:8443", http2: false, tls: {tls}, routes: [{{pool: web}}]}}
            - {{name: nlb, bind: "127.0.0.1:8090", proxy_protocol: true, routes: [{{pool: web}}]}}
            - {{name: db, bind: "127.0.0.1:15432", mode: tcp, pool: db, proxy_protocol: true}}
            """
        )
    )
    h2c, h1, nlb, db = config.listeners
    assert (h2c.http2, h1.http2, nlb.http2, db.http2) == (True, False, False, False)
    assert (nlb.proxy_protocol, db.proxy_protocol, h2c.proxy_protocol) == (True, True, False)


@pytest.mark.parametrize(
    ("field", "location", "fragment"),
    [
        ('http2: "on"', "http2", "expected true or false, got a string"),
        ("http2: 2", "http2", "expected true or false, got an integer"),
        ("proxy_protocol: v2", "proxy_protocol", "expected true or false, got a string"),
        ("proxy_protocol: [v1]", "proxy_protocol", "expected true or false, got a list"),
    ],
)
def test_listener_http2_and_proxy_protocol_bad_values(
    field: str, location: str, fragment: str
) -> None:
    text = listeners(
        f"""\
        - name: http
          bind: "127.0.0.1:8080"
          routes: [{{pool: web}}]
          {field}   # <-
        """
    )
    expect(text, f"listeners[0].{location}", fragment)


@pytest.mark.parametrize("value", ["true", "false"])
def test_http2_on_a_tcp_listener_is_refused(value: str) -> None:
    text = listeners(
        f"""\
        - name: db
          bind: "127.0.0.1:15432"
          mode: tcp
          pool: db
          http2: {value}   # <-
        """
    )
    expect(text, "listeners[0].http2", "http2 is for http listeners")


def test_pool_protocol_and_send_proxy_protocol() -> None:
    config = parse(MINIMAL)
    web = config.pools["web"]
    assert (web.protocol, web.send_proxy_protocol, web.discovery) == ("http1", "none", None)
    text = """\
listeners:
  - {name: http, bind: "127.0.0.1:8080", routes: [{pool: grpc}, {pool: web}]}
  - {name: db, bind: "127.0.0.1:15432", mode: tcp, pool: db}
pools:
  grpc:
    protocol: h2
    send_proxy_protocol: v2
    backends: [{name: g1, address: "127.0.0.1:50051"}]
  web:
    protocol: http1
    send_proxy_protocol: v1
    backends: [{name: a, address: "127.0.0.1:9001"}]
  db:
    send_proxy_protocol: v2
    backends: [{name: pg, address: "127.0.0.1:5432"}]
"""
    pools = parse(text).pools
    assert (pools["grpc"].protocol, pools["grpc"].send_proxy_protocol) == ("h2", "v2")
    assert (pools["web"].protocol, pools["web"].send_proxy_protocol) == ("http1", "v1")
    assert (pools["db"].protocol, pools["db"].send_proxy_protocol) == ("http1", "v2")


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        ("protocol: http2", "must be one of http1 | h2, got 'http2'"),
        ("protocol: http", "must be one of http1 | h2, got 'http' (did you mean 'http1'?)"),
        ("protocol: 2", "expected one of http1 | h2, got an integer"),
        ("send_proxy_protocol: v3", "must be one of none | v1 | v2, got 'v3'"),
        ("send_proxy_protocol: true", "expected one of none | v1 | v2, got a boolean"),
    ],
)
def test_pool_protocol_bad_values(field: str, fragment: str) -> None:
    key = field.split(":")[0]
    expect(pool(f"{field}   # <-\n" + ONE_BACKEND), f"pools.web.{key}", fragment)


def test_h2_pool_behind_a_tcp_listener_is_refused() -> None:
    text = """\
listeners:
  - {name: db, bind: "127.0.0.1:15432", mode: tcp, pool: db}
pools:
  db:
    protocol: h2   # <-
    backends: [{name: pg, address: "127.0.0.1:5432"}]
"""
    problem = expect(text, "pools.db.protocol", "protocol h2 is for pools behind http listeners")
    assert "tcp listener 'db'" in problem.message


def test_h2_pool_behind_a_tcp_listener_is_reported_beside_other_problems() -> None:
    text = """\
listeners:
  - {name: db, bind: "127.0.0.1:15432", mode: tcp, pool: db}
  - {name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}
pools:
  db:
    protocol: h2
    backends: [{name: pg, address: "127.0.0.1:5432"}]
  web:
    backends: [{name: a, address: "127.0.0.1:0"}]
"""
    found = problems_of(text)
    assert [(p.location, p.line) for p in found] == [
        ("pools.db.protocol", 6),
        ("pools.web.backends[0].address", 9),
    ]


def test_grpc_health_check() -> None:
    config = parse(pool("protocol: h2\nhealth_check: {type: grpc}\n" + ONE_BACKEND))
    check = config.pools["web"].health_check
    assert check is not None and (check.type, check.service) == ("grpc", "")
    config = parse(
        pool(
            "protocol: h2\nhealth_check: {type: grpc, service: helloworld.Greeter}\n" + ONE_BACKEND
        )
    )
    check = config.pools["web"].health_check
    assert check is not None and check.service == "helloworld.Greeter"
    # explicit empty service: the server as a whole
    config = parse(pool('protocol: h2\nhealth_check: {type: grpc, service: ""}\n' + ONE_BACKEND))
    assert config.pools["web"].health_check.service == ""
    assert HealthCheckConfig().service == ""


@pytest.mark.parametrize("protocol", ["", "protocol: http1\n"])
def test_grpc_health_check_needs_h2(protocol: str) -> None:
    text = pool(protocol + "health_check:\n  type: grpc   # <-\n" + ONE_BACKEND)
    expect(text, "pools.web.health_check.type", "a grpc health check needs protocol: h2")


def test_grpc_health_check_with_a_wrong_protocol_reports_the_protocol_only() -> None:
    text = pool("protocol: h3   # <-\nhealth_check: {type: grpc}\n" + ONE_BACKEND)
    expect(text, "pools.web.protocol", "must be one of http1 | h2")


@pytest.mark.parametrize(
    ("check", "location", "fragment"),
    [
        ("{type: grpc, path: /healthz}", "path", "path is for http checks"),
        ("{type: grpc, expect_status: 200}", "expect_status", "expect_status is for http checks"),
        ("{type: grpc, service: 'a b'}", "service", "invalid gRPC service name 'a b'"),
        ("{type: grpc, service: 5}", "service", "expected a gRPC service name (a string)"),
        ("{service: helloworld.Greeter}", "service", "service is for type: grpc checks, not http"),
        ("{type: tcp, service: x}", "service", "service is for type: grpc checks, not tcp"),
    ],
)
def test_grpc_health_check_fields(check: str, location: str, fragment: str) -> None:
    text = pool(f"protocol: h2\nhealth_check: {check}   # <-\n" + ONE_BACKEND)
    expect(text, f"pools.web.health_check.{location}", fragment)


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------


def test_discovery_etcd_and_dns() -> None:
    text = pool(
        """\
        discovery:
          etcd:
            endpoints: ["127.0.0.1:2379", "[::1]:2379", "etcd.internal:2379"]
            prefix: /balancer/pools/web/
          dns: {name: app.internal, type: SRV, resolver: "127.0.0.1:5353", interval: 10s}
        """
    )
    web = parse(text).pools["web"]
    assert web.backends == ()
    assert web.discovery == DiscoveryConfig(
        etcd=EtcdDiscoveryConfig(
            endpoints=(
                Address("127.0.0.1", 2379),
                Address("::1", 2379),
                Address("etcd.internal", 2379),
            ),
            prefix="/balancer/pools/web/",
            timeout=2.0,
        ),
        dns=DnsDiscoveryConfig(
            name="app.internal",
            type="SRV",
            port=None,
            resolver=Address("127.0.0.1", 5353),
            interval=10.0,
        ),
    )


def test_discovery_dns_defaults_and_forms() -> None:
    dns = parse(pool("discovery: {dns: {name: app.internal, port: 8080}}\n")).pools["web"]
    assert dns.discovery == DiscoveryConfig(
        dns=DnsDiscoveryConfig(name="app.internal", type="A", port=8080, resolver=None)
    )
    assert dns.discovery.dns.interval == 5.0 and dns.discovery.etcd is None
    text = pool('discovery: {dns: {name: app.internal, type: AAAA, port: 80, resolver: "::1"}}\n')
    found = parse(text).pools["web"].discovery.dns
    assert (found.type, found.port, found.resolver) == ("AAAA", 80, Address("::1", 53))
    text = pool(
        "discovery: {etcd: {endpoints: ['127.0.0.1:2379'], prefix: web/, timeout: 500ms}}\n"
    )
    assert parse(text).pools["web"].discovery.etcd.timeout == 0.5


@pytest.mark.parametrize("backends", ["", "backends: []\n", ONE_BACKEND])
def test_a_pool_may_have_discovery_and_backends(backends: str) -> None:
    text = pool(backends + "discovery: {dns: {name: app.internal, port: 80}}\n")
    web = parse(text).pools["web"]
    assert web.discovery is not None
    assert len(web.backends) == (1 if backends == ONE_BACKEND else 0)


def test_a_pool_without_backends_or_discovery_is_refused_as_before() -> None:
    expect(pool("retries: 1   # <-\n"), "pools.web.backends", "a pool needs at least one backend")
    expect(pool("backends: []   # <-\n"), "pools.web.backends", "a pool needs at least one backend")


@pytest.mark.parametrize(
    ("discovery", "location", "fragment"),
    [
        ("{}", "", "discovery needs etcd or dns"),
        ("{etcd: }", "", "discovery needs etcd or dns"),
        ("[etcd]", "", "expected a mapping, got a list"),
        ("{consul: {}}", "consul", "unknown key 'consul'"),
        ("{etc: {}}", "etc", "unknown key 'etc' (did you mean 'etcd'?)"),
        ("{etcd: {prefix: /x/}}", "etcd.endpoints", "'endpoints' is required"),
        ("{etcd: {endpoints: [], prefix: /x/}}", "etcd.endpoints", "at least one endpoint"),
        ("{etcd: {endpoints: '127.0.0.1:2379', prefix: /x/}}", "etcd.endpoints", "got a string"),
        ("{etcd: {endpoints: ['127.0.0.1'], prefix: /x/}}", "etcd.endpoints[0]", "missing port"),
        (
            "{etcd: {endpoints: ['127.0.0.1:2379', '127.0.0.1:2379'], prefix: /x/}}",
            "etcd.endpoints[1]",
            "duplicate endpoint 127.0.0.1:2379",
        ),
        ("{etcd: {endpoints: ['127.0.0.1:2379']}}", "etcd.prefix", "'prefix' is required"),
        ("{etcd: {endpoints: ['127.0.0.1:2379'], prefix: ''}}", "etcd.prefix", "must not be empty"),
        ("{etcd: {endpoints: ['127.0.0.1:2379'], prefix: 'a b'}}", "etcd.prefix", "no spaces"),
        (
            "{etcd: {endpoints: ['127.0.0.1:2379'], prefix: /x/, timeout: 2}}",
            "etcd.timeout",
            "a unit is required",
        ),
        ("{etcd: {endpoints: ['127.0.0.1:2379'], prefix: /x/, ttl: 1s}}", "etcd.ttl", "unknown"),
        ("{dns: {port: 80}}", "dns.name", "'name' is required"),
        ("{dns: {name: 127.0.0.1, port: 80}}", "dns.name", "is an IP address"),
        ("{dns: {name: 'bad name', port: 80}}", "dns.name", "is not a valid DNS name"),
        ("{dns: {name: app.internal, type: MX}}", "dns.type", "must be one of A | AAAA | SRV"),
        ("{dns: {name: app.internal}}", "dns.port", "type A needs port"),
        ("{dns: {name: app.internal, type: AAAA}}", "dns.port", "type AAAA needs port"),
        ("{dns: {name: app.internal, type: SRV, port: 80}}", "dns.port", "SRV records carry"),
        ("{dns: {name: app.internal, port: 0}}", "dns.port", "must be 1..65535, got 0"),
        (
            "{dns: {name: app.internal, port: 80, resolver: 'ns.example:53'}}",
            "dns.resolver",
            "a resolver is an IP address",
        ),
        (
            "{dns: {name: app.internal, port: 80, interval: 0s}}",
            "dns.interval",
            "must be greater than 0",
        ),
    ],
)
def test_discovery_bad_values(discovery: str, location: str, fragment: str) -> None:
    text = pool(f"discovery: {discovery}   # <-\n")
    expect(text, "pools.web.discovery" + (f".{location}" if location else ""), fragment)


def test_discovery_problems_are_all_reported_at_once() -> None:
    text = pool(
        """\
        discovery:
          etcd:
            endpoints: ["127.0.0.1"]
          dns:
            name: app.internal
            type: SRV
            port: 53
        """
    )
    assert [(p.location, p.line) for p in problems_of(text)] == [
        ("pools.web.discovery.etcd.endpoints[0]", 6),
        ("pools.web.discovery.etcd.prefix", 6),
        ("pools.web.discovery.dns.port", 10),
    ]


# ---------------------------------------------------------------------------------------------
# ha.instances
# ---------------------------------------------------------------------------------------------


def test_ha_single_ip_form_is_one_instance(ha_key: str) -> None:
    ha = parse(ha_text(ha_body(ha_key, priority="150"))).ha
    assert ha is not None
    assert ha.instances == (HaInstanceConfig(virtual_ip="198.18.0.100/24", priority=150),)
    assert (ha.virtual_ip, ha.priority) == ("198.18.0.100/24", 150)


def test_ha_instances(ha_key: str) -> None:
    body = ha_body(ha_key, virtual_ip=None) + textwrap.dedent(
        """\
        instances:
          - {virtual_ip: "198.18.0.100/24", priority: 150}
          - {virtual_ip: 198.18.0.101/24}
        """
    )
    ha = parse(ha_text(body)).ha
    assert ha is not None
    assert ha.instances == (
        HaInstanceConfig("198.18.0.100/24", 150),
        HaInstanceConfig("198.18.0.101/24", 100),
    )
    # code that knows one address reads the first instance's
    assert (ha.virtual_ip, ha.priority) == ("198.18.0.100/24", 150)


def test_ha_config_built_by_hand_gets_its_instance() -> None:
    ha = HaConfig(
        node_id="lb1",
        interface="eth0",
        virtual_ip="198.18.0.100/24",
        auth_key_file="/k",
        peers=(Address("198.18.0.12", 5405),),
        priority=120,
    )
    assert ha.instances == (HaInstanceConfig("198.18.0.100/24", 120),)


@pytest.mark.parametrize("key", ["virtual_ip", "priority"])
def test_ha_both_forms_are_refused(ha_key: str, key: str) -> None:
    body = ha_body(ha_key, virtual_ip=None) + "instances: [{virtual_ip: 198.18.0.101/24}]\n"
    body += f"{key}: {'198.18.0.100/24' if key == 'virtual_ip' else 150}   # <-\n"
    expect(ha_text(body), f"ha.{key}", "give instances or virtual_ip/priority, not both")


def test_ha_needs_one_form(ha_key: str) -> None:
    lines = ha_body(ha_key, virtual_ip=None).splitlines()
    body = "".join(line + ("   # <-\n" if i == 0 else "\n") for i, line in enumerate(lines))
    problem = expect(ha_text(body), "ha.virtual_ip", "'virtual_ip' is required")
    assert "instances" in problem.message


def test_ha_instances_at_most_sixteen(ha_key: str) -> None:
    items = ", ".join(f'{{virtual_ip: "198.18.1.{i}/24"}}' for i in range(1, 18))
    body = ha_body(ha_key, virtual_ip=None) + f"instances: [{items}]   # <-\n"
    expect(ha_text(body), "ha.instances", "at most 16 instances, got 17")
    items = ", ".join(f'{{virtual_ip: "198.18.1.{i}/24"}}' for i in range(1, 17))
    assert (
        len(
            parse(
                ha_text(ha_body(ha_key, virtual_ip=None) + f"instances: [{items}]\n")
            ).ha.instances
        )
        == 16
    )


@pytest.mark.parametrize(
    ("instances", "location", "fragment"),
    [
        ("[]", "instances", "at least one instance is required"),
        ('"198.18.0.100/24"', "instances", "expected a list of {virtual_ip, priority}"),
        ("[{priority: 100}]", "instances[0].virtual_ip", "'virtual_ip' is required"),
        ("[{virtual_ip: 198.18.0.300/24}]", "instances[0].virtual_ip", "expected an address"),
        ("[{virtual_ip: '2001:db8::1/64'}]", "instances[0].virtual_ip", "only an IPv4"),
        ("[{virtual_ip: 198.18.0.1/24, priority: 0}]", "instances[0].priority", "1..254, got 0"),
        ("[{virtual_ip: 198.18.0.1/24, priority: 255}]", "instances[0].priority", "got 255"),
        ("[{virtual_ip: 198.18.0.1/24, weight: 1}]", "instances[0].weight", "unknown key"),
        (
            "[{virtual_ip: 198.18.0.1/24}, {virtual_ip: 198.18.0.1/16}]",
            "instances[1].virtual_ip",
            "duplicate virtual IP 198.18.0.1 (also ha.instances[0])",
        ),
    ],
)
def test_ha_instances_bad_values(ha_key: str, instances: str, location: str, fragment: str) -> None:
    body = ha_body(ha_key, virtual_ip=None) + f"instances: {instances}   # <-\n"
    expect(ha_text(body), f"ha.{location}", fragment)


def test_node_id_limit_is_the_heartbeats() -> None:
    from balancer.ha import heartbeat

    assert heartbeat.MAX_NODE_ID_BYTES == MAX_NODE_ID_BYTES


def test_config_imports_nothing_of_the_ha_package() -> None:
    for module in (REPO / "balancer" / "config").glob("*.py"):
        text = module.read_text()
        assert not re.search(r"^\s*(from|import) balancer\.ha\b", text, re.M), module.name


def uncomment(lines: list[str], first: str) -> list[str]:
    """The commented block of config/balancer.yaml starting at the line `first`, uncommented:
    that line and the lines after it commented at the same indent."""
    start = lines.index(first)
    indent = first[: len(first) - len(first.lstrip())]
    block = [first]
    for line in lines[start + 1 :]:
        if not line.startswith(indent + "#   "):
            break
        block.append(line)
    return [indent + line[len(indent) + 2 :] for line in block]


def test_example_config_commented_new_keys_parse(ha_key: str) -> None:
    """The commented examples of http2, proxy_protocol, a gRPC pool, discovery and
    ha.instances in config/balancer.yaml are valid once uncommented."""
    lines = (REPO / "config" / "balancer.yaml").read_text().splitlines()
    text = "\n".join(
        ["listeners:"]
        + uncomment(lines, "  # - name: h2c")
        + ["pools:"]
        + uncomment(lines, "  # grpc:")
        + uncomment(lines, "  # fleet:")
    )
    config = parse(text + "\n")
    (listener,) = config.listeners
    assert (listener.name, listener.http2, listener.proxy_protocol) == ("h2c", True, False)
    grpc = config.pools["grpc"]
    assert (grpc.protocol, grpc.send_proxy_protocol) == ("h2", "v2")
    assert grpc.health_check is not None and grpc.health_check.type == "grpc"
    fleet = config.pools["fleet"].discovery
    assert fleet is not None and fleet.etcd is not None and fleet.dns is not None
    assert fleet.etcd.prefix == "/balancer/pools/fleet/" and fleet.dns.type == "SRV"
    # the instances example sits inside the commented ha block, one level further in
    instances = [line.replace("#   #", "", 1) for line in lines if line.startswith("#   #   - {")]
    assert len(instances) == 2
    body = textwrap.dedent(
        """\
        node_id: lb1
        interface: eth0
        peers: ["198.18.0.12:5405"]
        auth_key_file: KEY
        instances:
        """
    ).replace("KEY", ha_key)
    ha = parse(ha_text(body + "\n".join(instances) + "\n")).ha
    assert ha is not None and [i.priority for i in ha.instances] == [150, 100]
