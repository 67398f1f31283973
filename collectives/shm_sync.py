"""Shared-memory segments and the ways a rank waits for its peers.

Segments are POSIX shared memory (shm_open + mmap). Each is named `<node prefix>-<group>-r<rank>`:
the prefix is unique to one node, so two nodes on a host never collide. Once every rank of a
group has mapped every segment, the names are unlinked: the memory then lives exactly as long
as the processes that map it, so a crash can leak nothing into /dev/shm. A sweep of the prefix
(`sweep_segments`) covers the short window before the unlink.

Waiting. On the development machine 8 ranks share 2 cores, so a rank that spins waiting for a
peer steals the core that peer needs: pure spinning starves. Three strategies, measured by
benchmarks/collectives_bench.py:
  * "spin":  poll the peer's flag (the GPU kernels' way; only sane with a core per rank);
  * "yield": poll, then sched_yield() between polls so a runnable peer gets the core;
  * "futex": poll briefly, then sleep in the kernel on the peer's flag word (FUTEX_WAIT) until the
    peer posts and wakes it (FUTEX_WAKE). No core is burnt while waiting. Linux only; elsewhere
    "futex" falls back to "yield".
Flags are int32 sequence numbers, each written by exactly one rank, so no atomics are needed; on
x86 (total store order) a flag store is never seen before the data stores that precede it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time

import _posixshmem
import numpy as np

SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
FUTEX_WAIT, FUTEX_WAKE = 0, 1  # shared (not FUTEX_PRIVATE): the word is in memory mapped by many processes
WAIT_STRATEGIES = ("spin", "yield", "futex")
SHM_DIR = "/dev/shm"


class CollectiveTimeout(TimeoutError):
    """A collective whose peers did not all arrive in time (the message names the missing ranks)."""


class PeerDied(RuntimeError):
    """A peer's process exited while this rank waited for it (the message names the rank)."""


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel directly
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


class Segment:
    """One POSIX shared-memory segment mapped into this process."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name, self.size = name, size
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.linked = create

    def unlink(self) -> None:
        if self.linked:
            try:
                _posixshmem.shm_unlink("/" + self.name)
            except FileNotFoundError:
                pass
            self.linked = False

    def close(self) -> None:
        self.unlink()
        try:
            self.map.close()
        except BufferError:  # views still alive: the mapping goes when they do
            pass


def sweep_segments(prefix: str) -> list[str]:
    """Unlinks every segment whose name starts with `prefix` (after a crash); returns their names."""
    removed = []
    if os.path.isdir(SHM_DIR):
        for name in os.listdir(SHM_DIR):
            if name.startswith(prefix):
                try:
                    _posixshmem.shm_unlink("/" + name)
                    removed.append(name)
                except FileNotFoundError:
                    pass
    return removed


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(address: int, expected: int, timeout_s: float) -> None:
    """Sleeps while the int32 at `address` equals `expected` (or until woken / timed out)."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(SYS_FUTEX, ctypes.c_void_p(address), FUTEX_WAIT, ctypes.c_int32(expected).value,
                  ctypes.byref(ts), None, 0)


def futex_wake(address: int) -> None:
    _libc.syscall(SYS_FUTEX, ctypes.c_void_p(address), FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


class FlagBoard:
    """The flag words at the head of every rank's segment. flags[rank][slot] holds the sequence
    number rank last posted on that slot (written by that rank only); word DOORBELL of each rank is
    the futex a sleeping rank waits on, rung by whichever rank sees a collective complete.

    Waking (the futex strategy) is an eventcount: a waiter reads its doorbell, re-checks the flags,
    and sleeps only if the doorbell has not changed. After posting, a rank fences and checks; the
    rank that finds every flag in place rings every doorbell once. That costs about one wake-up
    per rank per collective, instead of one per (rank, peer) pair if each rank slept on each
    peer's flag in turn. The fence is a locked instruction (a threading.Lock round trip): on x86
    it drains the store buffer, so of two ranks posting at once at least one sees both posts.
    """

    DOORBELL = 15

    def __init__(self, segments: list[Segment], rank: int, n_slots: int, strategy: str, timeout_s: float,
                 pids: list[int] | None = None) -> None:
        """pids: every rank's process id; a waiter checks that the ranks it waits for still live."""
        if strategy not in WAIT_STRATEGIES:
            raise ValueError(f"wait strategy must be one of {WAIT_STRATEGIES}, got {strategy!r}")
        if strategy == "futex" and (_libc is None or SYS_FUTEX is None):
            strategy = "yield"
        self.rank, self.strategy, self.timeout_s, self.pids = rank, strategy, timeout_s, pids
        self.flags = [np.frombuffer(s.map, dtype=np.int32, count=n_slots) for s in segments]
        self.doorbells = [s.address + 4 * self.DOORBELL for s in segments]
        self._fence_lock = threading.Lock()

    def post(self, slot: int, seq: int) -> None:
        self.flags[self.rank][slot] = ((seq + 2**31) % 2**32) - 2**31

    def _check_alive(self, ranks: list[int], what: str) -> None:
        if self.pids:
            for r in ranks:
                if not process_alive(self.pids[r]):
                    raise PeerDied(f"{what}: rank {r} (pid {self.pids[r]}) exited while this rank waited for it")

    def _missing(self, ranks, slot: int, seq: int) -> list[int]:
        return [r for r in ranks if (int(self.flags[r][slot]) - seq) & 0xFFFFFFFF >= 0x80000000]  # flag < seq

    def wait(self, ranks, slot: int, seq: int, what: str) -> None:
        """Returns once every rank in `ranks` has posted `seq` (or later) on `slot`."""
        ranks = list(ranks)
        with self._fence_lock:  # fence: my post is visible before I read the others'
            pass
        if not self._missing(ranks, slot, seq):
            if self.strategy == "futex":
                for r in ranks:
                    if r != self.rank:
                        self.flags[r][self.DOORBELL] += 1
                        futex_wake(self.doorbells[r])
            return
        start = time.monotonic()
        deadline, next_liveness_check = start + self.timeout_s, start + 0.2
        polls = 0
        while True:
            bell = int(self.flags[self.rank][self.DOORBELL])
            if not self._missing(ranks, slot, seq):
                return
            polls += 1
            now = time.monotonic()
            if now > next_liveness_check:
                next_liveness_check = now + 0.2
                self._check_alive(self._missing(ranks, slot, seq), what)
            if now > deadline:
                missing = self._missing(ranks, slot, seq)
                if missing:
                    raise CollectiveTimeout(f"{what}: rank(s) {missing} did not arrive within {self.timeout_s:.1f} s")
            if self.strategy == "spin" or polls < 4:
                continue
            if self.strategy == "yield":
                os.sched_yield()
            else:
                futex_wait(self.doorbells[self.rank], bell, 0.02)
