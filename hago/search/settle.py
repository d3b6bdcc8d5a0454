"""Re-time the candidates that decide the answer side by side, before the search picks one.

A search measures each candidate once, when it first reaches it, so two
candidates' latencies can be minutes apart. On a machine whose speed drifts
(a shared or thermally limited host; on session 15's EPYC one build's three
settle rounds took 1.56, 1.86 and 2.03 ms) that order decides the answer:
the EfficientNet-Lite0 search measured a mixed bf16/fp32 build at 2.56 ms
against FP32's 2.61 ms taken in a faster phase, and returned FP32; re-timed
side by side the mixed build took 1.86 ms to FP32's 2.55 (1.37x faster).

So before choosing, the contenders (the fastest few candidates that meet the
target and fit the weight budget, plus FP32, the build an answer must never
lose to) are measured again in interleaved rounds, each round opened by the
next contender (the first build timed in a round runs slower on these
machines), and each contender's latency becomes the median of its rounds.
The answer is then chosen among them (:func:`settled_group`), so every ratio
the choice rests on comes from the same minutes. The rounds
are logged (``settled|KEY``), so a resumed search reads the same latencies and
only settles again when a new candidate joins the contenders. Settling does
not count against ``max_trials``: it re-times builds the search already made.
With ``settle_rounds=0`` the engine ignores settled records too, and the
first measurements decide, as before this module.
"""

from __future__ import annotations

import logging
import statistics

from ..errors import MeasureError

log = logging.getLogger(__name__)

#: how many of the fastest candidates meeting the target are re-timed (FP32 comes on top)
CONTENDERS = 3


def contenders(engine, top: int = CONTENDERS) -> list:
    """The measured candidates whose order decides the answer: the ``top`` fastest that meet the target (and
    fit the weight budget), then FP32 if measured; at least two, else none (nothing to order)."""
    cands = [c for c in engine.all_candidates()
             if c.latency_ms is not None and c.error is None and c.accuracy is not None]
    good = sorted((c for c in cands if c.accuracy >= engine.threshold and engine.fits(c.point)),
                  key=lambda c: (c.latency_ms, c.key))[:top]
    fp32 = next((c for c in cands if c.point == engine.space.all_float()), None)
    if fp32 is not None and all(c.key != fp32.key for c in good):
        good.append(fp32)
    return good if len(good) >= 2 else []


def settled(engine, key: str) -> float | None:
    """The side-by-side latency logged for the candidate ``key``, if it was settled."""
    rec = engine.log.get(f"settled|{key}")
    return None if rec is None else rec["latency_ms"]


def settled_group(engine) -> set[str]:
    """The keys of the last group settled together (empty if none): the choice is made among them only, since
    a candidate outside it was timed in other minutes."""
    recs = [r for k, r in engine.log.snapshot() if k.startswith("settled|")]
    return set(max(recs, key=lambda r: r["time"])["group"]) if recs else set()


def settle(engine, rounds: int) -> int:
    """Re-time :func:`contenders` in ``rounds`` interleaved rounds and log each one's median; returns how many
    builds were re-timed (0 when there is nothing to order, ``rounds`` is 0, or every contender is already
    settled in one group)."""
    group = contenders(engine)
    if rounds <= 0 or not group:
        return 0
    keys = sorted(c.key for c in group)
    if all((rec := engine.log.get(f"settled|{c.key}")) is not None and rec.get("group") == keys for c in group):
        return 0  # a resumed search: these latencies were already taken side by side
    libs = {c.key: engine.export(c.point) for c in group}
    times: dict[str, list[float]] = {c.key: [] for c in group}
    for r in range(rounds):
        order = group[r % len(group):] + group[:r % len(group)]
        for c in order:
            m = engine.measure_now(libs[c.key])
            if m.error is not None or m.latency_ms is None:
                raise MeasureError(f"re-timing {c.label} beside the other contenders failed: {m.error}")
            times[c.key].append(m.latency_ms)
    for c in group:
        ms = statistics.median(times[c.key])
        engine.log.add({"key": f"settled|{c.key}", "point": list(c.point), "latency_ms": ms,
                        "first_ms": c.latency_ms, "rounds": times[c.key], "group": keys})
        log.info("settled %s: %.3f ms side by side (first measured %.3f ms)", c.label, ms, c.latency_ms)
    return len(group) * rounds
