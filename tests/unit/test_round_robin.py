"""The PyTorch engines' scheduler: FIFO admission into round-robin slots, KV budget."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from medserve.accel.round_robin import RoundRobinScheduler


@dataclass
class Req:
    request_id: str
    reserve_tokens: int = 10


def turns(scheduler: RoundRobinScheduler[Req], count: int) -> list[str]:
    order = []
    for _ in range(count):
        item = scheduler.next()
        order.append(item.request_id if item else "-")
    return order


def test_running_requests_take_turns_and_the_rest_wait_in_order() -> None:
    scheduler: RoundRobinScheduler[Req] = RoundRobinScheduler(max_running=2, capacity_tokens=1000)
    for name in "abc":
        scheduler.add(Req(name))
    assert turns(scheduler, 4) == ["a", "b", "a", "b"]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    scheduler.remove("a")  # finished: c takes its slot, b keeps its turn
    assert turns(scheduler, 4) == ["b", "c", "b", "c"]


def test_removing_the_request_that_just_ran_does_not_skip_the_next() -> None:
    scheduler: RoundRobinScheduler[Req] = RoundRobinScheduler(max_running=3, capacity_tokens=1000)
    for name in "abc":
        scheduler.add(Req(name))
    assert turns(scheduler, 2) == ["a", "b"]
    scheduler.remove("b")  # b finished on its own turn
    assert turns(scheduler, 3) == ["c", "a", "c"]


def test_abort_of_a_waiting_request_and_of_an_unknown_one() -> None:
    scheduler: RoundRobinScheduler[Req] = RoundRobinScheduler(max_running=1, capacity_tokens=1000)
    for name in "ab":
        scheduler.add(Req(name))
    assert scheduler.remove("b") == Req("b")
    assert scheduler.remove("nope") is None
    assert turns(scheduler, 2) == ["a", "a"]
    scheduler.remove("a")
    assert scheduler.next() is None and len(scheduler) == 0


def test_kv_budget_holds_the_queue_head_and_nobody_overtakes_it() -> None:
    scheduler: RoundRobinScheduler[Req] = RoundRobinScheduler(max_running=4, capacity_tokens=100)
    scheduler.add(Req("a", 60))
    scheduler.add(Req("big", 50))  # 60 + 50 > 100: waits
    scheduler.add(Req("small", 10))  # would fit, but must not overtake "big"
    assert turns(scheduler, 2) == ["a", "a"]
    scheduler.remove("a")
    assert turns(scheduler, 2) == ["big", "small"]


def test_a_request_larger_than_the_budget_still_runs_alone() -> None:
    scheduler: RoundRobinScheduler[Req] = RoundRobinScheduler(max_running=2, capacity_tokens=100)
    scheduler.add(Req("huge", 5000))
    scheduler.add(Req("b", 10))
    assert turns(scheduler, 2) == ["huge", "huge"]


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="max_running"):
        RoundRobinScheduler(max_running=0, capacity_tokens=10)
