"""Running commands: streaming output whole, and killing a whole process tree (ranks in their own sessions)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from infra.processes import CommandError, descendants, kill_tree, process_alive, stream_command


def test_stream_command_forwards_every_line_of_heavy_mixed_output(tmp_path):
    script = (
        "import sys\n"
        "print('x' * 200_000)\n"  # one line far over a pipe buffer
        "for i in range(20_000):\n"
        "    print(f'err {i}', file=sys.stderr)\n"
        "print('done', flush=True)\n"
    )
    lines: list[str] = []
    stream_command([sys.executable, "-c", script], tmp_path, lines.append)
    assert lines[0] == "x" * 200_000 and lines[-1] == "done"
    assert sum(line.startswith("err ") for line in lines) == 20_000
    with pytest.raises(CommandError, match="exited with 3"):
        stream_command(
            [sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"], tmp_path, lines.append
        )


def test_kill_tree_reaches_grandchildren_in_other_sessions(tmp_path):
    # a parent whose child starts its own session, as torchrun's ranks do
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print('ready', flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    tree = [parent.pid, *descendants(parent.pid)]
    assert len(tree) == 2
    start = time.monotonic()
    kill_tree(parent.pid)
    parent.wait(timeout=10)
    assert time.monotonic() - start < 8
    assert not [pid for pid in tree if process_alive(pid)]  # gone, or a zombie nobody reaped yet
