"""What to generate (``SamplingParams``) and how the next tokens are drawn.

Names and defaults follow vLLM's ``SamplingParams`` so its users feel at
home. Invalid values raise :class:`~enigma.errors.BadRequestError` naming the
field, the value and the allowed range.

The sampler works on a batch of rows (one per sequence) in the order vLLM
uses: penalties (repetition on prompt+output, presence/frequency on output),
min_tokens (EOS and stop ids masked), a grammar's mask (structured output,
:mod:`enigma.guided`), then greedy argmax for temperature 0, else
temperature, top-k, top-p, min-p and a draw from the seeded generator.
Reported logprobs are those of the raw model distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from enigma.errors import BadRequestError
from enigma.transfer import to_device

_EPSILON = 1e-5


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise BadRequestError(f"stop must be a string or a list of strings, got {value!r}")


def _to_int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise BadRequestError(f"stop_token_ids must be a list of integers, got {value!r}")


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to sample one prompt's completions (vLLM's names and meanings)."""

    n: int = 1
    """Completions to return for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1: no top-k."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    """Same seed, same output (per completion index)."""
    stop: tuple[str, ...] = attrs.field(default=(), converter=_to_str_tuple)
    """Strings that end the completion; never included unless ``include_stop_str_in_output``."""
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_to_int_tuple)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    """None: until the model's context is full."""
    min_tokens: int = 0
    logprobs: int | None = None
    """Return this many top logprobs per generated token (plus the chosen token's)."""
    prompt_logprobs: int | None = None
    """Return this many top logprobs per prompt token (plus the prompt token's); the first is None."""
    prompt_logprobs_start: int = 0
    """With ``prompt_logprobs``: score the prompt from this position on (earlier positions are None), so
    that the tokens before it may come from the prefix cache — a shared context scored once (evaluation)."""
    skip_special_tokens: bool = True
    guided_decoding: Any = None
    """An :class:`enigma.guided.GuidedDecodingParams` (a JSON schema, regex, choice or grammar the
    completion must follow), or a dict of its fields."""

    def __attrs_post_init__(self) -> None:
        _check_int("n", self.n, minimum=1)
        if isinstance(self.guided_decoding, dict):
            from enigma.guided import GuidedDecodingParams

            try:
                object.__setattr__(self, "guided_decoding", GuidedDecodingParams(**self.guided_decoding))
            except TypeError as exc:
                raise BadRequestError(f"guided_decoding: {exc}") from None
        _check_number("temperature", self.temperature, 0.0, None, "≥ 0 (0 is greedy)")
        _check_number("top_p", self.top_p, 0.0, 1.0, "in (0, 1]", exclusive_low=True)
        _check_int("top_k", self.top_k, minimum=-1, allowed="-1, 0 (both mean off) or ≥ 1")
        _check_number("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, None, "> 0", exclusive_low=True)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=None)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise BadRequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check_int("prompt_logprobs_start", self.prompt_logprobs_start, minimum=0)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=0, maximum=20)
        if any(not s for s in self.stop):
            raise BadRequestError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPSILON


def _check_int(name: str, value: Any, *, minimum: int | None, maximum: int | None = None,
               allowed: str | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if allowed is None:
            bounds = [f"≥ {minimum}" if minimum is not None else "", f"≤ {maximum}" if maximum is not None else ""]
            allowed = "an integer" + (" " + " and ".join(b for b in bounds if b) if any(bounds) else "")
        raise BadRequestError(f"{name} = {value!r} is invalid: expected {allowed}")


def _check_number(name: str, value: Any, low: float | None, high: float | None, allowed: str, *,
                  exclusive_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if exclusive_low else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise BadRequestError(f"{name} = {value!r} is invalid: expected a number {allowed}")


@attrs.frozen
class Logprob:
    """One token's log-probability under the model (vLLM's ``Logprob``)."""

    logprob: float
    rank: int | None = None
    """1 for the most likely token."""
    decoded_token: str | None = None


@attrs.define
class SamplingRow:
    """One sequence's sampling state, as the sampler needs it."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    stop_ids: frozenset[int] = frozenset()
    """EOS and stop token ids, masked while fewer than ``min_tokens`` are out."""
    constraint: Any = None
    """A :class:`enigma.guided.GrammarConstraint`: only the tokens it allows are drawn."""


@attrs.frozen
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    """Per row: top-``logprobs`` entries plus the chosen token's; None if not asked."""


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded for one completion, or None to use the global one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, presence and frequency penalties and min_tokens masking, in place: each for all the rows
    that ask for it at once, from one table of token counts (no per-row kernels)."""
    repeat = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if repeat:
        seen = _token_table([(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in repeat], logits)
        if seen is not None:
            where = to_device(repeat, logits.device)
            penalty = to_device([rows[i].params.repetition_penalty for i in repeat], logits.device,
                                dtype=logits.dtype)[:, None]
            values = logits[where]
            penalized = torch.where(values > 0, values / penalty, values * penalty)
            logits[where] = torch.where(seen > 0, penalized, values)
    counted = [i for i, row in enumerate(rows)
               if (row.params.presence_penalty or row.params.frequency_penalty) and row.output_token_ids]
    if counted:
        counts = _token_table([(rows[i].output_token_ids,) for i in counted], logits).to(logits.dtype)
        where = to_device(counted, logits.device)
        frequency, presence = (to_device([getattr(rows[i].params, name) for i in counted], logits.device,
                                         dtype=logits.dtype)[:, None]
                               for name in ("frequency_penalty", "presence_penalty"))
        logits[where] -= frequency * counts + presence * (counts > 0)
    stopped = [(i, token) for i, row in enumerate(rows)
               if len(row.output_token_ids) < row.params.min_tokens and row.stop_ids for token in row.stop_ids]
    if stopped:
        at = to_device(stopped, logits.device)
        logits[at[:, 0], at[:, 1]] = float("-inf")
    return logits


def _token_table(row_parts: Sequence[Sequence[Sequence[int]]], logits: torch.Tensor) -> torch.Tensor | None:
    """``[rows, vocab]`` int counts of the token ids in each row's parts (its prompt and its output, say; ids
    outside the vocabulary ignored), counted on the logits' device from one upload of flat indices; None when
    every row is empty. The ids go through numpy, not nested Python lists: at 256 rows of 16-768 tokens and a
    32,000-token vocabulary the whole table took 19 ms where padded lists took 65 (a 2-core CPU; most of the 19
    is allocating the table)."""
    arrays = [np.asarray(part, dtype=np.int64) for parts in row_parts for part in parts]
    lengths = np.array([sum(len(part) for part in parts) for parts in row_parts])
    if not lengths.any():
        return None
    vocab = logits.shape[1]
    ids = np.concatenate(arrays)
    flat = np.repeat(np.arange(len(row_parts), dtype=np.int64) * vocab, lengths) + ids
    flat = flat[(ids >= 0) & (ids < vocab)]
    table = torch.zeros(len(row_parts) * vocab, dtype=torch.int32, device=logits.device)
    index = to_device(flat, logits.device)
    return table.index_add_(0, index, torch.ones_like(index, dtype=torch.int32)).view(len(row_parts), vocab)


def needs_processing(row: SamplingRow) -> bool:
    """Whether a penalty or min_tokens changes this row's logits (:func:`process_logits`); grammar
    constraints aside."""
    params = row.params
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or (len(row.output_token_ids) < params.min_tokens and bool(row.stop_ids)))


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on one row's logits."""
    return _filter_rows(logits[None], [params])[0]


def _filter_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on ``[rows, vocab]`` logits, each row with its own parameters, in a
    few batched ops whatever the number of rows (no per-row kernels, no host round trips)."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = to_device([p.temperature for p in params], device, dtype=logits.dtype)
    logits = logits / temperature[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(value < 1.0 for value in top_p):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        if any(top_k):
            # the k-th largest value of each row; rows without top-k keep everything (the smallest value)
            kth_index = to_device([k - 1 if k else vocab - 1 for k in top_k], device)
            kth = sorted_logits.gather(1, kth_index[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        if any(value < 1.0 for value in top_p):
            probs = sorted_logits.softmax(-1)
            limit = to_device(top_p, device, dtype=probs.dtype)[:, None]
            outside = (probs.cumsum(-1) - probs > limit) & (limit < 1.0)  # keeps the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(outside).scatter(1, order, outside), float("-inf"))
    min_p = [p.min_p for p in params]
    if any(value > 0.0 for value in min_p):
        probs = logits.softmax(-1)
        floor = to_device(min_p, device, dtype=probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's distribution after temperature, top-k, top-p and min-p (no penalties, no grammar)."""
    return _filter(logits, params).softmax(-1)


def constrained_rows(rows: Sequence[SamplingRow]) -> list[int]:
    """The rows held to a grammar (structured output)."""
    return [index for index, row in enumerate(rows) if row.constraint is not None]


def grammar_masks(rows: Sequence[SamplingRow], width: int) -> torch.Tensor | None:
    """The allowed-token masks of the constrained rows, in their order (None when there are none)."""
    constrained = constrained_rows(rows)
    if not constrained:
        return None
    from enigma.guided import allowed_tokens

    return allowed_tokens([rows[index].constraint for index in constrained], width)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow], *, masks: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Penalties, min_tokens and grammar masks applied to ``logits`` (a copy where anything applies):
    what temperature, top-k/p and min-p then work on."""
    if any(needs_processing(row) for row in rows):
        logits = apply_penalties(logits.clone(), rows)
    constrained = constrained_rows(rows)
    if constrained:
        if masks is None:
            from enigma.guided import allowed_tokens

            masks = allowed_tokens([rows[index].constraint for index in constrained], logits.shape[-1])
        masks = masks.to(logits.device)
        index = to_device(constrained, logits.device)
        logits = logits.clone()
        held = logits[index].masked_fill(~masks, float("-inf"))
        # a grammar that allows only what a penalty forbade (EOS under min_tokens): the grammar wins
        stuck = torch.isneginf(held).all(dim=-1)
        if bool(stuck.any()):
            held[stuck] = torch.where(masks[stuck], 0.0, float("-inf"))
        logits[index] = held
    return logits


def sampling_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """The distribution each row's next token is drawn from, ``[rows, vocab]``: after
    :func:`process_logits`, temperature, top-k, top-p and min-p; for greedy rows all the mass on
    the argmax. What :func:`sample` draws from, and what speculative decoding must reproduce."""
    logits = process_logits(logits, rows)
    probs = torch.zeros_like(logits)
    greedy = [index for index, row in enumerate(rows) if row.params.greedy]
    if greedy:
        chosen = to_device(greedy, logits.device)
        probs[chosen, logits[chosen].argmax(dim=-1)] = 1.0
    drawn = [index for index, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        chosen = to_device(drawn, logits.device)
        probs[chosen] = _filter_rows(logits[chosen], [rows[index].params for index in drawn]).softmax(-1)
    return probs


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], *, masks: torch.Tensor | None = None
           ) -> SamplerOutput:
    """Choose the next token of every row. ``logits``: ``[rows, vocab]`` float32. ``masks``: the
    constrained rows' allowed tokens when computed already (:func:`grammar_masks`, beside the forward)."""
    return start_sample(logits, rows, masks=masks).result()


class PendingSample:
    """A step's draw, made on the logits' device and on its way to the host: :attr:`token_ids` are there at
    once (on the device: what the next step can feed from before the host knows them), :meth:`result` waits
    for the one transfer that brings ids and logprobs back."""

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, rows: Sequence[SamplingRow],
                 widest: int) -> None:
        self.token_ids = token_ids
        """``[rows]`` int64 on the logits' device."""
        self._rows, self._widest = rows, widest
        self._logprobs = any(row.params.logprobs is not None for row in rows)
        self._event = None
        if packed.is_cuda:  # into pinned memory without waiting; result() waits for it
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            packed = host
        self._packed = packed

    def result(self) -> SamplerOutput:
        """The ids and logprobs as Python values (waits for the device)."""
        if self._event is not None:
            self._event.synchronize()
        packed = self._packed.tolist()
        if not self._logprobs:
            return SamplerOutput([int(token) for token in packed], [None] * len(self._rows))
        return _unpack_logprobs(packed, self._rows, self._widest)


def start_sample(logits: torch.Tensor, rows: Sequence[SamplingRow], *, masks: torch.Tensor | None = None
                 ) -> PendingSample:
    """:func:`sample`'s work queued on the logits' device, the transfer to the host started (see
    :class:`PendingSample`)."""
    want_logprobs = any(row.params.logprobs is not None for row in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    logits = process_logits(logits, rows, masks=masks)

    chosen = logits.argmax(dim=-1)  # greedy rows keep these
    drawn = [index for index, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        chosen[to_device(drawn, logits.device)] = _draw(logits, [rows[index] for index in drawn], drawn)
    if not want_logprobs:
        return PendingSample(chosen, chosen, rows, 0)  # the step's one transfer from the device
    packed, widest = _pack_logprobs(raw_logprobs, chosen, rows)
    return PendingSample(chosen, packed, rows, widest)


def _pack_logprobs(raw_logprobs: torch.Tensor, chosen: torch.Tensor, rows: Sequence[SamplingRow]
                   ) -> tuple[torch.Tensor, int]:
    """The chosen ids and, for the rows that asked, their logprob, rank and the top entries, in one float64
    tensor (read back with the ids in one transfer); and how many top entries each row has there."""
    wanted = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
    where = to_device(wanted, chosen.device)
    row_logprobs = raw_logprobs[where]
    chosen_logprobs = row_logprobs.gather(1, chosen[where][:, None])
    ranks = (row_logprobs > chosen_logprobs).sum(dim=1) + 1
    widest = max(rows[index].params.logprobs for index in wanted)
    values, ids = torch.topk(row_logprobs, widest)
    return torch.cat([chosen.double(), chosen_logprobs[:, 0].double(), ranks.double(), values.double().flatten(),
                      ids.double().flatten()]), widest


def _unpack_logprobs(packed: list[float], rows: Sequence[SamplingRow], widest: int) -> SamplerOutput:
    """:func:`_pack_logprobs`' tensor, read back: the ids, and :func:`top_logprobs`' entries for the rows
    that asked."""
    wanted = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
    count, many = len(rows), len(wanted)
    token_ids = [int(token) for token in packed[:count]]
    chosen_values, rank_values = packed[count:count + many], packed[count + many:count + 2 * many]
    top_values = packed[count + 2 * many:count + 2 * many + many * widest]
    top_ids = packed[count + 2 * many + many * widest:]
    logprobs: list[dict[int, Logprob] | None] = [None] * count
    for slot, index in enumerate(wanted):
        entries = {token_ids[index]: Logprob(chosen_values[slot], rank=int(rank_values[slot]))}
        for rank in range(rows[index].params.logprobs):
            entries.setdefault(int(top_ids[slot * widest + rank]), Logprob(top_values[slot * widest + rank],
                                                                            rank=rank + 1))
        logprobs[index] = entries
    return SamplerOutput(token_ids, logprobs)


def _draw(logits: torch.Tensor, rows: Sequence[SamplingRow], indices: Sequence[int]) -> torch.Tensor:
    """One token for each of ``rows`` (the rows of ``logits`` at ``indices``), drawn after their filters. Rows
    with their own generator (a seed) draw alone from it, so that a seeded completion does not depend on its
    batch; the others draw together from torch's global generator."""
    device = logits.device
    probs = _filter_rows(logits[to_device(indices, device)], [row.params for row in rows]).softmax(-1)
    tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    shared = [position for position, row in enumerate(rows) if row.generator is None]
    if shared:
        where = to_device(shared, device)
        tokens[where] = torch.multinomial(probs[where], 1).squeeze(1)
    for position, row in enumerate(rows):
        if row.generator is not None:
            tokens[position] = torch.multinomial(probs[position], 1, generator=row.generator)[0]
    return tokens


def with_token_texts(entries: dict[int, Logprob], tokenizer: Any) -> dict[int, Logprob]:
    """``entries`` with each token's text filled in (``decoded_token``, special tokens shown)."""
    return {token_id: Logprob(entry.logprob, entry.rank, tokenizer.decode([token_id], skip_special_tokens=False))
            for token_id, entry in entries.items()}


def top_logprobs(row_logprobs: torch.Tensor, token_id: int, k: int) -> dict[int, Logprob]:
    """The ``k`` most likely tokens' logprobs, plus ``token_id``'s, with ranks."""
    chosen = float(row_logprobs[token_id])
    entries = {token_id: Logprob(chosen, rank=int((row_logprobs > chosen).sum()) + 1)}
    if k:
        values, ids = torch.topk(row_logprobs, k)
        for rank, (value, top_id) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            entries.setdefault(top_id, Logprob(value, rank=rank))
    return entries
