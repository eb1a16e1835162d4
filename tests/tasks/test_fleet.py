"""The fleet on the virtual clock: seeded speeds, availability and arrivals; trace files checked."""

import numpy as np
import pytest

from lifelong.config import ClockConfig
from lifelong.tasks.fleet import FleetError, build_fleet


def test_markov_availability_is_on_its_stationary_share_and_seeded():
    clock = ClockConfig(hours=2000, on_hours=1.0, off_hours=3.0, arrival_spread_hours=0)
    fleet = build_fleet(clock, 50, 3, seed=0)
    assert fleet.online_fraction(2000) == pytest.approx(0.25, abs=0.02)
    again = build_fleet(clock, 50, 3, seed=0)
    assert again.windows == fleet.windows and np.array_equal(again.speeds, fleet.speeds)
    assert build_fleet(clock, 50, 3, seed=1).windows != fleet.windows


def test_speeds_are_heavy_tailed_and_durations_follow():
    fleet = build_fleet(ClockConfig(speed_sigma=1.0, round_minutes=12), 2000, 1, seed=0)
    assert np.median(fleet.speeds) == pytest.approx(1.0, rel=0.1)
    durations = np.array([fleet.duration(c) for c in range(2000)])
    assert np.median(durations) == pytest.approx(0.2, rel=0.1)  # 12 minutes
    assert np.quantile(durations, 0.99) > 8 * np.median(durations)  # lognormal, sigma 1: ~10x


def test_arrivals_are_staggered_and_in_order():
    fleet = build_fleet(ClockConfig(experience_hours=4, arrival_spread_hours=1, availability="always"), 20, 3, seed=0)
    assert (np.diff(fleet.arrivals, axis=1) >= 0).all() and (fleet.arrivals[:, 1] >= 4).all()
    c = 3
    assert fleet.experience_at(c, fleet.arrivals[c, 0] - 1e-6) == -1
    assert fleet.experience_at(c, fleet.arrivals[c, 1]) == 1
    assert not fleet.ready(c, fleet.arrivals[c, 0] - 1e-6) and fleet.ready(c, fleet.arrivals[c, 0])


def test_daily_windows_repeat_every_day():
    fleet = build_fleet(ClockConfig(availability="daily", on_hours=6, hours=72), 5, 1, seed=0)
    for w in fleet.windows:
        total = sum(e - s for s, e in w)
        assert total == pytest.approx(18, abs=1e-9)


def test_trace_files(tmp_path):
    (tmp_path / "t.csv").write_text("client,start_hour,end_hour\n0,1,3\n0,2.5,4\n2,0,1\n")
    clock = ClockConfig(availability="trace", trace=tmp_path / "t.csv", hours=10)
    fleet = build_fleet(clock, 3, 1, seed=0)
    assert fleet.windows == [[(1.0, 4.0)], [], [(0.0, 1.0)]]  # overlapping intervals merged
    assert fleet.online(0, 3.5) and not fleet.online(0, 4.0) and fleet.online_until(0, 2) == 4.0
    assert fleet.next_online(1, 0) is None and fleet.next_online(2, 2) is None
    for text, message in [("5,0,1\n", r"client 5 is not one of the run's 3"), ("0,-1,2\n", "0 <= start < end"),
                          ("0,3,2\n", "0 <= start < end"), ("0,x\n", "expected client,start_hour,end_hour")]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(FleetError, match=message):
            build_fleet(ClockConfig(availability="trace", trace=tmp_path / "bad.csv"), 3, 1, seed=0)


def test_ready_clients_is_the_vectorised_ready():
    fleet = build_fleet(ClockConfig(hours=24, arrival_spread_hours=2), 200, 3, seed=3)
    for t in np.linspace(0, 24, 97):
        assert fleet.ready_clients(t).tolist() == [c for c in range(200) if fleet.ready(c, t)]
