"""A row's committed canvases -> `Generation`, counted exactly as transformers and the reference do.

transformers pads everything after the first EOS of the finishing canvas, counts tokens_per_forward
as non-pad generated tokens (all canvases, even past max_new_tokens) over the row's decoder forwards,
and the output is then cut at EOS or max_new_tokens, pad tokens dropped (`generation.cut_output`, the
cut `ReferenceBackend` makes too).
"""

from __future__ import annotations

from dgbatch.generation import Generation, SamplingParams, cut_output, first_eos_end


def num_canvases(max_new_tokens: int, canvas: int) -> int:
    """Canvases a row may run for a budget of `max_new_tokens`, as `generate` computes them."""
    return -(-max_new_tokens // canvas)


def has_eos(canvas: list[int], eos_ids: set[int]) -> bool:
    """`EosTokenCriteria` over a whole canvas: the row finishes with this canvas."""
    return any(t in eos_ids for t in canvas)


def to_generation(
    row_id: str, canvases: list[list[int]], forwards: int, params: SamplingParams, pad_id: int, eos_ids: set[int],
    max_new_tokens: int | None = None,
) -> Generation:
    """`max_new_tokens`: the row's own budget (`generation.max_new_tokens`); None: params.max_new_tokens."""
    limit = params.max_new_tokens if max_new_tokens is None else max_new_tokens
    new = [t for c in canvases for t in c]
    cut = first_eos_end(new, eos_ids)
    if cut is not None:
        new[cut:] = [pad_id] * (len(new) - cut)  # `_finalize_canvas`: pad after the first EOS
    valid = sum(t != pad_id for t in new)
    token_ids, reason = cut_output(new, limit, pad_id, eos_ids)
    return Generation(
        row_id=row_id,
        token_ids=token_ids,
        finish_reason=reason,
        num_decoder_forwards=forwards,
        tokens_per_forward=valid / forwards if forwards else 0.0,
    )
