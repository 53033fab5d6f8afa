"""Listing a page of tags or repositories costs that page: the paging on its own (the HTTP side is in
`test_api.py`)."""

from __future__ import annotations

from k3d_registry_dockerd.mirror.listing import Page, catalog_name, take_page


async def test_take_page_after_last_up_to_n() -> None:
    items = [f"t{i:02}" for i in range(10)]
    assert await take_page(items, str, Page()) == (items, False)
    assert await take_page(items, str, Page(limit=3)) == (["t00", "t01", "t02"], True)
    assert await take_page(items, str, Page("t02", 3)) == (["t03", "t04", "t05"], True)
    assert await take_page(items, str, Page("t06", 3)) == (["t07", "t08", "t09"], False)
    assert await take_page(items, str, Page("t05")) == (items[6:], False)
    # `last` need not be an item; nothing after it is an empty last page.
    assert await take_page(items, str, Page("t035", 2)) == (["t04", "t05"], True)
    assert await take_page(items, str, Page("zz", 2)) == ([], False)
    assert await take_page(items, str, Page(limit=0)) == ([], False)


async def test_take_page_skips_hidden_items_and_asks_only_about_the_page() -> None:
    items = [f"r{i}" for i in range(10)]
    asked: list[str] = []

    async def visible(item: str) -> bool:
        asked.append(item)
        return item not in ("r1", "r4")

    assert await take_page(items, str, Page(limit=3), visible) == (["r0", "r2", "r3"], True)
    assert asked == ["r0", "r1", "r2", "r3", "r4", "r5"]
    asked.clear()
    # A hidden item at the end is no reason to link to a next page.
    assert await take_page(items[:5], str, Page("r2", 1), visible) == (["r3"], False)
    assert asked == ["r3", "r4"]


def test_catalog_names() -> None:
    assert catalog_name("docker.io/library/alpine") == "alpine"
    assert catalog_name("docker.io/team/app") == "team/app"
    assert catalog_name("ghcr.io/org/thing") == "ghcr.io/org/thing"
    assert catalog_name("127.0.0.1:5001/team/app") is None
