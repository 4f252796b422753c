"""Next-token selection for the decode loop: sampling parameters, logits processing, seeded draws.

Everything works on a batch: logits [B, V] with one `SamplingParams` per row, so a scheduler can
decode several requests together. The maths follows Hugging Face `generate` as the official
DeepSeek-VL2 demo calls it:

* temperature > 0 (sampling): repetition penalty -> divide by temperature -> top-k -> top-p ->
  softmax -> draw one token;
* temperature == 0 (greedy): argmax of the raw logits, without repetition penalty (the official
  serve path), unless `SamplingParams.penalize_greedy` asks for HF's
  `do_sample=False, repetition_penalty=p` behaviour (argmax of the penalised logits).

Reproducibility: every request owns a `torch.Generator` (see `make_generator`). A sampled row
draws exactly one uniform number per step from its own generator and inverts the cumulative
distribution of its probabilities, so its tokens depend only on its seed, its logits and its
parameters, never on which other requests share the batch (`torch.multinomial` over a batch
would consume one shared random stream).

NaN or inf scores: `choose_tokens` returns ids inside the vocabulary whatever its logits hold;
`sample_next` marks such rows (see `non_finite`).

See README.md for the user-facing description of every parameter.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from .non_finite import mark_non_finite

# Positive temperatures below this are rejected: logits / t would overflow float32.
MIN_TEMPERATURE = 1e-5
# Seeds: one range for given and drawn seeds, [0, 2**32 - 1], so every logged seed can be given
# back (torch.Generator would take up to 2**64 - 1; Cog's schema holds integers exactly to 2**53).
MAX_SEED = 2**32 - 1
_DRAWN_SEED_BITS = 32


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class InvalidSamplingParams(ValueError):
    """A sampling parameter outside what the engine accepts; ``field`` names it, ``problem`` says why."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")

    def named(self, names: Mapping[str, str]) -> str:
        """The message with the parameter under the name the caller's users know (``names``: field -> name)."""
        return f"{names.get(self.field, self.field)} {self.problem}"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (ranges and meaning: README.md), checked once, when made.

    An instance is valid by construction (raises :class:`InvalidSamplingParams` otherwise), so
    the engine uses it without checking again. Whole numbers given for the real-valued fields
    are stored as floats; a bare stop string is one stop string.

    temperature: 0 = greedy; otherwise logits are divided by it before top-k / top-p (0 or >= MIN_TEMPERATURE).
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep the k highest logits (ties with the k-th kept); 0 disables it.
    repetition_penalty: HF rule on every id of the prompt or generated so far; > 0, 1 disables it.
    max_new_tokens: upper bound on generated tokens, >= 1 (the engine may lower it to fit the context).
    seed: None draws a fresh random seed (see `resolve_seed`); otherwise an int in [0, MAX_SEED].
    stop: strings that end generation; the text is cut before the first one to complete.
    penalize_greedy: apply the repetition penalty to greedy rows too (HF `do_sample=False`).
    ignore_eos: keep generating after eos until max_new_tokens (benchmarks; eos is then a token
        like any other and its text is hidden as usual).
    """

    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 2048
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    penalize_greedy: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):  # one stop string, not a sequence of one-character stops
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        self._check()
        for name in ("temperature", "top_p", "repetition_penalty"):  # 0 -> 0.0: the same value
            object.__setattr__(self, name, float(getattr(self, name)))

    def _check(self) -> None:
        """Raise InvalidSamplingParams for the first field outside the engine's domain."""
        t = self.temperature
        if not _is_real_number(t) or not math.isfinite(t) or t < 0:
            raise InvalidSamplingParams("temperature", f"must be a finite number >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise InvalidSamplingParams("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {t!r}")
        p = self.top_p
        if not _is_real_number(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise InvalidSamplingParams("top_p", f"must be in (0, 1] (1 = off), got {p!r}")
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise InvalidSamplingParams("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        r = self.repetition_penalty
        if not _is_real_number(r) or not math.isfinite(r) or r <= 0:
            raise InvalidSamplingParams("repetition_penalty", f"must be a finite number > 0 (1 = off), got {r!r}")
        if not _is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidSamplingParams("max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (not _is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidSamplingParams(
                "seed", f"must be empty (random) or an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidSamplingParams("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.penalize_greedy, bool):
            raise InvalidSamplingParams("penalize_greedy", f"must be a bool, got {self.penalize_greedy!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidSamplingParams("ignore_eos", f"must be a bool, got {self.ignore_eos!r}")

    @property
    def is_greedy(self) -> bool:
        """True when temperature is 0: pick the most likely token, no randomness."""
        return self.temperature == 0


# ----------------------------------------------------------------------------- seeds, masks


def resolve_seed(seed: Optional[int]) -> int:
    """The seed to use: `seed` itself, or a fresh random one in [0, 2**32) when it is None."""
    return secrets.randbits(_DRAWN_SEED_BITS) if seed is None else int(seed)


def make_generator(
    seed: Optional[int], device: torch.device | str = "cpu"
) -> tuple[torch.Generator, int]:
    """A request's random generator on `device` and the seed it was seeded with (log/return it).

    Put the generator on the logits' device: a CUDA generator lets `sample_next` draw without any
    host round trip. The same seed gives different streams on CPU and CUDA generators.
    """
    used_seed = resolve_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(used_seed)
    return generator, used_seed


def make_seen_mask(
    token_ids: Sequence[Sequence[int] | torch.Tensor], vocab_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean mask [B, vocab_size]: True for every id present in row b's prompt ids.

    The reference penalises every prompt id, image placeholder ids included, so pass the full
    `input_ids` of each request.
    """
    seen = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(token_ids):
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"row {row}: token ids must lie in [0, {vocab_size})")
        seen[row, ids.to(device)] = True
    return seen


def update_seen(seen: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mark the newly generated `tokens` [B] in `seen` [B, V], in place; returns `seen`.
    A row's `NON_FINITE_TOKEN` (negative) marks nothing."""
    index = tokens.reshape(-1, 1).to(seen.device)
    chosen = index >= 0
    index = index.clamp(min=0)
    return seen.scatter_(1, index, seen.gather(1, index) | chosen)


# ----------------------------------------------------------------------------- logits processing


@dataclass
class RowColumns:
    """Per-row sampling parameters as device tensors, so one code path serves any batch mix.

    Every field is [B, 1]; a field that is "off" for a row holds the identity value (penalty 1,
    temperature 1, top_k 0, top-p threshold 0 with ``top_p_active`` False), which leaves that
    row's logits bit-identical. ``sampled`` is True for rows that draw (temperature > 0).
    The decode engine keeps one persistent ``RowColumns`` with a row per cache slot.
    """

    penalty: torch.Tensor  # float32
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64
    top_p_threshold: torch.Tensor  # float32, 1 - top_p
    top_p_active: torch.Tensor  # bool
    sampled: torch.Tensor  # bool

    @staticmethod
    def row_values(p: SamplingParams) -> tuple[float, float, int, float, bool, bool]:
        """The column values of one request, in field order."""
        sampled = not p.is_greedy
        penalty = p.repetition_penalty if (sampled or p.penalize_greedy) else 1.0
        if not sampled:
            return penalty, 1.0, 0, 0.0, False, False
        # 1 - top_p computed in double, then compared in float32, as HF's scalar comparison does.
        return penalty, p.temperature, p.top_k, 1 - p.top_p, p.top_p < 1, True

    @classmethod
    def empty(cls, rows: int, device: torch.device | str) -> "RowColumns":
        """Identity (greedy, nothing filtered) columns for ``rows`` rows."""
        return cls(
            penalty=torch.ones(rows, 1, device=device), temperature=torch.ones(rows, 1, device=device),
            top_k=torch.zeros(rows, 1, dtype=torch.long, device=device),
            top_p_threshold=torch.zeros(rows, 1, device=device),
            top_p_active=torch.zeros(rows, 1, dtype=torch.bool, device=device),
            sampled=torch.zeros(rows, 1, dtype=torch.bool, device=device),
        )

    @classmethod
    def of(cls, params: Sequence[SamplingParams], device: torch.device) -> "RowColumns":
        """Columns for a batch of requests (copied to ``device`` without blocking on CUDA)."""
        values = list(zip(*(cls.row_values(p) for p in params)))
        dtypes = (torch.float32, torch.float32, torch.long, torch.float32, torch.bool, torch.bool)
        return cls(*(_row_tensor(v, d, device) for v, d in zip(values, dtypes)))

    def write_row(self, row: int, p: SamplingParams) -> None:
        """Set row ``row`` to the parameters of ``p`` (in place)."""
        for column, value in zip(self.tensors(), self.row_values(p)):
            column[row].fill_(value)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The six column tensors in field order."""
        return (self.penalty, self.temperature, self.top_k, self.top_p_threshold, self.top_p_active, self.sampled)

    def head(self, rows: int) -> "RowColumns":
        """Views of the first ``rows`` rows."""
        return RowColumns(*(t[:rows] for t in self.tensors()))


def needs_processing(params: Sequence[SamplingParams]) -> bool:
    """False when every row takes the plain argmax of its raw logits (greedy, no penalty)."""
    return any(not p.is_greedy or (p.penalize_greedy and p.repetition_penalty != 1.0) for p in params)


def _row_tensor(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[B, 1] tensor of per-row values on `device`, copied without blocking the host on CUDA."""
    column = torch.tensor(values, dtype=dtype).reshape(-1, 1)
    if device.type == "cuda":
        return column.pin_memory().to(device, non_blocking=True)
    return column.to(device)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | float
) -> torch.Tensor:
    """Hugging Face repetition penalty, out of place.

    For every id where `seen` [B, V] is True: logit * penalty if logit < 0, else logit / penalty.
    `penalty` is a float or a per-row [B, 1] tensor; a penalty of 1 leaves logits bit-identical.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_scores(logits: torch.Tensor, seen: torch.Tensor, columns: RowColumns) -> torch.Tensor:
    """The scores each row chooses from, [B, V] float32 (removed tokens are -inf); no host sync.

    Repetition penalty, / temperature, top-k, top-p in HF order, with one stable sort: the
    top-k cut removes a prefix of the ascending order, so the same order serves top-p (the
    removed entries are -inf either way). Ties at the top-p cut: among equal logits the higher
    id is kept. Rows whose columns are identities come out bit-identical to their logits.
    """
    scores = apply_repetition_penalty(logits.float(), seen, columns.penalty) / columns.temperature
    ascending, order = torch.sort(scores, dim=-1, stable=True)
    vocab = scores.shape[-1]
    k = columns.top_k.clamp(min=1, max=vocab)  # [B, 1]
    kth_largest = ascending.gather(1, vocab - k)  # [B, 1]
    use_top_k = columns.top_k > 0
    scores = scores.masked_fill((scores < kth_largest) & use_top_k, -math.inf)
    ascending = ascending.masked_fill((ascending < kth_largest) & use_top_k, -math.inf)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = (cumulative <= columns.top_p_threshold) & columns.top_p_active
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, -math.inf)


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """The scores each row chooses from, [B, V] float32 (removed tokens are -inf).

    Sampled rows (temperature > 0): repetition penalty, / temperature, top-k, top-p, in HF order;
    `softmax` of the result is the distribution `sample_next` draws from.
    Greedy rows: the logits, penalised only when `penalize_greedy`; their argmax is the token.
    """
    _check_batch(logits, seen, params)
    if not needs_processing(params):
        return logits.float()
    return filter_scores(logits, seen, RowColumns.of(params, logits.device))


def _check_batch(logits: torch.Tensor, seen: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    if logits.dim() != 2 or seen.shape != logits.shape:
        raise ValueError(
            f"logits [B, V] and seen [B, V] expected, "
            f"got {tuple(logits.shape)} and {tuple(seen.shape)}"
        )
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} SamplingParams for a batch of {logits.shape[0]} rows")


# ----------------------------------------------------------------------------- drawing


def draw_uniforms(
    generators: Sequence[Optional[torch.Generator]], sampled: Sequence[bool], out: torch.Tensor
) -> torch.Tensor:
    """One uniform in [0, 1) per sampled row from that row's own generator, into ``out`` [B, 1]
    float64 (greedy rows are left as they are); returns ``out``. No host synchronisation."""
    for row, (generator, is_sampled) in enumerate(zip(generators, sampled)):
        if not is_sampled:
            continue
        if generator is None:
            raise ValueError(f"row {row} samples (temperature > 0) but has no generator")
        if generator.device == out.device:
            torch.rand(1, generator=generator, device=out.device, dtype=torch.float64, out=out[row])
        else:
            draw = torch.rand(1, generator=generator, device=generator.device, dtype=torch.float64)
            out[row].copy_(draw, non_blocking=True)
    return out


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row [B]: the first id whose cumulative probability exceeds u * total."""
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = uniforms * cdf[:, -1:]  # [B, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Rounding can put the target at the very top; never return a zero-probability id. A row
    # without a positive probability (NaN scores) gets id 0: an id inside the vocabulary.
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last_positive = torch.where(probs > 0, ids, -1).amax(dim=-1)
    return torch.minimum(index, last_positive).clamp(min=0)


def choose_tokens(
    logits: torch.Tensor, seen: torch.Tensor, columns: Optional[RowColumns], uniforms: torch.Tensor
) -> torch.Tensor:
    """Next token of every row, LongTensor [B], from logits [B, V] — static shapes, no host sync.

    ``columns`` None means every row is plain greedy (argmax of the raw logits, first index on
    ties). Otherwise greedy rows take the argmax of their (possibly penalised) scores and
    sampled rows invert the CDF of ``softmax(filter_scores(...))`` at their uniform [B, 1]. This
    is the whole sampler: `sample_next` and the compiled decode step both call it. Every id is
    inside the vocabulary, even for logits that hold NaN or inf.
    """
    if columns is None:
        return logits.argmax(dim=-1)
    scores = filter_scores(logits, seen, columns)
    sampled_tokens = _inverse_cdf(scores.softmax(dim=-1), uniforms)
    return torch.where(columns.sampled.squeeze(1), sampled_tokens, scores.argmax(dim=-1))


def sample_next(
    logits: torch.Tensor, seen: torch.Tensor, params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
) -> torch.Tensor:
    """Choose the next token of every row: LongTensor [B] on the logits' device.

    logits: [B, V] float32 scores of the last position; seen: [B, V] bool, ids of the prompt and
    of the tokens generated so far (see `make_seen_mask`, `update_seen`); params: one per row;
    generators: one per row (see `make_generator`), may be None for greedy rows. Greedy rows take
    the argmax (first index on ties); sampled rows draw one uniform from their own generator.
    No host synchronisation happens when logits and generators are on the same CUDA device.
    A row whose logits hold NaN or +inf, or no finite value, gets `non_finite.NON_FINITE_TOKEN`.
    """
    if len(generators) != len(params):
        raise ValueError(f"{len(generators)} generators for {len(params)} rows")
    _check_batch(logits, seen, params)
    logits = logits.float()
    if not needs_processing(params):
        tokens = choose_tokens(logits, seen, None, logits.new_empty(0))
    else:
        sampled = [not p.is_greedy for p in params]
        uniforms = torch.zeros(len(params), 1, dtype=torch.float64, device=logits.device)
        draw_uniforms(generators, sampled, uniforms)
        tokens = choose_tokens(logits, seen, RowColumns.of(params, logits.device), uniforms)
    return mark_non_finite(tokens, logits)
