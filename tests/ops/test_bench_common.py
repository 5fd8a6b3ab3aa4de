"""The benches' port and teardown helpers (bench/common.py): a held port is ainode's alone, a
service whose port was taken starts on another, a failed run keeps its work folder."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, NodeProcess, port_open
from tests.results.ris_peers import MllpRis

sys.path.insert(0, str(REPO_ROOT / "bench"))

from common import hold_port, start_redis, stop_processes, wait_port  # noqa: E402


def test_a_held_port_is_refused_to_others_and_shared_with_ainode(tmp_path: Path):
    hold = hold_port()
    try:
        with socket.socket() as other, pytest.raises(OSError) as err:
            other.bind(("127.0.0.1", hold.port))  # what free_port() in another program does
        assert err.value.errno == errno.EADDRINUSE
        node = NodeProcess(tmp_path / "node", {"node": {"port": hold.port}, "api": {"enabled": False}}).start()
    finally:
        hold.release()
    try:
        assert port_open(hold.port) and node.proc.poll() is None
    finally:
        node.stop()


def test_a_service_whose_port_was_taken_starts_on_another(tmp_path: Path):
    with socket.socket() as squatter:  # took the port between "free" and the service's bind
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        proc, port = start_redis(tmp_path, ports=iter([taken]))
        try:
            assert port != taken
            answer = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=True
            ).stdout
            assert answer.strip() == "PONG"
        finally:
            stop_processes([proc])
    assert "Address already in use" in (tmp_path / "redis.log").read_text()


def test_a_failed_run_keeps_its_work_folder_and_says_where(tmp_path: Path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "node.log").write_text("why it failed\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_processes([proc], work, remove=False)
    assert proc.poll() is not None and (work / "node.log").exists()
    assert str(work) in capsys.readouterr().err
    stop_processes([], work, remove=True)
    assert not work.exists()


def test_waiting_for_a_service_that_died_says_so_with_its_log(tmp_path: Path):
    """A node that cannot start ends the wait at once, its log's end in the error (the whole log
    stays in the work folder), instead of waiting out the timeout."""
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('settings: bad port'); sys.exit(2)"], stdout=out
        )
        proc.wait()
    with pytest.raises(RuntimeError, match="exited with 2 before listening:\nsettings: bad port"):
        wait_port(9, timeout=600, proc=proc, log=log)
    assert log.exists()


def test_the_bench_ris_binds_its_own_port_and_keeps_it():
    """The RIS peer binds port 0 and reports the port it got: no free-then-release window."""

    first, second = MllpRis().start(), MllpRis().start()
    try:
        assert first.port != second.port
        for ris in (first, second):
            assert port_open(ris.port)
            with pytest.raises(OSError) as taken:
                socket.create_server(("127.0.0.1", ris.port))
            assert taken.value.errno == errno.EADDRINUSE
    finally:
        first.stop()
        second.stop()
