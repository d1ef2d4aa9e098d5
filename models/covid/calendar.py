"""Calendar: steps are days with real dates; weekdays, weekends and an NYC public-school calendar.

Simplified NYC DOE calendar (the same every year; documented in README):

- school days are Monday-Friday, except
- summer break: 27 June - 9 September (inclusive),
- winter recess: 24 December - 1 January,
- mid-winter recess: the week (Mon-Fri) containing the third Monday of February,
- spring recess: 8 - 16 April,
- single holidays: Martin Luther King Jr. Day (3rd Monday of January), Memorial Day (last Monday of
  May), Columbus Day (2nd Monday of October), Election Day (first Tuesday after the first Monday of
  November), Veterans Day (11 November), Thanksgiving Thursday and Friday.

Work days are Monday-Friday except New Year's Day, Memorial Day, 4 July, Labor Day (1st Monday of
September), Thanksgiving Thursday and 25 December.

Pandemic school closures are *not* part of the calendar: they are the `school_closure` intervention.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

DEFAULT_START = dt.date(2020, 3, 1)


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    """The n-th (1-based) given weekday (Mon=0) of a month; n = -1 for the last one."""
    if n > 0:
        first = dt.date(year, month, 1)
        return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))
    last = dt.date(year + (month == 12), month % 12 + 1, 1) - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


@lru_cache(maxsize=None)
def _school_holidays(year: int) -> frozenset[dt.date]:
    days: set[dt.date] = set()

    def span(a: dt.date, b: dt.date) -> None:
        while a <= b:
            days.add(a)
            a += dt.timedelta(days=1)

    span(dt.date(year, 6, 27), dt.date(year, 9, 9))
    span(dt.date(year, 12, 24), dt.date(year, 12, 31))
    span(dt.date(year, 1, 1), dt.date(year, 1, 1))
    presidents = _nth_weekday(year, 2, 0, 3)
    span(presidents, presidents + dt.timedelta(days=4))
    span(dt.date(year, 4, 8), dt.date(year, 4, 16))
    election = _nth_weekday(year, 11, 0, 1) + dt.timedelta(days=1)
    thanksgiving = _nth_weekday(year, 11, 3, 4)
    days.update({_nth_weekday(year, 1, 0, 3), _nth_weekday(year, 5, 0, -1), _nth_weekday(year, 10, 0, 2), election,
                 dt.date(year, 11, 11), thanksgiving, thanksgiving + dt.timedelta(days=1)})
    return frozenset(days)


@lru_cache(maxsize=None)
def _work_holidays(year: int) -> frozenset[dt.date]:
    return frozenset({dt.date(year, 1, 1), _nth_weekday(year, 5, 0, -1), dt.date(year, 7, 4), _nth_weekday(year, 9, 0, 1),
                      _nth_weekday(year, 11, 3, 4), dt.date(year, 12, 25)})


def is_school_day(date: dt.date) -> bool:
    return date.weekday() < 5 and date not in _school_holidays(date.year)


def is_work_day(date: dt.date) -> bool:
    return date.weekday() < 5 and date not in _work_holidays(date.year)


def date_of(start: dt.date | None, step: int) -> dt.date:
    """Calendar date of a step (runs without a start date begin on `DEFAULT_START`)."""
    return (start or DEFAULT_START) + dt.timedelta(days=step)
