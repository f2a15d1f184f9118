"""docker-compose.yml (no Docker engine here): it parses and references only what exists."""

from __future__ import annotations

from pathlib import Path

import yaml

from balancer.config import parse
from balancer.demo.backend import main as backend_main

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_and_network() -> None:
    c = compose()
    assert {"app1", "app2", "app3", "lb1", "lb2", "client"} <= set(c["services"])
    assert c["networks"]["lan"]["ipam"]["config"][0]["subnet"] == "198.18.0.0/24"
    for name in ("lb1", "lb2"):
        svc = c["services"][name]
        assert {"NET_ADMIN", "NET_RAW"} <= set(svc["cap_add"])
    for name, svc in c["services"].items():
        if name == "etcd":
            assert svc["build"] == {"context": ".", "target": "etcd"}
        else:
            assert svc["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert " AS etcd\n" in dockerfile and "etcd-server" in dockerfile
    # the balancer image stays the default target: the last stage
    assert dockerfile.rindex("FROM ") == dockerfile.index("FROM python:")


def test_compose_mounts_and_configs_exist_and_are_valid() -> None:
    c = compose()
    for name in ("lb1", "lb2"):
        svc = c["services"][name]
        host_dir, container_dir = svc["volumes"][0].split(":")
        assert container_dir == "/etc/balancer"
        local = ROOT / host_dir
        assert local.is_dir()
        cfg_file = svc["command"][-1].replace("/etc/balancer", str(local))
        text = Path(cfg_file).read_text().replace("/etc/balancer", str(local))
        cfg = parse(text, source=cfg_file)
        assert cfg.ha is not None and cfg.ha.node_id == name
        assert Path(cfg.ha.auth_key_file).is_file()
        ip = svc["networks"]["lan"]["ipv4_address"]
        other = c["services"]["lb2" if name == "lb1" else "lb1"]["networks"]["lan"]["ipv4_address"]
        assert [p.host for p in cfg.ha.peers] == [other] and ip != other
        backends = {b.address.host for b in cfg.pools["web"].backends}
        apps = {
            c["services"][a]["networks"]["lan"]["ipv4_address"] for a in ("app1", "app2", "app3")
        }
        assert backends == apps


def test_compose_backend_command_line_is_accepted(capsys) -> None:  # type: ignore[no-untyped-def]
    argv = compose()["services"]["app1"]["entrypoint"]
    assert argv[:2] == ["balancer", "demo-backend"]
    # the demo backend's own parser accepts these arguments (--help-free dry check: bad ones exit 2)
    try:
        backend_main([*argv[2:], "--port", "not-a-port"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert "--port" in err and "--host" not in err.split("error:")[-1]


def test_compose_registered_apps_register_where_the_balancers_look() -> None:
    from balancer.cli import build_parser

    c = compose()
    etcd_ip = c["services"]["etcd"]["networks"]["lan"]["ipv4_address"]
    assert f"--advertise-client-urls=http://{etcd_ip}:2379" in c["services"]["etcd"]["command"]
    prefixes = set()
    for name in ("lb1", "lb2"):
        text = (ROOT / "config/compose" / f"{name}.yaml").read_text()
        cfg = parse(text.replace("/etc/balancer", str(ROOT / "config/compose")))
        etcd = cfg.pools["web"].discovery.etcd
        assert [str(e) for e in etcd.endpoints] == [f"{etcd_ip}:2379"]
        prefixes.add(etcd.prefix)
    for app in ("app4", "app5"):
        svc = c["services"][app]
        assert svc["entrypoint"][:2] == ["sh", "-c"]
        script = svc["entrypoint"][2]
        serve, register = script.split("&")
        assert serve.split()[:2] == ["balancer", "demo-backend"]
        argv = register.split()
        assert argv[:2] == ["exec", "balancer"]
        args = build_parser().parse_args(argv[2:])
        assert args.command == "register" and args.name == app
        assert args.etcd == [f"{etcd_ip}:2379"] and {args.prefix} == prefixes
        ip = svc["networks"]["lan"]["ipv4_address"]
        assert args.address == f"{ip}:8000" and "--port 8000" in serve
