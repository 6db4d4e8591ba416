"""How a process of a job is started on its host: here, or on another machine through ssh.

A node placed on ``LOCAL_HOST`` is a local process, run with the launcher's environment
(``local_env``); any other host is reached with ``ssh`` (``ssh_argv``, keys only, no password
prompt: ``SSH_OPTIONS``), which runs the command in the same working directory there with its
environment set on the remote command line.
"""
from __future__ import annotations

import os
import shlex
from typing import Mapping, Sequence

LOCAL_HOST = "localhost"  # a node placed here is a local process, anything else goes over ssh
SSH_OPTIONS = ("-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")


def ssh_argv(host: str, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> list[str]:
    """The local command that runs ``argv`` in ``cwd`` on ``host`` with ``env`` set.

    ``exec`` keeps the remote process the leader of the session sshd made for it, so its
    ``exit_with_parent()`` can kill its whole group. Every piece is shell-quoted.
    """
    assignments = [f"{k}={v}" for k, v in sorted(env.items())]
    remote = (f"cd {shlex.quote(cwd)} && exec env "
              + " ".join(shlex.quote(x) for x in [*assignments, *argv]))
    return ["ssh", *SSH_OPTIONS, host, remote]


def local_env(env: Mapping[str, str]) -> dict[str, str]:
    """The launcher's environment without inherited DMLC_* roles, with ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DMLC_")}
    return {**base, **env}


def ssh_hint(host: str, code: int) -> str:
    """What exit code 255 of a node on ``host`` means when ssh ran it ('' otherwise)."""
    if host != LOCAL_HOST and code == 255:
        return (f" (ssh's code for a failed connection to {host}, or for a remote "
                "process killed by a signal)")
    return ""
