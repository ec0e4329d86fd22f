"""One run per workdir: `<workdir>/LOCK` names the process that owns it (see WorkdirLock)."""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

import jax

from dsjax.errors import ConfigError

LOCK_FILE = "LOCK"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(fd: int) -> dict | None:
    """The lock record in `fd` ({} when empty, None when unreadable)."""
    raw = os.pread(fd, 1 << 16, 0)
    if not raw.strip():
        return {}
    try:
        owner = json.loads(raw)
    except ValueError:
        return None
    return owner if isinstance(owner, dict) and "pid" in owner and "host" in owner else None


class WorkdirLock:
    """`<workdir>/LOCK` while a run writes into `workdir`, holding {"pid", "host", "started"} and an flock.

        with WorkdirLock(workdir):            # or lock = WorkdirLock(workdir).acquire() ... lock.release()
            train(...)

    A second run on the same workdir gets a ConfigError naming the owner. A lock left by a dead process on this
    host (no flock held, pid gone) is taken over with one printed line; a lock from another host is refused, since
    its liveness cannot be checked from here (the message says to delete the file if that run is gone). Only
    process 0 of a multi-process run takes the lock; the others share it."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use(self, owner: dict | None, hint: str = "") -> ConfigError:
        who = (
            f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started', '?')})"
            if owner
            else "another process"
        )
        return ConfigError(
            f"--workdir={self.workdir} is in use by {who}; stop that run or use another --workdir" + hint
        )

    def _open_locked(self) -> int:
        """An fd of the current LOCK file with its flock held (ConfigError if another live process holds it)."""
        for _ in range(10):  # the file may be replaced between open and flock by a run releasing it; try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise self._in_use(owner) from None
            except OSError as e:  # a filesystem without flock: the pid check below is all there is
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise ConfigError(f"{self.path}: could not take the lock (it keeps changing); is another run starting?")

    def _check_owner(self, owner: dict | None) -> None:
        """Raises if the previous owner may still be running; says so when taking over a stale lock."""
        host = socket.gethostname()
        if owner == {} or (owner and owner.get("host") == host and owner.get("pid") == os.getpid()):
            return
        if owner is None:
            print(f"replacing the unreadable lock file {self.path}", flush=True)
            return
        if owner.get("host") != host:
            raise self._in_use(owner, f" (if that run is gone, delete {self.path})")
        if _pid_alive(int(owner["pid"])):
            raise self._in_use(owner, f" (if no such run is going on, delete {self.path})")
        print(
            f"taking over the lock of pid {owner['pid']} (started {owner.get('started', '?')}), which is no longer "
            f"running: {self.path}",
            flush=True,
        )

    def acquire(self) -> WorkdirLock:
        if self._fd is not None or jax.process_index() != 0:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        fd = self._open_locked()
        try:
            self._check_owner(_read_owner(fd))
            started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Deletes the lock file (if it is still ours) and drops the flock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)  # before dropping the flock: a waiting run then sees a fresh file
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
