"""A recurrence in words: cron by cron-descriptor (seconds field included), intervals by unit."""

from __future__ import annotations

import pytest

from app.domain import Recurrence
from app.schedule_words import describe_schedule


@pytest.mark.parametrize(
    ("recurrence", "words"),
    [
        pytest.param(
            Recurrence(cron="0 9 * * 1-5", timezone="Europe/Berlin"),
            "At 09:00, Monday through Friday (Europe/Berlin)",
            id="five-fields",
        ),
        pytest.param(
            Recurrence(cron="30 15 9 * * *"), "At 09:15:30 (UTC)", id="leading-seconds-field"
        ),
        pytest.param(Recurrence(cron="*/10 * * * * *"), "Every 10 seconds (UTC)", id="seconds"),
        pytest.param(Recurrence(cron="*/5 * * * *"), "Every 5 minutes (UTC)", id="minutes"),
        pytest.param(
            Recurrence(cron="0 0 L * *"), "At 00:00, on the last day of the month (UTC)", id="L"
        ),
        pytest.param(Recurrence(every=7200), "Every 2 hours", id="hours"),
        pytest.param(Recurrence(every=3600), "Every hour", id="one-hour"),
        pytest.param(Recurrence(every=300), "Every 5 minutes", id="whole-minutes"),
        pytest.param(Recurrence(every=90), "Every 90 seconds", id="not-whole-minutes"),
        pytest.param(Recurrence(every=1), "Every second", id="one-second"),
        pytest.param(Recurrence(every=2.5), "Every 2.5 seconds", id="fraction"),
        pytest.param(None, None, id="no-recurrence"),
    ],
)
def test_a_recurrence_reads_as_words(recurrence: Recurrence | None, words: str | None) -> None:
    assert describe_schedule(recurrence) == words
