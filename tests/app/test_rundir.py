"""Run directories: a lock, no silent restart over a previous run, writable output checked first."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qready.app.rundir import LOCK_FILE, check_new_run, check_writable, run_lock


def test_a_second_run_into_a_locked_directory_is_refused(tmp_path) -> None:
    with run_lock(tmp_path) as held:
        assert (held / LOCK_FILE).is_file()
        with pytest.raises(ValueError, match=rf"{tmp_path} is in use by another qready run \(process {os.getpid()}"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()  # released
    with run_lock(tmp_path):  # and free again
        pass


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_previous_run_needs_resume_or_force(tmp_path) -> None:
    check_new_run(tmp_path, resume=False, force=False)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="already holds a run \\(metrics.jsonl\\); continue it with --resume, "
                                         "start over with --force"):
        check_new_run(tmp_path, resume=False, force=False)
    check_new_run(tmp_path, resume=True, force=False)
    check_new_run(tmp_path, resume=False, force=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_is_refused_up_front(tmp_path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=f"output directory {ro / 'sub'} is not writable"):
            check_writable(ro / "sub")
        with pytest.raises(ValueError, match=f"output directory {ro} is not writable"):
            check_writable(ro)
    finally:
        ro.chmod(0o700)
    assert check_writable(tmp_path / "a" / "b").is_dir()


def test_an_output_path_below_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"output directory {tmp_path / 'file' / 'sub'} is not writable"):
        check_writable(tmp_path / "file" / "sub")


def test_write_atomic_replaces_whole_files(tmp_path) -> None:
    from qready.app.rundir import write_atomic

    path = tmp_path / "rows.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["rows.json"]
