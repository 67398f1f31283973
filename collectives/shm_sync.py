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
  * "futex": poll briefly, then sleep in the kernel on a bell word (FUTEX_WAIT) until a peer
    rings it (FUTEX_WAKE). No core is burnt while waiting, but every wait pays a sleep and a
    wake-up, whose latency on an oversubscribed host varies from run to run;
  * "hybrid" (the default): yield for up to 2 ms, then sleep as "futex" does. Short waits (a
    collective among 8 ranks on 2 cores takes under 1 ms) cost a yield, not a wake-up; long ones
    (a peer still computing, a hung peer) burn no core. Linux only; elsewhere "futex" and
    "hybrid" fall back to "yield".
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
WAIT_STRATEGIES = ("spin", "yield", "futex", "hybrid")
SHM_DIR = "/dev/shm"
HYBRID_YIELD_S = 0.002  # "hybrid": yield this long, then sleep


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
    number rank last posted on that slot (written by that rank only). A few words of rank 0's
    segment are the group's bells: futex words that sleeping ranks wait on.

    Waking (the futex strategy) is an eventcount: a waiter reads the bell, re-checks the flags, and
    sleeps only if the bell has not changed; whoever makes the condition true rings the bell
    (increment, then one FUTEX_WAKE that wakes every sleeper on it). One syscall wakes the whole
    group, and a rank is woken only by the bell of what it waits for: BELL_ALL (every rank waits
    for every rank), BELL_LEADER (the reducing rank waits for the inputs) and BELL_RESULT (the
    others wait for the reduced result). After posting, a rank fences before it reads the others'
    flags; the fence is a locked instruction (a threading.Lock round trip): on x86 it drains the
    store buffer, so of two ranks posting at once at least one sees both posts.
    """

    BELL_ALL, BELL_LEADER, BELL_RESULT = 15, 14, 13

    def __init__(self, segments: list[Segment], rank: int, n_slots: int, strategy: str, timeout_s: float,
                 pids: list[int] | None = None) -> None:
        """pids: every rank's process id; a waiter checks that the ranks it waits for still live."""
        if strategy not in WAIT_STRATEGIES:
            raise ValueError(f"wait strategy must be one of {WAIT_STRATEGIES}, got {strategy!r}")
        if strategy in ("futex", "hybrid") and (_libc is None or SYS_FUTEX is None):
            strategy = "yield"
        self.rank, self.strategy, self.timeout_s, self.pids = rank, strategy, timeout_s, pids
        self.flags = [np.frombuffer(s.map, dtype=np.int32, count=n_slots) for s in segments]
        self.bells = self.flags[0]
        self.bell_address = segments[0].address
        self._fence_lock = threading.Lock()

    def post(self, slot: int, seq: int) -> None:
        self.flags[self.rank][slot] = ((seq + 2**31) % 2**32) - 2**31

    def fence(self) -> None:
        """My earlier stores (data, then flag) are visible to every peer before my next load."""
        with self._fence_lock:
            pass

    def ring(self, bell: int) -> None:
        """Wakes every rank sleeping on `bell` (a no-op unless they sleep in the kernel)."""
        if self.strategy in ("futex", "hybrid"):
            self.bells[bell] += 1
            futex_wake(self.bell_address + 4 * bell)

    def _check_alive(self, ranks: list[int], what: str) -> None:
        if self.pids:
            for r in ranks:
                if not process_alive(self.pids[r]):
                    raise PeerDied(f"{what}: rank {r} (pid {self.pids[r]}) exited while this rank waited for it")

    def missing(self, ranks, slot: int, seq: int) -> list[int]:
        """The ranks that have not yet posted `seq` (or later) on `slot` (wrap-around safe)."""
        return [r for r in ranks if (int(self.flags[r][slot]) - seq) & 0xFFFFFFFF >= 0x80000000]

    def wait(self, ranks, slot: int, seq: int, what: str, bell: int = BELL_ALL, ring_if_last: bool = True,
             culprits=None) -> None:
        """Returns once every rank in `ranks` has posted `seq` (or later) on `slot`. A rank that
        finds the condition already true on arrival rings `bell` for those asleep on it.
        culprits(): the ranks really at fault if the wait fails (when the awaited rank is itself
        waiting for others, as the reduce-once followers wait for rank 0 which waits for all)."""
        self.fence()
        if not self.missing(ranks, slot, seq):
            if ring_if_last:
                self.ring(bell)
            return
        start = time.monotonic()
        deadline, next_liveness_check = start + self.timeout_s, start + 0.2
        polls = 0
        bell_word = self.bell_address + 4 * bell
        while True:
            rung = int(self.bells[bell])
            missing = self.missing(ranks, slot, seq)
            if not missing:
                return
            polls += 1
            now = time.monotonic()
            if now > next_liveness_check:
                next_liveness_check = now + 0.2
                self._check_alive(sorted(set(missing) | set(culprits() if culprits else ())), what)
            if now > deadline:
                missing = (culprits and culprits()) or missing
                raise CollectiveTimeout(f"{what}: rank(s) {missing} did not arrive within {self.timeout_s:.1f} s")
            if self.strategy == "spin" or polls < 4:
                continue
            if self.strategy == "yield" or (self.strategy == "hybrid" and now - start < HYBRID_YIELD_S):
                os.sched_yield()
            else:
                futex_wait(bell_word, rung, 0.02)
