"""Adaptive concurrency (pure, clock injected): one provider's answers -> how many requests it gets at once, and
how fast, when its limit is hidden.

Providers throttle with limits they do not publish: a cap on requests in flight, a requests-per-second
budget, or 429s that have nothing to do with our load (other tenants, capacity blips). Each needs a
different answer, and the answers themselves say which it is:

- A throttle that comes back after the provider worked on the request (as slow as a served one) is not
  about our load: the request waits (Retry-After), the limit does not move. Backing off would not lower it.
- A throttle that comes back at once was refused at the door. Before anything was served there is no telling
  (nothing to compare its latency with): only the storm guard below acts.
- What the provider serves at once is measured from the answers, not from one request's count: the answers it
  served in the last round trip (Little's law; a sum over many answers is steady, where the count of ours out
  when one request left differs from the provider's by the requests on their way, over a network).
- Refused at the door at the top (with about that many of ours out): a cap explains it. The limit drops, at
  once, to what the provider serves at once (a precise step down: the next request would meet the same).
- Refused below the top after more of ours were known accepted in the last second than when any accepted
  request left, and this three times in a round trip: our rate explains it. Sends are paced just under it,
  within any second as the provider counts (RateBucket and the window are the actuators). A cut after which
  most requests are still refused, however few are out, says the same: the cut is undone and sends paced
  under what the provider accepted in the last second.
- Refused twice in a row: each refusal frees its slot at once and the next request would meet the same. The
  storm guard holds sends to what is out (lower with each refusal) until an answer is served.
- Every cut and every pace decided on a storm (5 % of a round trip's answers refused) is a trial: if the next
  answers are refused as often as before (and a minority), and again those sent a second later (a rate limit
  still counts the second before the cut), backing off did not help (429s that are not about us): it is
  undone, and refusals at that background share no longer move anything. So load-blind 429s never collapse the
  limit, and a real cap is still found above them.
- Growth: slow start (double per round trip) until the first throttle on a shared provider; then, only
  while requests wait for this limit and more input is coming, +step per round trip, the step doubling
  after each clean round trip; at a limit a throttle found, one probe above it per HOLD (a refused probe
  costs a request or two, and the next probe waits again); more served at once than that limit: the cap
  moved up, grow again. A pace grows 3 % per HOLD without a refusal.

Time comes from the caller (the event loop's clock in a run, a virtual one in tests).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

HOLD = 0.5  # seconds (and at least 5 round trips) at a limit a throttle found before probing above it
DOOR = 0.5  # a throttle quicker than this share of the fastest served request was refused at the door
RATE_MARGIN = 0.97  # pace this much under the rate that was refused
WINDOW = 1.0  # seconds: the trailing window for rates and for "lately"
MIN_ROUND = 8  # answers a round trip needs before its share of refusals means anything
BACKGROUND_MAX = 0.5  # refusals that are not about us are a minority: a provider refusing most of what we send is
HELD_ROUNDS = 3  # round trips over which what the provider serves at once is measured
TOP = 0.75  # a refusal that left with this share of what the provider serves at once out is at the top
TRIAL_BELOW = 0.9  # a cut on trial runs this much below what it cut to
TRIAL_SHARE = 0.05  # a share of refusals at the door below this is a probe refused, not a storm to undo a cut on


class _SlidingMax:
    """The maximum of values added in the last `window` seconds (a monotonic deque)."""

    __slots__ = ("window", "_q")

    def __init__(self, window: float) -> None:
        self.window = window
        self._q: deque[tuple[float, int]] = deque()

    def add(self, at: float, value: int) -> None:
        q = self._q
        while q and q[-1][1] <= value:
            q.pop()
        q.append((at, value))

    def get(self, now: float) -> int | None:
        q = self._q
        while q and q[0][0] < now - self.window:
            q.popleft()
        return q[0][1] if q else None


class Ticket:
    """One send, as the limit saw it leave: when, how many of ours were out, how many of ours the provider was
    known to have accepted in the last second; `refused` once the provider refused it at the door, `settled`
    once it is known accepted (served, or out longer than a refusal takes); `at_door` once a refusal came back
    at once and the limit took it in (the request is not at fault: it goes back through the limit)."""

    __slots__ = ("at", "level", "trailing", "refused", "settled", "at_door")

    def __init__(self, at: float, level: int, trailing: int) -> None:
        self.at, self.level, self.trailing, self.refused, self.settled = at, level, trailing, False, False
        self.at_door = False


@dataclass(slots=True)
class _Trial:
    """A cut or a pace that must pay off: undone if the refusals that caused it go on as before."""

    limit: float  # the limit before
    rate: float | None  # the pace before
    share: float  # the share of answers refused at the door when it was decided
    at: float
    below: float = math.inf  # a cut: judged on requests that left under the new limit (not ones let in before)
    answers: int = 0  # answers to requests sent since (the ones the trial is judged on)
    refused: int = 0
    since: float = -math.inf  # judged on the requests sent from then on (a second verdict: a second after it)


class AdaptiveLimit:
    """One provider's learned concurrency limit (between 1 and `maximum`) and, when it limits a rate, its pace."""

    def __init__(self, maximum: int, initial: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = maximum
        self.limit = float(min(maximum, initial))
        self.slow_start = self.limit < maximum
        self.clock = clock
        self.rtt_min: float | None = None  # the fastest served request lately (seconds)
        self.srtt = 0.0  # smoothed round trip of served requests
        self.ceiling: int | None = None  # a limit a throttle found: probe above it only every HOLD seconds
        self.probed_at = -math.inf
        self.step = 1.0
        self.rate: float | None = None  # requests per second, once the provider showed it limits a rate
        self.rate_probed_at = -math.inf
        self.background = 0.0  # share of answers refused at the door whatever we do (learned from trials)
        self.decreases = 0
        self.door_refusals = 0  # throttles refused at the door
        self.later_refusals = 0  # throttles after the provider worked on the request (not about our load)
        self._trial: _Trial | None = None
        self._window: deque[Ticket] = deque()  # our sends of the last second
        self._accepted = 0  # those of them not refused at the door (served, or still out): what pacing counts
        self._settled = 0  # those of them known accepted: what a send's `trailing` counts (a burst of sends that
        # will be refused does not count, so the requests sent with it do not seem to leave at a higher rate)
        # The most of ours known accepted in the last second when a request that the provider accepted left.
        self._ok_trailing = _SlidingMax(WINDOW)
        self._pending: deque[Ticket] = deque()  # sent, not yet known accepted (in send order)
        self._door_latency = 0.0  # the slowest refusal at the door seen (how long "at once" takes here)
        self._rate_evidence: deque[Ticket] = deque()  # refusals our rate may explain, judged a round trip later
        self._answers: deque[tuple[float, Ticket]] = deque()  # answered at the door or served, last round trip
        self._door_recent = 0
        self._served_since = 0.0
        self._served_at: deque[float] = deque()  # when answers were served, last two round trips
        self._refusals_in_a_row = 0
        self._hold: float | None = None
        self._round_end = 0.0
        self._round_clean = True
        self._round_limited = False
        self._growing = True
        self._rtt_reset_at = 0.0

    @property
    def value(self) -> int:
        """The limit the gate applies: the learned one, or, right after refusals at the door, only what the
        provider holds (until it serves an answer: no storm of refusals through freed slots)."""
        limit = self.limit if self._hold is None else min(self.limit, self._hold)
        trial = self._trial
        if trial is not None and trial.below < math.inf:
            # A cut on trial runs a little below it: a cap's refusals (at the top, over a network: a few even at
            # the cap) stop there, and refusals that go on are not about our load.
            limit = min(limit, TRIAL_BELOW * trial.below)
        return max(1, int(limit))

    # -- sends ---------------------------------------------------------------------------------------------

    def sent(self, now: float, level: int) -> Ticket:
        """A request leaves now with `level` of ours out at the provider; give the ticket back with its answer."""
        self._expire(now)
        self._promote(now)
        ticket = Ticket(now, level, self._settled)
        self._window.append(ticket)
        self._pending.append(ticket)
        self._accepted += 1
        return ticket

    def _promote(self, now: float) -> None:
        """Requests out longer than a refusal at the door takes were accepted: their levels count as served."""
        q = self._pending
        settled = now - max(0.005, 2 * self._door_latency)
        while q and q[0].at <= settled:
            t = q.popleft()
            if not t.refused:
                self._settle(now, t)

    def _settle(self, now: float, ticket: Ticket) -> None:
        if not ticket.settled:
            ticket.settled = True
            self._ok_trailing.add(ticket.at, ticket.trailing)
            if ticket.at + WINDOW > now:
                self._settled += 1

    def _expire(self, now: float) -> None:
        w = self._window
        while w and w[0].at + WINDOW <= now:  # the same sum as pace_delay's: a wait it gives always ends this
            t = w.popleft()
            self._accepted -= not t.refused
            self._settled -= t.settled

    def pace_delay(self, now: float) -> float:
        """Seconds before the next send may leave under the rate the provider showed (0 when none): never more of
        ours accepted in any second than the rate, as the provider counts them (the even spread is limits.py's
        bucket)."""
        if self.rate is None:
            return 0.0
        self._expire(now)
        allowed = int(self.rate * WINDOW)
        if self._accepted < allowed:
            return 0.0
        excess = self._accepted - allowed + 1  # this many accepted sends must leave the window first
        for t in self._window:
            if not t.refused:
                excess -= 1
                if excess <= 0:
                    return max(0.0, t.at + WINDOW - now)
        return 0.0

    def paced(self) -> None:
        """Sends waited for the pace: the rate, not the input, is what bounds them."""
        self._round_limited = True

    # -- answers -------------------------------------------------------------------------------------------

    def served(self, ticket: Ticket, *, latency: float, limited: bool, growing: bool) -> bool:
        """A 2xx. `limited`: requests wait for this limit now; `growing`: more input is coming (no probing while
        the last requests drain). True if the limit the gate applies (or the pace) changed."""
        before = self.value, self.rate
        self._served(ticket, latency, limited, growing)
        return (self.value, self.rate) != before

    def throttled(self, ticket: Ticket, *, latency: float, in_flight: int, limited: bool) -> bool:
        """A 429/503. `in_flight`: how many others of ours are out now. True if the limit the gate applies (or
        the pace) changed."""
        before = self.value, self.rate
        self._throttled(ticket, latency, in_flight, limited)
        return (self.value, self.rate) != before

    def _served(self, ticket: Ticket, latency: float, limited: bool, growing: bool) -> None:
        now = self.clock()
        self._growing = growing
        self._round(now, limited)
        if self.rtt_min is None or latency < self.rtt_min:
            self.rtt_min = latency
        if now >= self._rtt_reset_at:  # forget an old minimum now and then (the path may have changed)
            self._rtt_reset_at = now + 30.0
            self.rtt_min = latency
        self.srtt = latency if self.srtt == 0.0 else 0.875 * self.srtt + 0.125 * latency
        self._settle(now, ticket)
        self._answer(now, ticket, refused=False)
        if not self._served_at:
            self._served_since = now  # answers served without a pause since
        self._served_at.append(now)
        self._refusals_in_a_row = 0
        self._hold = None  # something was served: the storm guard lifts
        if self._trial is not None and self._trial.below < math.inf:
            return  # a cut on trial: no growth until it is judged (answers below it measure nothing above)
        if self.ceiling is not None and self.held(now) > self.ceiling:
            self.ceiling = None  # served more at once than the limit a throttle found: it moved up; grow faster
            self.step = 2.0
        if self.limit >= self.maximum:
            return
        if self.slow_start:
            self.limit = min(float(self.maximum), self.limit + 1.0)
        elif limited and growing:
            if self.ceiling is not None and self.limit >= self.ceiling:
                if now - self.probed_at < max(HOLD, 5 * self.srtt):
                    return
                self.probed_at = now
                self.limit = min(float(self.maximum), self.limit + 1.0)  # one probe above what was refused
            else:
                self.limit = min(float(self.maximum), self.limit + self.step / max(1.0, self.limit))

    def _throttled(self, ticket: Ticket, latency: float, in_flight: int, limited: bool) -> None:
        now = self.clock()
        self._round(now, limited)
        self.slow_start = False
        self._round_clean = False
        if self.rtt_min is None:
            # Nothing served yet: no telling a refusal at the door from one after the work. Only the storm guard.
            self._refuse(now, ticket)
            self._refusals_in_a_row += 1
            self._guard(ticket, in_flight)
            return
        if latency >= DOOR * self.rtt_min:
            self.later_refusals += 1  # the provider worked on it: not about our load (the request waits)
            return
        self.door_refusals += 1
        ticket.at_door = True
        self._door_latency = max(self._door_latency, latency)
        self._refuse(now, ticket)
        self._answer(now, ticket, refused=True)
        self._refusals_in_a_row += 1
        self._guard(ticket, in_flight)
        if self.background and self._share(now) < 2 * self.background + 0.05:
            return  # no more refusals than the background share that backing off did not lower
        self._promote(now)
        ok_trailing = self._ok_trailing.get(now)
        held = self.held(now)
        # At the top: it left with about as many of ours out as the provider serves at once (what it served in the
        # last round trip: a sum over many answers, steady where one request's count is not; on a network the
        # provider's count and ours differ by the requests on their way). A cap explains it: down to what it
        # serves. (At the top a rate explains it as well, a cap of C at a round trip of L being a rate of C / L;
        # but only a cap is lifted by growing, and growth is what finds a cap lifted.)
        # (Not before a whole round trip of answers was seen: until then what it serves at once is not known.)
        top = held > 0 and ticket.level >= TOP * held and now - self._served_since >= max(self.srtt, 0.05)
        # More accepted in the last second than before any success: our rate explains it (below the top: only it).
        over_rate = ok_trailing is not None and ticket.trailing > ok_trailing
        if self.rate is not None and over_rate:
            self._pace(now, ticket.trailing)  # the rate limit found: its pace was still too fast
        elif top:
            self._cut(now, held)
        elif over_rate:
            self._rate_evidence.append(ticket)  # our rate may explain it: judged a round trip later

    def held(self, now: float) -> int:
        """How many of ours the provider serves at once (Little's law): the answers it served per round trip, the
        most of: the last one, the last two and the last three (answers come in waves a round trip apart, and
        our own stalls delay some past a window's edge)."""
        q = self._served_at
        w = max(self.srtt, 0.05)
        while q and q[0] <= now - HELD_ROUNDS * w:
            q.popleft()
        return max(-(-(len(q) - bisect.bisect_right(q, now - k * w)) // k) for k in range(1, HELD_ROUNDS + 1))

    def _refuse(self, now: float, ticket: Ticket) -> None:
        """Not accepted: it no longer counts in what the provider accepted in the last second."""
        if not ticket.refused and ticket.at + WINDOW > now:
            self._accepted -= 1
            self._settled -= ticket.settled
        ticket.refused = True
        ticket.settled = False

    def _guard(self, ticket: Ticket, in_flight: int) -> bool:
        """Refused again at once: each refusal frees its slot at once and the next request would meet the same.
        Hold to what is out (lower with each refusal: a refused request's slot is not refilled) until one is served
        (whatever the refusals are about)."""
        if self._refusals_in_a_row < 2:
            return False
        hold = float(max(1, in_flight))
        if self._hold is not None and hold >= self._hold:
            return False
        self._hold = hold
        return True

    # -- decisions -----------------------------------------------------------------------------------------

    def _cut(self, now: float, held: int) -> bool:
        """Down to what the provider held when it refused (the level the refused request met; not what we have out
        now, which counts refusals still on their way back), at once: a refusal at the door frees its slot at
        once, and the next request would meet the same."""
        target = max(1, held)
        self.probed_at = now
        self.step = 1.0
        self.ceiling = target if self.ceiling is None else min(self.ceiling, target)
        if target >= self.limit:
            return False
        self._try(now)
        if self._trial is not None and self._trial.at == now:
            self._trial.below = target
        self.limit = float(target)
        self.decreases += 1
        return True

    def _pace(self, now: float, refused_at: int) -> bool:
        """Pace sends just under the rate the provider refused (only ever down here; up by probing)."""
        rate = max(1.0, RATE_MARGIN * refused_at / WINDOW)
        self.rate_probed_at = now
        if self.rate is not None and rate >= self.rate:
            return False
        self._try(now)
        self.rate = rate
        return True

    def _judge_rate(self, now: float) -> None:
        """Refusals our rate may explain, judged once the requests sent with them have answered: if none of
        those that succeeded left at a rate as high, and this happened three times in a second, the provider
        limits a rate: pace under it."""
        evidence = self._rate_evidence
        if not evidence or self.rate is not None:
            evidence.clear()
            return
        self._promote(now)
        settled = now - max(self.srtt, 0.05) - 2 * self._door_latency  # and the sends since then known accepted
        ok_trailing = self._ok_trailing.get(now)
        kept = [t for t in evidence if t.at > now - WINDOW and (ok_trailing is None or t.trailing > ok_trailing)]
        evidence.clear()
        evidence.extend(kept)
        ripe = [t for t in kept if t.at <= settled]
        if ripe and now - self._served_since < max(self.srtt, 0.05):
            return  # what the provider serves at once is not known yet: judged when it is
        # Refused with what the provider serves at once out: a cap's refusals, whatever the trailing count said (at
        # the start of a run every send leaves with more accepted than any before it).
        top = TOP * self.held(now)
        ripe = [t for t in ripe if t.level < top]
        if len(ripe) >= 3:
            evidence.clear()
            self._pace(now, min(t.trailing for t in ripe))

    def _try(self, now: float) -> None:
        """A cut or a pace decided on a storm of refusals is a trial; one decided on a refusal or two (a probe
        refused, the first refusals of a run) stands."""
        share = self._share(now)
        if self._trial is None and share >= TRIAL_SHARE:
            self._trial = _Trial(self.limit, self.rate, share, now)

    def _answer(self, now: float, ticket: Ticket, refused: bool) -> None:
        trial = self._trial
        if trial is not None and ticket.at >= max(trial.at, trial.since) and ticket.level < trial.below:
            trial.answers += 1
            trial.refused += refused
        self._answers.append((now, ticket))
        self._door_recent += refused
        self._share(now)  # drops what is older than a round trip

    def _share(self, now: float) -> float:
        """The share of the last round trip's answers refused at the door."""
        q = self._answers
        horizon = now - max(self.srtt, 0.05)
        while q and q[0][0] <= horizon:
            self._door_recent -= q.popleft()[1].refused
        return self._door_recent / len(q) if len(q) >= MIN_ROUND else 0.0

    def _round(self, now: float, limited: bool) -> None:
        """Once per round trip: judge a trial; a clean round trip, while requests waited for the limit, doubles the
        growth step; the pace grows after a while without a refusal."""
        self._round_limited = self._round_limited or limited
        if now < self._round_end:
            return
        self._judge_rate(now)
        trial = self._trial
        if trial is not None and trial.answers >= max(MIN_ROUND, 3 / trial.share):
            # (As many answers as make three refusals likely if backing off did not help: a verdict either way.)
            self._trial = None
            after = trial.refused / trial.answers  # of the requests sent since the cut
            if max(0.5 * trial.share, TRIAL_SHARE) <= after <= BACKGROUND_MAX and trial.refused >= 3:
                # Backing off did not lower the refusals. A rate limit still counts the sends of the second before
                # the cut: judged again on the requests sent a second after it. Then they are not about our load:
                # undo, and learn their share. (Most refused even so: about our load, not yet backed off enough:
                # the cut stands.)
                if trial.since < trial.at + WINDOW:
                    trial.since = max(now, trial.at + WINDOW)
                    trial.answers = trial.refused = 0
                    self._trial = trial
                else:
                    self.limit = max(self.limit, trial.limit)
                    self.rate = trial.rate
                    self.ceiling = None
                    self.background = max(self.background, after)
        if self._round_clean and self._round_limited and self.ceiling is None:
            self.step = min(self.step * 2, max(1.0, self.limit / 2))
        if (self.rate is not None and self._round_limited and self._growing
                and now - self.rate_probed_at >= max(HOLD, 5 * self.srtt)):
            self.rate *= 1.03  # probe a faster pace after a while without a refusal
            self.rate_probed_at = now
        self._round_end = now + max(self.srtt, 0.01)
        self._round_clean = True
        self._round_limited = False
