"""Distributed training settings: the params model, hosts, checks before start, the job's nodes.

params ``train.<branch>.distributed`` (every key required)::

    kvstore: device            # device | local: one process, as always; dist_sync |
                               # dist_device_sync: MXNet's parameter server (ps-lite)
    workers: 1                 # training processes; the global batch is split between them
    servers: 1                 # parameter-server processes (gradient sums)
    hosts: [localhost]         # where workers/servers run (round robin), or a hosts file path
    scheduler_host: 127.0.0.1  # an address of this machine every host can reach
    scheduler_port: 9091
    progress_timeout_s: 600    # the job fails when no worker prints anything for this long

The scheduler runs on this machine (the one running ``dvc repro``); worker ``r`` runs on
``hosts[r % len(hosts)]``, server ``s`` on ``hosts[s % len(hosts)]``. ``localhost`` means a local
process, any other entry is reached with ``ssh`` (same venv path and working directory there).
``hosts[0]`` must be ``localhost``: worker 0 writes the stage's outputs, which must land here.

Everything that can be known before a process starts is checked here, and a bad setting is a
``ParamsError`` (exit 2): unreachable or unknown hosts, a scheduler port in use or an address
that is not this machine's, more workers than images to shard.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import re
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Annotated, Callable, Literal, Mapping, Sequence

from pydantic import Field, model_validator

from stages.config import ParamsError, Section
from stages.launcher import NodeSpec
from stages.remote import LOCAL_HOST, SSH_OPTIONS

KEY = "train.voc.distributed"  # how errors name the section (the branch is always voc today)
HOST_PATTERN = r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]*@)?[A-Za-z0-9_][A-Za-z0-9_.:-]*$"
Host = Annotated[str, Field(pattern=HOST_PATTERN)]
PREFLIGHT_TIMEOUT_S = 30.0


class DistributedParams(Section):
    """params.yaml ``train.<branch>.distributed`` (see the module doc)."""

    kvstore: Literal["device", "local", "dist_sync", "dist_device_sync"]
    workers: int = Field(ge=1)
    servers: int = Field(ge=1)
    hosts: list[Host] | Annotated[str, Field(min_length=1)]
    scheduler_host: Host
    scheduler_port: int = Field(ge=1024, le=65535)
    progress_timeout_s: float = Field(gt=0)

    @property
    def enabled(self) -> bool:
        """Whether training runs as a parameter-server job (else: one process, as always)."""
        return self.kvstore.startswith("dist_")

    @model_validator(mode="after")
    def _check(self) -> "DistributedParams":
        if not self.enabled and self.workers != 1:
            raise ValueError(f"workers: {self.workers} needs kvstore dist_sync or "
                             f"dist_device_sync (kvstore {self.kvstore} trains in one process)")
        if isinstance(self.hosts, list):
            check_host_list(self.hosts, "hosts")
        return self


def check_host_list(hosts: Sequence[str], where: str) -> None:
    """Non-empty, no repeats, ``localhost`` first (ValueError naming ``where``)."""
    if not hosts:
        raise ValueError(f"{where}: no host given")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"{where}: hosts must not repeat (got {list(hosts)})")
    if hosts[0] != LOCAL_HOST:
        raise ValueError(f"{where}: the first host must be {LOCAL_HOST!r} (got {hosts[0]!r}): "
                         "worker 0 writes the stage's outputs, on the machine running the stage")


def read_hosts(value: list[str] | str) -> list[str]:
    """The hosts list: as given, or read from a hosts file (one host a line, # comments)."""
    if isinstance(value, list):
        return list(value)
    path = Path(value)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"{KEY}.hosts: cannot read hosts file {value!r} "
                          f"({exc.strerror})") from None
    hosts = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not re.match(HOST_PATTERN, entry):
            raise ParamsError(f"{KEY}.hosts: {value}, line {number}: {entry!r} is not a host "
                              "name (one host a line: name, address or user@name)")
        hosts.append(entry)
    try:
        check_host_list(hosts, f"{KEY}.hosts ({value})")
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    return hosts


@dataclasses.dataclass(frozen=True)
class Placement:
    """One process of the job: its role, rank (None for the scheduler) and host."""

    role: Literal["scheduler", "server", "worker"]
    rank: int | None
    host: str

    @property
    def name(self) -> str:
        return self.role if self.rank is None else f"{self.role} {self.rank}"


def place(workers: int, servers: int, hosts: Sequence[str]) -> list[Placement]:
    """Scheduler here, then servers and workers round robin over ``hosts``."""
    return ([Placement("scheduler", None, LOCAL_HOST)]
            + [Placement("server", s, hosts[s % len(hosts)]) for s in range(servers)]
            + [Placement("worker", r, hosts[r % len(hosts)]) for r in range(workers)])


def resolve(host: str) -> str:
    """The IPv4 address of ``host`` (a name or an address); ParamsError when unknown."""
    name = host.rsplit("@", 1)[-1]
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ParamsError(f"{KEY}: host {host!r} cannot be resolved "
                          f"({getattr(exc, 'strerror', None) or exc})") from None


def check_scheduler_address(host: str, port: int) -> str:
    """Resolve ``scheduler_host`` and check this machine can listen on it at ``port``.

    Returns the IPv4 address. A port in use or an address of another machine is a
    ParamsError (the port is checked by binding it, then released for the scheduler).
    """
    address = resolve(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ParamsError(f"{KEY}.scheduler_port: port {port} on {address} is already "
                                  "in use; choose another scheduler_port") from None
            raise ParamsError(f"{KEY}.scheduler_host: cannot listen on {host} ({address}) port "
                              f"{port}: {exc.strerror}; it must be an address of this machine"
                              ) from None
    return address


def check_reachable(scheduler_ip: str, hosts: Sequence[str], python: str, cwd: str,
                    run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Every remote host resolves, answers ssh (keys, no password) and has ``python``/``cwd``.

    Also refuses a loopback scheduler address when a remote host is another machine.
    """
    for host in hosts:
        if host == LOCAL_HOST:
            continue
        address = resolve(host)
        if (ipaddress.ip_address(scheduler_ip).is_loopback
                and not ipaddress.ip_address(address).is_loopback):
            raise ParamsError(f"{KEY}.scheduler_host: {scheduler_ip} is a loopback address, "
                              f"which host {host} cannot reach; use an address of this machine "
                              "on the network the hosts share")
        check = f"test -x {shlex.quote(python)} && test -d {shlex.quote(cwd)}"
        try:
            done = run(["ssh", *SSH_OPTIONS, host, check], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=PREFLIGHT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ParamsError(f"{KEY}.hosts: host {host} did not answer ssh within "
                              f"{PREFLIGHT_TIMEOUT_S:g} s") from None
        if done.returncode == 255:
            raise ParamsError(f"{KEY}.hosts: cannot reach host {host} with ssh (keys, no "
                              f"password prompt): {done.stderr.strip() or 'exit 255'}")
        if done.returncode != 0:
            raise ParamsError(f"{KEY}.hosts: host {host} has no executable {python} or no "
                              f"directory {cwd} (the same venv and checkout are needed on "
                              "every host)")


def check_shards(workers: int, images: int) -> None:
    """Each worker needs images of its own: refuse more workers than training images."""
    if workers > images:
        raise ParamsError(f"{KEY}.workers: {workers} workers but only {images} training "
                          "images to shard between them")


def role_env(placement: Placement, p: DistributedParams, scheduler_ip: str,
             threads: int) -> dict[str, str]:
    """The ps-lite environment of one process (plus thread counts for servers/scheduler)."""
    env = {"DMLC_ROLE": placement.role, "DMLC_PS_ROOT_URI": scheduler_ip,
           "DMLC_PS_ROOT_PORT": str(p.scheduler_port), "DMLC_NUM_SERVER": str(p.servers),
           "DMLC_NUM_WORKER": str(p.workers)}
    if placement.host == LOCAL_HOST:  # an address of this machine the others reach it at
        env["DMLC_NODE_HOST"] = scheduler_ip
    if placement.role == "scheduler":
        env["OMP_NUM_THREADS"] = "1"
    elif placement.role == "server" and threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def job_nodes(placements: Sequence[Placement], p: DistributedParams, scheduler_ip: str,
              threads: int, command: Callable[[Placement], Sequence[str]],
              extra_env: Mapping[str, str], cwd: str) -> list[NodeSpec]:
    """The launcher's node list: each placement's command and environment; workers watched."""
    return [NodeSpec(name=pl.name, argv=tuple(command(pl)), host=pl.host, cwd=cwd,
                     env={**extra_env, **role_env(pl, p, scheduler_ip, threads)},
                     watched=pl.role == "worker")
            for pl in placements]
