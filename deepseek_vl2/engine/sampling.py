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

See README.md for the user-facing description of every parameter.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

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


@dataclass
class SamplingParams:
    """Per-request decoding parameters (ranges and meaning: README.md).

    temperature: 0 = greedy; otherwise logits are divided by it before top-k / top-p.
    top_p: nucleus mass in (0, 1]; 1 disables it.
    top_k: keep the k highest logits (ties with the k-th kept); 0 disables it.
    repetition_penalty: HF rule on every id of the prompt or generated so far; 1 disables it.
    max_new_tokens: upper bound on generated tokens (the engine may lower it to fit the context).
    seed: None draws a fresh random seed (see `resolve_seed`); otherwise an int in [0, MAX_SEED].
    stop: strings that end generation; the text is cut before the first one to complete.
    penalize_greedy: apply the repetition penalty to greedy rows too (HF `do_sample=False`).
    """

    temperature: float = 0.1
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 2048
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    penalize_greedy: bool = False
    # Values validate() last accepted (so the engine's own check does not run the rules twice).
    _validated: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A bare string is one stop string, not a sequence of one-character stops.
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            self.stop = tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        """True when temperature is 0: pick the most likely token, no randomness."""
        return self.temperature == 0

    def validate(
        self, limits: Optional[Mapping[str, tuple[float, float]]] = None,
        names: Optional[Mapping[str, str]] = None,
    ) -> "SamplingParams":
        """Raise ValueError naming the first invalid field; return self when all are valid.

        Checks the engine's domain (types, finiteness, temperature 0 or >= MIN_TEMPERATURE, seed
        in [0, MAX_SEED], ...) and, when given, ``limits``: field -> (low, high), inclusive (a
        server's narrower input ranges). ``names`` maps field names to the names the caller's
        users know (``max_new_tokens`` -> ``max_length_tokens``). The check runs once: calling
        validate() again on unchanged values without new limits returns at once.
        """
        state = self._state()
        if limits is None and self._validated == state:
            return self
        name = (lambda field: (names or {}).get(field, field))
        t = self.temperature
        if not _is_real_number(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise ValueError(
                f"{name('temperature')} must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {t!r}"
            )
        p = self.top_p
        if not _is_real_number(p) or not math.isfinite(p) or not 0 < p <= 1:
            raise ValueError(f"{name('top_p')} must be in (0, 1] (1 = off), got {p!r}")
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"{name('top_k')} must be an integer >= 0 (0 = off), got {self.top_k!r}")
        r = self.repetition_penalty
        if not _is_real_number(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(
                f"{name('repetition_penalty')} must be a finite number > 0 (1 = off), got {r!r}"
            )
        if not _is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"{name('max_new_tokens')} must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        if self.seed is not None and (
            not _is_integer(self.seed) or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(
                f"{name('seed')} must be empty (random) or an integer in [0, {MAX_SEED}], "
                f"got {self.seed!r}"
            )
        if not isinstance(self.stop, tuple) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.penalize_greedy, bool):
            raise ValueError(f"penalize_greedy must be a bool, got {self.penalize_greedy!r}")
        for field_name, (low, high) in (limits or {}).items():
            value = getattr(self, field_name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"{name(field_name)} must be between {low} and {high}, got {value!r}")
        self._validated = state
        return self

    def _state(self) -> tuple:
        return (self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                self.max_new_tokens, self.seed, self.stop, self.penalize_greedy)


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
    """Mark the newly generated `tokens` [B] in `seen` [B, V], in place; returns `seen`."""
    return seen.scatter_(1, tokens.reshape(-1, 1).to(seen.device), True)


# ----------------------------------------------------------------------------- logits processing


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


def _top_k_mask(ascending: torch.Tensor, logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Removal mask [B, V] in vocab order: logits below each row's k-th largest (k = 0: none)."""
    vocab = logits.shape[-1]
    k = top_k.clamp(min=1, max=vocab)  # [B, 1]
    kth_largest = ascending.gather(1, vocab - k)  # [B, 1]
    return (logits < kth_largest) & (top_k > 0)


def _top_p_mask(
    ascending: torch.Tensor, order: torch.Tensor, threshold: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """Removal mask [B, V] in vocab order for nucleus sampling, HF TopPLogitsWarper semantics.

    `ascending`/`order`: the logits sorted ascending and their ids. In that order, drop tokens
    whose cumulative probability is <= threshold (= 1 - top_p, [B, 1] float32), always keeping
    the most likely token; rows where `active` [B, 1] is False drop nothing.
    """
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = (cumulative <= threshold) & active
    remove_sorted[:, -1] = False
    return torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """The scores each row chooses from, [B, V] float32 (removed tokens are -inf).

    Sampled rows (temperature > 0): repetition penalty, / temperature, top-k, top-p, in HF order;
    `softmax` of the result is the distribution `sample_next` draws from.
    Greedy rows: the logits, penalised only when `penalize_greedy`; their argmax is the token.
    Ties at the top-p cut are broken by a stable sort: among equal logits the higher id is kept.
    """
    if logits.dim() != 2 or seen.shape != logits.shape:
        raise ValueError(
            f"logits [B, V] and seen [B, V] expected, "
            f"got {tuple(logits.shape)} and {tuple(seen.shape)}"
        )
    if len(params) != logits.shape[0]:
        raise ValueError(f"{len(params)} SamplingParams for a batch of {logits.shape[0]} rows")
    device = logits.device
    logits = logits.float()
    sampled = [not p.is_greedy for p in params]

    penalties = [
        p.repetition_penalty if (s or p.penalize_greedy) else 1.0 for p, s in zip(params, sampled)
    ]
    if any(value != 1.0 for value in penalties):
        penalty_column = _row_tensor(penalties, torch.float32, device)
        logits = apply_repetition_penalty(logits, seen, penalty_column)
    if not any(sampled):
        return logits

    temperatures = [p.temperature if s else 1.0 for p, s in zip(params, sampled)]
    if any(value != 1.0 for value in temperatures):
        logits = logits / _row_tensor(temperatures, torch.float32, device)

    top_ks = [p.top_k if s else 0 for p, s in zip(params, sampled)]
    top_ps = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
    if any(top_ks):
        ascending = torch.sort(logits, dim=-1, stable=True).values
        remove = _top_k_mask(ascending, logits, _row_tensor(top_ks, torch.long, device))
        logits = logits.masked_fill(remove, -math.inf)
    if any(value < 1 for value in top_ps):
        # 1 - top_p computed in double, then compared in float32, as HF's scalar comparison does.
        ascending, order = torch.sort(logits, dim=-1, stable=True)
        threshold = _row_tensor([1 - value for value in top_ps], torch.float32, device)
        active = _row_tensor([value < 1 for value in top_ps], torch.bool, device)
        remove = _top_p_mask(ascending, order, threshold, active)
        logits = logits.masked_fill(remove, -math.inf)
    return logits


# ----------------------------------------------------------------------------- drawing


def _draw_uniforms(
    generators: Sequence[Optional[torch.Generator]], sampled: Sequence[bool], device: torch.device
) -> torch.Tensor:
    """One uniform in [0, 1) per sampled row from that row's own generator, [B, 1] float64."""
    draws = []
    for row, (generator, is_sampled) in enumerate(zip(generators, sampled)):
        if not is_sampled:
            draws.append(torch.zeros(1, dtype=torch.float64, device=device))
            continue
        if generator is None:
            raise ValueError(f"row {row} samples (temperature > 0) but has no generator")
        draw = torch.rand(1, generator=generator, device=generator.device, dtype=torch.float64)
        if draw.device != device:
            draw = draw.pin_memory() if device.type == "cuda" else draw
            draw = draw.to(device, non_blocking=True)
        draws.append(draw)
    return torch.stack(draws)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token per row [B]: the first id whose cumulative probability exceeds u * total."""
    cdf = probs.double().cumsum(dim=-1)  # [B, V]
    target = uniforms * cdf[:, -1:]  # [B, 1]
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Rounding can put the target at the very top; never return a zero-probability id.
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last_positive = torch.where(probs > 0, ids, -1).amax(dim=-1)
    return torch.minimum(index, last_positive)


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
    """
    if len(generators) != len(params):
        raise ValueError(f"{len(generators)} generators for {len(params)} rows")
    scores = process_logits(logits, seen, params)
    sampled = [not p.is_greedy for p in params]
    if not any(sampled):
        return scores.argmax(dim=-1)
    uniforms = _draw_uniforms(generators, sampled, scores.device)
    sampled_tokens = _inverse_cdf(scores.softmax(dim=-1), uniforms)
    if all(sampled):
        return sampled_tokens
    is_sampled = _row_tensor(sampled, torch.bool, scores.device).squeeze(1)
    return torch.where(is_sampled, sampled_tokens, scores.argmax(dim=-1))
