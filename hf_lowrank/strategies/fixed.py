"""Fixed rank: the layout of LowRankConfig, never changed.

With ``init="kaiming"`` this is the naive from-scratch control every comparison needs; with
``init="spectral"`` / ``"spectral-ones"`` and ``frobenius_decay`` it is Kamalakara et al.'s
fixed-rank recipe.
"""

from __future__ import annotations

from .base import RankStrategy


class FixedRank(RankStrategy):
    """No rank changes: ranks stay as configured."""

    name = "fixed"
