"""One writer per run directory: a second train or --resume is refused with the holder's name, and a
holder killed with kill -9 leaves nothing stuck (maskkit/runlock.py)."""

import json
import os
import signal
import subprocess
import sys

import pytest

from maskkit.errors import MaskkitError
from maskkit.runlock import RunLock
from maskkit.train import loop
from maskkit.train.loop import train

HOLD = """
import sys, time
from maskkit.runlock import RunLock
RunLock(sys.argv[1], "").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_with_the_holders_name_until_the_holder_lets_go(tmp_path):
    holder = RunLock(tmp_path, "")
    holder.acquire()
    # flock belongs to an open file, so a second open in this same process stands for a second writer.
    with pytest.raises(MaskkitError, match=rf"{tmp_path} is in use by .* \(pid {os.getpid()} on .*, since .*\); "
                                           "choose another"):
        RunLock(tmp_path, "choose another").acquire()
    holder.release()
    with RunLock(tmp_path, "") as second:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid() and second.fd is not None


def test_a_holder_killed_with_kill_9_leaves_no_stuck_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline() == "held\n"
        with pytest.raises(MaskkitError, match=rf"in use by .*-c {tmp_path} \(pid {process.pid} on "):
            RunLock(tmp_path, "").acquire()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    with RunLock(tmp_path, ""):          # the kernel dropped the dead holder's lock
        pass


def test_train_and_resume_are_refused_while_another_writer_holds_the_run(tmp_path, tiny_config):
    run = tmp_path / "run"
    cfg = tiny_config(train={"steps": 4, "checkpoint_every": 2})
    train(cfg, run, stop_at_step=2, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    with RunLock(run, ""):
        for resume in (True, False):
            with pytest.raises(MaskkitError, match=rf"{run} is in use by .*pid {os.getpid()}.*another --out"):
                train(cfg, run, resume=resume, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert train(cfg, run, resume=True, progress=False).final_step == 4      # refusals leave no lock behind


def test_of_two_runs_started_at_once_into_a_new_folder_the_second_is_refused(tmp_path, tiny_config, monkeypatch):
    """Both find no folder; the first creates and locks it while the second reads its data."""
    run = tmp_path / "run"
    first = RunLock(run, "")
    build_data = loop.build_data

    def first_run_starts_meanwhile(*args):
        run.mkdir()
        first.acquire()
        return build_data(*args)

    monkeypatch.setattr(loop, "build_data", first_run_starts_meanwhile)
    try:
        with pytest.raises(MaskkitError, match=f"{run} is in use by"):
            train(tiny_config(train={"steps": 2}), run, progress=False)
    finally:
        first.release()
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_run_that_finished_while_this_one_read_its_data_is_not_overwritten(tmp_path, tiny_config, monkeypatch):
    run = tmp_path / "run"
    cfg = tiny_config(train={"steps": 2})
    build_data = loop.build_data

    def another_run_finishes_meanwhile(*args):
        monkeypatch.setattr(loop, "build_data", build_data)
        train(cfg, run, progress=False)
        return build_data(*args)

    monkeypatch.setattr(loop, "build_data", another_run_finishes_meanwhile)
    with pytest.raises(MaskkitError, match="already holds a run"):
        train(cfg, run, progress=False)
