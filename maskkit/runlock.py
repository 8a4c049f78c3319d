"""One writer per run directory: RUN/.lock, held with an OS advisory lock for as long as the writer runs.

Two `maskkit train --out RUN` started at once used to both run and interleave their files (one run's
checkpoints next to the other's figure). Every writer of a run directory -- `train`, `train --resume`,
and `eval` while it records eval.json -- now takes `RunLock(RUN)`: it opens RUN/.lock and locks it with
`fcntl.flock(LOCK_EX | LOCK_NB)`. A second writer finds the lock taken and is refused with one line that
names the holder, whose pid, host, command and start time the holder wrote into the file.

Why flock on a file kept open: the kernel drops the lock when the holder's file is closed, and a
process killed with `kill -9` has its files closed, so a dead owner never leaves the run stuck; there
is no pid to compare and no stale file to clean up. The file itself stays (its text is read only while
someone holds the lock) and is never deleted: removing it while held would let the next writer lock a
new file under the same name beside the holder's. flock locks belong to one open file, so two opens
in one process exclude each other like two processes do. DataLoader workers forked from the holder
share its open file: `release` unlocks it for all of them, and after a kill -9 they exit within seconds
of their parent (PyTorch's watchdog), which is when the lock goes.
"""

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from maskkit.errors import MaskkitError

LOCK_NAME = ".lock"


def _command_line() -> str:
    """This process's command as a user typed it (`maskkit train ...`, not `.../maskkit/__main__.py train ...`)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("__main__.py", "maskkit"):
        program = "maskkit"
    return shlex.join([program, *sys.argv[1:]])


def describe_holder(text: str) -> str:
    """'maskkit train ... (pid 123 on host, since 2025-01-02 10:00:00)' from the lock file's text."""
    try:
        holder = json.loads(text)
        return f"{holder['command']} (pid {holder['pid']} on {holder['host']}, since {holder['started']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        # The holder has locked the file but not yet written itself into it (a matter of microseconds).
        return "another process (it has not written its name into the lock file yet)"


class RunLock:
    """The right to write `run_dir`, for one process; `acquire` refuses with a MaskkitError while another holds it.

    `advice` ends the refusal: what the refused user can do instead. Use as a context manager, or call
    `acquire` (a no-op when already held) and `release` (likewise) explicitly. A folder that cannot be
    written (read-only, full) raises the OSError, for the caller to name what it was writing
    (`maskkit.files.writing`).
    """

    def __init__(self, run_dir: str | Path, advice: str):
        self.run_dir, self.advice = Path(run_dir), advice
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def _refusal(self, holder: str) -> MaskkitError:
        return MaskkitError(f"{self.run_dir} is in use by {describe_holder(holder)}; {self.advice}")

    def acquire(self, wait: float = 0.0) -> None:
        """Take the lock, trying for up to `wait` seconds (for a writer that holds it briefly: another eval)."""
        if self.fd is not None:
            return
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise self._refusal(holder) from None
                time.sleep(0.1)
                continue
            # Someone may have deleted or replaced the file between our open and our lock: then the lock
            # we hold is on a file the next writer will not see. Start again on the file now there.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:                      # a full disk: better said now than at the first checkpoint
            self.release()
            raise

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def check_free(self, wait: float = 0.0) -> None:
        """Refuse, as `acquire` would, while another process holds the lock; take nothing.

        For a writer that writes only at its end (eval): it learns before its work that it could not
        record it. Reads only, so it works in a run directory this process cannot write.
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return                       # never locked: every holder creates the file first
            except OSError:
                return                       # unreadable: the write at the end will say why
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # shared: probes do not exclude each other
                return
            except OSError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace")
                if time.monotonic() >= deadline:
                    raise self._refusal(holder) from None
                time.sleep(0.1)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
