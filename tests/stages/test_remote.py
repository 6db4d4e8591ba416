"""How a job's process is started on its host (stages/remote.py): the local environment, the ssh
command line, what ssh's exit code means. The launcher's tests run these through real processes
and a stand-in ssh (tests/stages/test_launcher.py)."""
from __future__ import annotations

import os
import shlex

from stages.remote import LOCAL_HOST, local_env, ssh_argv, ssh_hint


def test_inherited_dmlc_variables_do_not_reach_the_nodes(monkeypatch):
    monkeypatch.setenv("DMLC_ROLE", "server")
    monkeypatch.setenv("DMLC_NUM_WORKER", "7")
    env = local_env({"DMLC_ROLE": "worker"})
    assert env["DMLC_ROLE"] == "worker" and "DMLC_NUM_WORKER" not in env
    assert env["PATH"] == os.environ["PATH"]


def test_ssh_command_quotes_directory_environment_and_arguments():
    argv = ssh_argv("gpu-1", ["/venv/bin/python", "-m", "stages.train", "it's"],
                    {"B": "two words", "A": "$HOME"}, "/data/my repo")
    assert argv[0] == "ssh" and "BatchMode=yes" in argv and argv[-2] == "gpu-1"
    assert shlex.split(argv[-1]) == ["cd", "/data/my repo", "&&", "exec", "env", "A=$HOME",
                                     "B=two words", "/venv/bin/python", "-m", "stages.train",
                                     "it's"]


def test_exit_255_is_explained_only_for_a_remote_node():
    assert "failed connection to gpu-1" in ssh_hint("gpu-1", 255)
    assert ssh_hint(LOCAL_HOST, 255) == ""  # a local process's own exit code
    assert ssh_hint("gpu-1", 1) == ""
