from __future__ import annotations

from k3d_registry_dockerd.common.bounded import BoundedDict


def test_keeps_only_the_newest_entries() -> None:
    remembered: BoundedDict[str, int] = BoundedDict(2)
    for number, key in enumerate("abc"):
        remembered[key] = number
    assert dict(remembered) == {"b": 1, "c": 2}


def test_setting_a_key_again_makes_it_the_newest() -> None:
    remembered: BoundedDict[str, int] = BoundedDict(2)
    remembered["a"], remembered["b"] = 1, 2
    remembered["a"] = 3
    remembered["c"] = 4
    assert dict(remembered) == {"a": 3, "c": 4}
    del remembered["a"]
    assert list(remembered) == ["c"]
