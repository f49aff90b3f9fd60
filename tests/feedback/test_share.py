"""`learn.max_share_per_key`: the water level each key is cut to.

    pytest tests/feedback/test_share.py
"""

from __future__ import annotations

import pytest

from feedback.share import water_level


@pytest.mark.parametrize(("per_key", "uncapped", "share", "level"), [
    ([120, 30, 10], 40, 0.25, 25),   # 25 of 25 + 25 + 10 + 40 = 100
    ([10, 10, 10, 10], 0, 0.25, None),  # nobody is over
    ([100], 0, 0.5, 0),              # one key and nothing else: it would be the whole snapshot
    ([100, 5], 10, 0.5, 15),
])
def test_water_level(per_key, uncapped, share, level):
    assert water_level(per_key, uncapped=uncapped, max_share=share) == level
    if level is not None:
        kept = [min(n, level) for n in per_key]
        assert max(kept) <= share * (uncapped + sum(kept))
        more = [min(n, level + 1) for n in per_key]
        assert max(more) > share * (uncapped + sum(more))  # the largest level that holds
