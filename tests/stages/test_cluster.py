"""Distributed settings: validation of every key, hosts files, placement, pre-start checks."""
from __future__ import annotations

import os
import socket
import textwrap

import pytest

from stages.cluster import (DistributedParams, Placement, check_reachable,
                            check_scheduler_address, check_shards, job_nodes, place, read_hosts,
                            role_env)
from stages.config import ParamsError, parse_section

GOOD = {"kvstore": "dist_sync", "workers": 2, "servers": 1, "hosts": ["localhost"],
        "scheduler_host": "127.0.0.1", "scheduler_port": 9091, "progress_timeout_s": 60.0}


def parse(**over) -> DistributedParams:
    return parse_section({"d": {**GOOD, **over}}, "d", DistributedParams)


def test_valid_settings_and_single_process_kvstores():
    assert parse().enabled
    assert not parse(kvstore="device", workers=1).enabled
    assert not parse(kvstore="local", workers=1).enabled
    assert parse(kvstore="dist_device_sync", hosts="hosts.txt").hosts == "hosts.txt"


@pytest.mark.parametrize("over, needle", [
    ({"kvstore": "dist_synk"}, "d.kvstore: Input should be 'device', 'local', 'dist_sync' or "
                               "'dist_device_sync'"),
    ({"kvstore": "device"}, "workers: 2 needs kvstore dist_sync or dist_device_sync"),
    ({"workers": 0}, "d.workers: Input should be greater than or equal to 1"),
    ({"servers": 0}, "d.servers"),
    ({"hosts": []}, "no host given"),
    ({"hosts": ["localhost", "a", "a"]}, "hosts must not repeat"),
    ({"hosts": ["gpu1", "localhost"]}, "the first host must be 'localhost'"),
    ({"hosts": ["localhost", "-oProxyCommand=sh"]}, "d.hosts"),
    ({"hosts": ["localhost", "a b"]}, "d.hosts"),
    ({"hosts": ""}, "d.hosts"),
    ({"scheduler_port": 80}, "d.scheduler_port"),
    ({"progress_timeout_s": 0}, "d.progress_timeout_s"),
    ({"retries": 3}, "d.retries: unknown key"),
])
def test_bad_settings_name_key_and_what_is_allowed(over, needle):
    with pytest.raises(ParamsError, match=None) as err:
        parse(**over)
    assert needle in str(err.value)


def test_every_key_is_required():
    data = dict(GOOD)
    del data["progress_timeout_s"]
    with pytest.raises(ParamsError, match="d.progress_timeout_s: required key is missing"):
        parse_section({"d": data}, "d", DistributedParams)


def test_hosts_file(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(textwrap.dedent("""\
        # the machine running dvc repro comes first
        localhost
        gpu-2.example.org   # 8 GPUs
        ubuntu@10.0.0.3

    """))
    assert read_hosts(str(path)) == ["localhost", "gpu-2.example.org", "ubuntu@10.0.0.3"]
    assert read_hosts(["localhost", "x"]) == ["localhost", "x"]
    with pytest.raises(ParamsError, match="cannot read hosts file"):
        read_hosts(str(tmp_path / "missing"))
    path.write_text("localhost\nbad host name\n")
    with pytest.raises(ParamsError, match="line 2: 'bad host name' is not a host name"):
        read_hosts(str(path))
    path.write_text("# nothing\n")
    with pytest.raises(ParamsError, match="no host given"):
        read_hosts(str(path))
    path.write_text("gpu-2\nlocalhost\n")
    with pytest.raises(ParamsError, match="the first host must be 'localhost'"):
        read_hosts(str(path))


def test_placement_is_round_robin_with_the_scheduler_here():
    names = [(p.name, p.host) for p in place(3, 2, ["localhost", "gpu2"])]
    assert names == [("scheduler", "localhost"), ("server 0", "localhost"),
                     ("server 1", "gpu2"), ("worker 0", "localhost"), ("worker 1", "gpu2"),
                     ("worker 2", "localhost")]


def test_role_environment_and_nodes():
    p = parse(workers=2, servers=1, hosts=["localhost", "gpu2"])
    env = role_env(Placement("worker", 1, "gpu2"), p, "10.0.0.1", 4)
    assert env == {"DMLC_ROLE": "worker", "DMLC_PS_ROOT_URI": "10.0.0.1",
                   "DMLC_PS_ROOT_PORT": "9091", "DMLC_NUM_SERVER": "1", "DMLC_NUM_WORKER": "2"}
    assert role_env(Placement("server", 0, "localhost"), p, "10.0.0.1", 4)["DMLC_NODE_HOST"] \
        == "10.0.0.1"
    assert role_env(Placement("scheduler", None, "localhost"), p, "10.0.0.1", 4)[
        "OMP_NUM_THREADS"] == "1"
    nodes = job_nodes(place(2, 1, ["localhost", "gpu2"]), p, "10.0.0.1", 1,
                      lambda pl: ["run", pl.role], {"X": "1"}, "/repo")
    assert [(n.name, n.host, n.watched, n.argv) for n in nodes] == [
        ("scheduler", "localhost", False, ("run", "scheduler")),
        ("server 0", "localhost", False, ("run", "server")),
        ("worker 0", "localhost", True, ("run", "worker")),
        ("worker 1", "gpu2", True, ("run", "worker"))]
    assert all(n.env["X"] == "1" and n.cwd == "/repo" for n in nodes)


def test_scheduler_port_in_use_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ParamsError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_scheduler_address("127.0.0.1", port)
    assert check_scheduler_address("localhost", port) == "127.0.0.1"  # free again


def test_scheduler_address_of_another_machine_or_unknown_is_refused():
    with pytest.raises(ParamsError, match="must be an address of this machine"):
        check_scheduler_address("192.0.2.1", 9091)  # TEST-NET-1: never assigned here
    with pytest.raises(ParamsError, match="host 'no-such-host.invalid' cannot be resolved"):
        check_scheduler_address("no-such-host.invalid", 9091)


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """An ``ssh`` first on PATH answering as told by FAKE_SSH_EXIT (255: ssh's own failure)."""
    script = tmp_path / "bin" / "ssh"
    script.parent.mkdir()
    script.write_text('#!/bin/sh\n[ "$FAKE_SSH_EXIT" = 255 ] && '
                      'echo "ssh: connect to host port 22: Connection refused" >&2\n'
                      'exit "$FAKE_SSH_EXIT"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{os.environ['PATH']}")
    return monkeypatch


def test_unreachable_hosts_are_refused(fake_ssh):
    with pytest.raises(ParamsError, match="host 'no-such-host.invalid' cannot be resolved"):
        check_reachable("127.0.0.1", ["localhost", "no-such-host.invalid"], "/py", "/repo")
    with pytest.raises(ParamsError, match="192.0.2.7 cannot reach"):
        check_reachable("127.0.0.1", ["localhost", "192.0.2.7"], "/py", "/repo")
    fake_ssh.setenv("FAKE_SSH_EXIT", "255")
    with pytest.raises(ParamsError, match="cannot reach host 10.1.2.3 with ssh .*Connection "
                                          "refused"):
        check_reachable("10.0.0.1", ["localhost", "10.1.2.3"], "/py", "/repo")
    fake_ssh.setenv("FAKE_SSH_EXIT", "1")
    with pytest.raises(ParamsError, match="host 10.1.2.3 has no executable /py or no directory"):
        check_reachable("10.0.0.1", ["localhost", "10.1.2.3"], "/py", "/repo")
    fake_ssh.setenv("FAKE_SSH_EXIT", "0")
    check_reachable("10.0.0.1", ["localhost", "10.1.2.3"], "/py", "/repo")
    fake_ssh.setenv("FAKE_SSH_EXIT", "255")
    check_reachable("127.0.0.1", ["localhost"], "/py", "/repo")  # nothing remote: no ssh


def test_more_workers_than_images_is_refused():
    check_shards(4, 4)
    with pytest.raises(ParamsError, match="5 workers but only 4 training images"):
        check_shards(5, 4)
