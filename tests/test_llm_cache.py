"""SQLite answer cache: keys, round trip, concurrent writers."""

import multiprocessing as mp

import numpy as np
import pytest

from agenttensor.llm.cache import AnswerCache, cache_key


def test_key_depends_on_everything_that_determines_the_answer():
    base = cache_key("m", "prompt", ["Yes", "No"], {"temperature": 0.0})
    assert base == cache_key("m", "prompt", ["Yes", "No"], {"temperature": 0.0})
    assert len(base) == 64
    others = [
        cache_key("m2", "prompt", ["Yes", "No"], {"temperature": 0.0}),
        cache_key("m", "prompt ", ["Yes", "No"], {"temperature": 0.0}),
        cache_key("m", "prompt", ["No", "Yes"], {"temperature": 0.0}),
        cache_key("m", "prompt", ["Yes", "No"], {"temperature": 0.5}),
    ]
    assert len({base, *others}) == 5
    # settings order does not matter
    assert cache_key("m", "p", ["a", "b"], {"x": 1, "y": 2}) == cache_key("m", "p", ["a", "b"], {"y": 2, "x": 1})


def test_round_trip_and_persistence(tmp_path):
    path = tmp_path / "sub" / "cache.sqlite"
    cache = AnswerCache(path)
    key = cache_key("m", "p", ["Yes", "No"], {})
    cache.put_many([(key, "m", "p", ["Yes", "No"], {}, np.array([0.25, 0.75]))])
    cache.put_many([(key, "m", "p", ["Yes", "No"], {}, np.array([0.5, 0.5]))])  # first writer wins
    cache.close()
    again = AnswerCache(path)
    got = again.get_many([key, "missing"])
    assert list(got) == [key]
    np.testing.assert_array_equal(got[key], [0.25, 0.75])
    assert len(again) == 1


def test_refuses_to_store_nan(tmp_path):
    cache = AnswerCache(tmp_path / "c.sqlite")
    with pytest.raises(ValueError, match="non-finite"):
        cache.put_many([("k", "m", "p", ["Yes", "No"], {}, np.array([np.nan, np.nan]))])
    assert len(cache) == 0


def _writer(path: str, worker: int, n: int) -> None:
    cache = AnswerCache(path)
    for i in range(n):
        # every worker writes its own keys and one shared key per i
        cache.put_many([
            (f"w{worker}-{i}", "m", f"p{i}", ["Yes", "No"], {}, np.array([0.1, 0.9])),
            (f"shared-{i}", "m", f"p{i}", ["Yes", "No"], {}, np.array([0.1, 0.9])),
        ])
        cache.get_many([f"shared-{i}"])


def test_concurrent_processes_share_one_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    AnswerCache(path).close()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(path, w, 100)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    assert len(AnswerCache(path)) == 4 * 100 + 100
