"""How many tokens to draft: the k that gives the most tokens per second, from what was measured.

Verifying ``k`` drafts emits the accepted run plus the target's own token:
``1 + a_1 + a_1 a_2 + ... + a_1 ... a_k`` tokens on average, where ``a_1`` is
the request's own acceptance (its drafts' recent record) and ``a_i`` the
acceptance of draft ``i`` once the drafts before it were kept, measured over
all requests (:meth:`SpeculationLength.continuation`): prompt lookup's copies
run on once they start, so one per-token rate, ``(1 - a**(k + 1)) / (1 - a)``,
would under-rate long drafts. It costs one target step over ``1 + k`` tokens
per request and ``k`` draft forwards. :class:`SpeculationLength` fits the target's
step time as ``fixed + per_token * tokens`` over the decode steps it sees
(exponentially weighted least squares), times the drafting as a ratio to the
target's fitted step over as many tokens as requests drafted for, kept by batch
size and by greedy or sampled batches (one number, measured on single greedy
requests, made batches of 16 and sampled requests draft and lose), tracks each request's
acceptance, and each step picks the k (0 .. ``num_speculative_tokens``)
that maximises emitted tokens per second for the batch. When nothing pays —
acceptance near zero, or a batch large enough for verification to cost what
it saves — k is 0, and after ``PROBE_EVERY`` steps a request tries one draft
token so that a change in acceptance is noticed; each probe that is rejected
doubles the wait (up to ``PROBE_MAX``), one that is accepted resets it, so a
draft that is never right costs next to nothing. Probes only run where
acceptance is what holds drafting back: when even drafts that are always
accepted would not pay at this batch's step costs (a large batch), a probe
could not change the answer, and none is made. Every ``EXPLORE_EVERY``-th
step drafts nothing at all, so that plain steps at the batch size of the moment
are measured beside verifications: without them the fit would only see steps
of one size and could not tell fixed from per-token cost.
"""

from __future__ import annotations

from collections.abc import Sequence


def expected_tokens(acceptance: float, k: int, continuation: Sequence[float] | None = None) -> float:
    """Tokens one verification of ``k`` drafts emits on average when the first draft is accepted at
    ``acceptance`` and draft ``i`` (2, 3, ...), its predecessors accepted, at ``continuation[i - 2]``;
    without ``continuation``, every draft at ``acceptance``."""
    if continuation is None:
        if acceptance >= 1.0:
            return k + 1.0
        return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)
    total = survive = 1.0
    for i in range(k):
        survive *= acceptance if i == 0 else continuation[i - 1]
        total += survive
    return total


def best_length(acceptances: Sequence[float], max_k: int, *, step_fixed: float, step_per_token: float,
                draft_step: float, continuation: Sequence[float] | None = None) -> int:
    """The k in ``0 .. max_k`` that emits the most tokens per second for a batch whose requests
    accept their first draft at ``acceptances`` and later ones at ``continuation`` (see
    :func:`expected_tokens`; each request's k is the same; its tokens count for all)."""
    batch = len(acceptances)
    if batch == 0:
        return 0
    tokens = [float(batch)] * (max_k + 1)  # the batch's expected tokens from k drafts each, k = 0 .. max_k
    for acceptance in acceptances:  # expected_tokens for every k in one pass: a running sum of survivals
        survive = total = 1.0
        for k in range(1, max_k + 1):
            survive *= acceptance if continuation is None or k == 1 else continuation[k - 2]
            total += survive
            tokens[k] += total - 1.0
    best, best_rate = 0, batch / (step_fixed + step_per_token * batch)
    for k in range(1, max_k + 1):
        seconds = step_fixed + step_per_token * batch * (1 + k) + draft_step * k
        rate = tokens[k] / seconds
        if rate > best_rate * 1.0001:
            best, best_rate = k, rate
    return best


class SpeculationLength:
    """Measured costs and acceptances, and the k they call for (see the module's docstring)."""

    PROBE_EVERY = 8
    """Steps a request goes without drafts before it tries one again (at first)."""
    PROBE_MAX = 256
    """The longest wait between probes, after rejected ones."""
    EXPLORE_EVERY = 16
    """Every this many steps, one without drafts (see the module's docstring)."""
    DECIDE_EVERY = 8
    """Steps a decision on k is kept for while the batch is the same and nothing was verified."""
    PRIOR_ACCEPTANCE = 0.7
    """The acceptance assumed before any draft was verified."""
    ACCEPTANCE_DECAY = 0.9
    """Weight of the past in each request's acceptance (per verified draft token); a new request starts
    from the acceptance of all requests so far."""
    STEP_DECAY = 0.98
    """Weight of the past in the step-time fit (per step)."""
    CONTINUATION_DECAY = 0.995
    """Weight of the past in the acceptance of later drafts (per verification, all requests together)."""
    CONTINUATION_PRIOR = 2.0
    """Verifications' worth of weight the estimate of one draft position's acceptance gives the position
    before it's (the first's: the overall acceptance)."""

    def __init__(self, max_k: int, *, adaptive: bool = True) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self._acceptance: dict[str, float] = {}
        self._idle: dict[str, int] = {}
        self._probe_wait: dict[str, int] = {}
        self._probing: set[str] = set()
        self._last_wait = self.PROBE_EVERY  # where a new request's wait starts: the latest probe's verdict
        self._steps = 0
        # weighted sums for the least-squares line seconds = fixed + per_token * tokens; a prior of two points
        # (1 token: 1 unit, 9 tokens: 1.4 units) keeps it sane until steps are measured
        self._n, self._x, self._y, self._xx, self._xy = 0.0, 0.0, 0.0, 0.0, 0.0
        for tokens, seconds in ((1, 1e-3), (9, 1.4e-3)):
            self._add(tokens, seconds, weight=0.5)
        self._decided: tuple[tuple[str, ...], int, tuple[int, bool]] | None = None
        self._draft_ratio: dict[tuple[bool, int], float] = {}
        """A draft forward's time over the target's fitted step time at the same batch size, by (all greedy,
        batch size's power of two): greedy batches draft natively back to back, sampled ones a forward a
        step in torch; and a draft forward over 16 requests costs more next to the target's step than one
        over a single request (measured at batch 1 only, batches of 16 drafted and lost 7%)."""
        self._draft_steps_seen: dict[tuple[bool, int], int] = {}
        self._overall = self.PRIOR_ACCEPTANCE
        # per draft position i >= 2: how often it was verified with its predecessors accepted, how often kept
        self._reached = [0.0] * max(0, max_k - 1)
        self._kept = [0.0] * max(0, max_k - 1)

    # ------------------------------------------------------------ measurements

    def _add(self, tokens: float, seconds: float, *, weight: float = 1.0) -> None:
        self._n += weight
        self._x += weight * tokens
        self._y += weight * seconds
        self._xx += weight * tokens * tokens
        self._xy += weight * tokens * seconds

    def record_step(self, num_tokens: int, seconds: float) -> None:
        """A target step over ``num_tokens`` tokens (decodes and verifications only) took ``seconds``."""
        decay = self.STEP_DECAY
        self._n, self._x, self._y, self._xx, self._xy = (decay * v for v in (self._n, self._x, self._y, self._xx,
                                                                             self._xy))
        self._add(num_tokens, seconds)

    def record_drafting(self, forwards: int, seconds: float, batch: int = 1, *, greedy: bool = True) -> None:
        """Drafting for ``batch`` requests (``greedy``: all of them greedy) took ``seconds`` for ``forwards``
        batched draft forwards."""
        if forwards < 1 or batch < 1:
            return
        ratio = seconds / forwards / self.step_seconds(batch)
        key = (greedy, batch.bit_length())
        seen = self._draft_steps_seen[key] = self._draft_steps_seen.get(key, 0) + 1
        weight = max(0.1, 1.0 / seen)
        self._draft_ratio[key] = ratio if seen == 1 else (1 - weight) * self._draft_ratio[key] + weight * ratio

    def record_verification(self, request_id: str, proposed: int, accepted: int) -> None:
        """A request's ``accepted`` of ``proposed`` drafts were kept."""
        if proposed < 1:
            return
        self._decided = None
        if request_id in self._probing:
            self._probing.discard(request_id)
            wait = self._probe_wait.get(request_id, self._last_wait)
            self._probe_wait[request_id] = self._last_wait = (self.PROBE_EVERY if accepted else
                                                              min(2 * wait, self.PROBE_MAX))
        self._reached = [self.CONTINUATION_DECAY * n for n in self._reached]
        self._kept = [self.CONTINUATION_DECAY * n for n in self._kept]
        for position in range(1, min(proposed, accepted + 1, self.max_k)):  # drafts 2 .. the first rejected
            self._reached[position - 1] += 1.0
            self._kept[position - 1] += 1.0 if position < accepted else 0.0
        acceptance = self._acceptance.get(request_id, self._overall)
        outcomes = [1.0] * accepted + ([0.0] if accepted < proposed else [])
        for outcome in outcomes:
            acceptance = self.ACCEPTANCE_DECAY * acceptance + (1 - self.ACCEPTANCE_DECAY) * outcome
            self._overall = 0.99 * self._overall + 0.01 * outcome
        self._acceptance[request_id] = acceptance

    def continuation(self) -> list[float]:
        """The acceptance of draft 2, 3, ... when the drafts before it were accepted. Drafts tend to run on
        once they start (measured on enigma-tiny: 0.83-1.0 for prompt lookup's drafts 2-8 and 0.92-0.96 for
        the trained draft's, where the acceptance over all draft tokens is 0.52-0.77), which one per-token
        rate would miss, drafting short where long drafts pay."""
        estimates, prior = [], self._overall
        for kept, reached in zip(self._kept, self._reached):
            # few verifications of a position (none beyond the drafts tried so far) lean on the one before it
            prior = (kept + self.CONTINUATION_PRIOR * prior) / (reached + self.CONTINUATION_PRIOR)
            estimates.append(prior)
        return estimates

    def step_seconds(self, tokens: int) -> float:
        """The fitted time of a target step over ``tokens`` tokens."""
        fixed, per_token = self.step_costs()
        return fixed + per_token * tokens

    def draft_seconds(self, batch: int, *, greedy: bool = True) -> float:
        """The expected time of one draft forward over ``batch`` requests (``greedy``: all greedy): from the
        ratio measured at the nearest batch size of the same kind, else of the other kind; 0 before any."""
        size = max(1, batch).bit_length()
        measured = sorted(self._draft_ratio, key=lambda key: (key[0] != greedy, abs(key[1] - size), -key[1]))
        return self._draft_ratio[measured[0]] * self.step_seconds(batch) if measured else 0.0

    def step_costs(self) -> tuple[float, float]:
        """``(fixed, per_token)`` seconds of a target step, as fitted."""
        denominator = self._n * self._xx - self._x * self._x
        if denominator <= 1e-12:
            return self._y / self._n, 0.0
        per_token = max(0.0, (self._n * self._xy - self._x * self._y) / denominator)
        fixed = max(1e-6, (self._y - per_token * self._x) / self._n)
        return fixed, per_token

    # ------------------------------------------------------------ decisions

    def lengths(self, request_ids: Sequence[str], *, greedy: bool = True) -> list[int]:
        """k for each of this step's proposing requests (``greedy``: all of them greedy; 0: no drafts for
        it this time)."""
        if not request_ids:
            return []
        if not self.adaptive:
            return [self.max_k] * len(request_ids)
        self._steps += 1
        if self._steps % self.EXPLORE_EVERY == 0:
            return [0] * len(request_ids)
        k, worth_probing = self._decision(tuple(request_ids), greedy)
        lengths = []
        for request_id in request_ids:
            if k > 0:
                self._idle[request_id] = 0
                lengths.append(k)
                continue
            idle = self._idle.get(request_id, 0) + 1
            probe = worth_probing and idle >= self._probe_wait.setdefault(request_id, self._last_wait)
            self._idle[request_id] = 0 if probe else idle
            if probe:
                self._probing.add(request_id)
            lengths.append(1 if probe else 0)
        return lengths

    def _decision(self, request_ids: tuple[str, ...], greedy: bool) -> tuple[int, bool]:
        """(k, whether probes could pay) for these requests: worked out again when they change, after a
        verification, or every ``DECIDE_EVERY`` steps (the step-time fit moves slowly); kept in between, so
        that a batch not drafting pays next to nothing a step for asking."""
        cached = self._decided
        if cached is not None and cached[0] == request_ids and self._steps - cached[1] < self.DECIDE_EVERY:
            return cached[2]
        fixed, per_token = self.step_costs()
        acceptances = [self._acceptance.get(r, self._overall) for r in request_ids]
        draft_step = self.draft_seconds(len(request_ids), greedy=greedy)
        k = best_length(acceptances, self.max_k, step_fixed=fixed, step_per_token=per_token, draft_step=draft_step,
                        continuation=self.continuation())
        worth_probing = k == 0 and best_length([1.0] * len(request_ids), self.max_k, step_fixed=fixed,
                                                step_per_token=per_token, draft_step=draft_step) > 0
        self._decided = (request_ids, self._steps, (k, worth_probing))
        return k, worth_probing

    def acceptance(self, request_id: str) -> float:
        return self._acceptance.get(request_id, self._overall)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
        self._idle.pop(request_id, None)
        self._probe_wait.pop(request_id, None)
        self._probing.discard(request_id)
