"""Which sequence holds which slot: the waiting queue, the free slots and the running sequences.

Sequences are submitted from the HTTP side and admitted by the engine at a step boundary, as
many as there are free slots, in the order they came; a finished one frees its slot at once.
The queue is bounded: a submission that could not start once every slot and queue place is
taken is refused (the HTTP layer answers 429), so a flood of requests cannot grow memory or
waiting times without bound.
"""
import heapq
import threading
from collections import deque

from llm.serve.sequence import Sequence


class QueueFull(Exception):
    """No room for these sequences: every slot and every place in the queue is taken."""


class Scheduler:
    def __init__(self, slots: int, max_waiting: int):
        self.slots, self.max_waiting = slots, max_waiting
        self.free = list(range(slots))  # a heap: the lowest free slot first
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.waiting: deque[Sequence] = deque()
        self.changed = threading.Condition()
        self.stopping = False

    def submit(self, seqs: list[Sequence]):
        """Queue sequences (any thread); QueueFull if they do not fit."""
        with self.changed:
            # waiting sequences take the free slots first: what is left of the queue is the room
            if self.stopping or len(self.waiting) + len(seqs) > len(self.free) + self.max_waiting:
                raise QueueFull()
            self.waiting.extend(seqs)
            self.changed.notify()

    def cancel(self, seqs: list[Sequence]):
        """Their client went away: a waiting one leaves the queue now, a running one at the next step."""
        with self.changed:
            for seq in seqs:
                seq.cancelled = True
                if seq.slot is None and seq in self.waiting:
                    self.waiting.remove(seq)
            self.changed.notify()

    def admit(self) -> list[Sequence]:
        """The waiting sequences that get a slot now (engine thread)."""
        admitted = []
        with self.changed:
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                seq.slot = heapq.heappop(self.free)
                self.running[seq.slot] = seq
                admitted.append(seq)
        return admitted

    def finish(self, seq: Sequence):
        with self.changed:
            del self.running[seq.slot]
            heapq.heappush(self.free, seq.slot)

    def wait_for_work(self) -> bool:
        """Block while there is nothing to do; False once stopped."""
        with self.changed:
            while not (self.waiting or self.running or self.stopping):
                self.changed.wait()
            return not self.stopping

    def stop(self) -> list[Sequence]:
        """Refuse new sequences and wake the engine; returns those still waiting."""
        with self.changed:
            self.stopping = True
            left, self.waiting = list(self.waiting), deque()
            self.changed.notify()
        return left
