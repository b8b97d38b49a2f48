"""The generation loop: slots, prefill, denoise, commit, refill.

A fixed number of slots (the static batch) each hold one row: its KV (in the slot cache), its
current canvas, its own step counter, stability history and self-conditioning embeddings. Rows are
not in lockstep: every row denoises with its own step count and temperature, and from the step
after which its canvas converges (or runs out of steps) it costs no decoder compute:

    loop:
      refill  free slots take the next prompts of the queue; a row whose prompt starts with a shared
              prefix (`prefix.py`) starts from a copy of its K/V and has only the rest to encode
      step    one model pass: encode the new prompts and the canvases finished in the previous
              step (packed, no padding) and, with their K/V in place, one decoder step over slots
              [0, n), n from a fixed set of batch sizes, then the sampler; rows that were just
              encoded already denoise their next canvas in it
      finish  rows whose canvas is done: EOS / last canvas -> output, slot freed; otherwise the
              canvas waits for the next step's encode (its commit)

(The compiled engine keeps the decoder step's shapes static, so it encodes in a pass of its own
first; so does a refill whose prompts exceed `max_prefill_tokens`.)

The loop is a stream: `submit(requests, tag)` queues requests at any time, even between two steps
of rows already running; `step()` runs one iteration and returns the rows that finished in it as
`Finished(tag, index, generation)`, so a caller can feed the next shard's rows into the slots while
the last rows of another drain, and hand each shard's rows back as soon as its last one is done.
`run(requests)` is that loop over one list, until it is done. The tag is the caller's (a shard id,
say); the engine only hands it back. A row's output does not depend on what shares its batch.

While the queue lasts every slot holds a denoising row, so every decoder row-forward is useful.
When it runs dry, rows are compacted into the lowest slots so the decoder drops to a smaller batch
size. The only host synchronisation per step is one [n, 1 + C] int64 copy (which rows are done,
and their canvases), which scheduling needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from dgbatch.engine import rng
from dgbatch.engine.outputs import has_eos, num_canvases, to_generation
from dgbatch.engine.packing import EncoderBatch, pack
from dgbatch.engine.prefix import PrefixCache
from dgbatch.engine.runner import ModelRunner
from dgbatch.engine.sampler import accept_mask, draft, renoise, stop_and_update_history, temperature
from dgbatch.generation import Generation, Request, SamplingParams, max_new_tokens


@dataclass
class EngineStats:
    """Counters for the benchmark: slot utilization = useful / computed decoder row-forwards."""

    decoder_calls: int = 0
    computed_row_forwards: int = 0  # sum of decoder batch sizes
    useful_row_forwards: int = 0  # row-forwards of rows still denoising (what TPF counts)
    encoder_calls: int = 0  # encoder batches packed; eager, the last of a step shares the decoder's pass
    prompt_tokens: int = 0  # tokens of the prompts admitted
    encoded_prompt_tokens: int = 0  # prompt tokens the encoder computed (fewer where rows share a prefix)
    shared_prefix_rows: int = 0  # rows that started from a shared prefix's K/V (`prefix.py`)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # decoder batch size -> calls
    canvas_steps: dict[int, int] = field(default_factory=dict)  # denoising steps a canvas took -> canvases

    @property
    def slot_utilization(self) -> float:
        return self.useful_row_forwards / max(1, self.computed_row_forwards)

    @property
    def prompt_encoding_ratio(self) -> float:
        """Prompt tokens encoded / prompt tokens: 1 without shared prefixes, 1/8 for 8 samples of a prompt."""
        return self.encoded_prompt_tokens / max(1, self.prompt_tokens)


class Finished(NamedTuple):
    """A row that finished: the tag it was submitted with, its position in that `submit` call, its output."""

    tag: Hashable
    index: int
    generation: Generation


@dataclass
class _Row:
    tag: Hashable
    index: int  # position in its `submit` call
    request: Request
    pending: list[int] | None  # tokens waiting for the encoder: the prompt, then each finished canvas
    canvases: list[list[int]] = field(default_factory=list)
    forwards: int = 0  # decoder forwards this row took part in
    canvas_start: int = 0  # its forwards when the current canvas began (one forward per denoising step)
    length: int = 0  # committed tokens (mirrors the cache length)
    max_new_tokens: int = 0  # the row's own budget (at most the job's)
    max_canvases: int = 0  # canvases that budget allows


def batch_size_set(batch_size: int, quarters: bool = True) -> tuple[int, ...]:
    """The decoder's only batch shapes: batch_size, its halvings down to 1, and (quarters) three
    quarters of each of those from 8 up, so a draining batch computes fewer than 1.5x the rows it
    has left (halvings alone: up to 2x). The compiled engine keeps to halvings: a graph each."""
    sizes, b = {batch_size}, batch_size
    while b > 1:
        if quarters and b >= 8 and b % 4 == 0:
            sizes.add(3 * b // 4)
        b //= 2
        sizes.add(b)
    return tuple(sorted(sizes))


class Engine:
    def __init__(
        self,
        model,
        params: SamplingParams,
        batch_size: int,
        pad_id: int,
        eos_ids: Sequence[int],
        *,
        capacity: int | None = None,
        compile: bool = False,
        max_prefill_tokens: int = 8192,
        share_prefixes: bool = True,
    ):
        self.runner = ModelRunner(model)
        self.params = params
        self.num_slots = batch_size
        self.pad_id = pad_id
        self.eos_ids = set(eos_ids)
        self.canvas = self.runner.canvas
        self.max_canvases = num_canvases(params.max_new_tokens, self.canvas)  # a row's own budget may allow fewer
        self.sizes = batch_size_set(batch_size, quarters=not compile)
        self.compile = compile
        self.max_prefill_tokens = max_prefill_tokens
        self.stats = EngineStats()
        self.cache = None
        self.queue: deque[tuple[Hashable, int, Request]] = deque()  # submitted, not yet in a slot
        self._need = capacity or 0  # slot capacity the queued rows need (grows only)
        self._longest_prompt = 0  # of the rows submitted or reserved for (grows only)
        self.prefixes = PrefixCache(self.runner) if share_prefixes else None
        self._last_prompt: list[int] | None = None  # the prompt admitted last: the next row's neighbour
        self._step = self._compiled(self._denoise) if compile else self._denoise
        self._alloc_state()

    def _compiled(self, fn):
        """`torch.compile` with CUDA graphs on GPU (what mode="reduce-overhead" sets) and no split reductions.

        The sampler reduces thousands of vocabulary-wide rows, so splitting a reduction buys nothing;
        and on an H200 with torch 2.11 Inductor failed to generate code for the split softmax over a
        262,144-wide vocabulary ("list indices must be integers or slices, not NoneType").
        """
        cuda = self.runner.device.type == "cuda"
        return torch.compile(fn, dynamic=False, options={"triton.cudagraphs": cuda, "split_reductions": False})

    # ---- state ---------------------------------------------------------------------------------

    def _alloc_state(self) -> None:
        s, c, dev = self.num_slots, self.canvas, self.runner.device
        self.tokens = torch.zeros((s, c), dtype=torch.int64, device=dev)  # [S, C] current (noisy) canvas
        self.soft = torch.zeros((s, c, self.runner.hidden_size), dtype=self.runner.dtype, device=dev)  # [S, C, hidden]
        k = self.params.stability_threshold
        self.history = torch.full((s, k, c), -1, dtype=torch.int64, device=dev)  # [S, K, C] last argmax canvases
        self.steps = torch.zeros(s, dtype=torch.int64, device=dev)  # [S] steps done in this canvas
        self.canvas_idx = torch.zeros(s, dtype=torch.int64, device=dev)  # [S] which canvas of the row
        self.keys = torch.zeros((s, 2), dtype=torch.int64, device=dev)  # [S, 2] per-row RNG key
        self.active = torch.zeros(s, dtype=torch.bool, device=dev)  # [S] slot holds a denoising row
        self.rows: list[_Row | None] = [None] * s
        if self.compile:
            self._mark_static(
                [self.tokens, self.soft, self.history, self.steps, self.canvas_idx, self.keys, self.active]
            )

    def _slot_need(self, request: Request) -> int:
        """Slot capacity a row needs: its prompt + the canvases that get committed (never the last one;
        the job's budget, so a row with a smaller one of its own fits too)."""
        return len(request.prompt_ids) + (self.max_canvases - 1) * self.canvas

    def _ensure_cache(self) -> None:
        """A cache that holds every queued row; reallocated (growing) only while no row is in a slot."""
        if self.cache is not None and (self.cache.capacity >= self._need or self.num_live):
            return
        need = -(-max(self._need, 1) // 64) * 64  # round up: fewer reallocations, fewer compiled shapes
        self.cache = self.runner.new_cache(self.num_slots, need)
        if self.compile:
            self._mark_static(self.cache.keys + self.cache.values + [self.cache.lengths])

    @staticmethod
    def _mark_static(tensors) -> None:
        """Fixed addresses let CUDA graphs replay the in-place cache and state writes."""
        for t in tensors:
            torch._dynamo.mark_static_address(t)

    def _reset_canvas(self, slots: torch.Tensor, canvas_idx: torch.Tensor) -> None:
        """Start canvas `canvas_idx` [N] in `slots` [N]: uniform tokens, step 0, no history or self-conditioning."""
        zero = torch.zeros_like(canvas_idx)
        self.tokens[slots] = rng.random_tokens(
            self.keys[slots], canvas_idx, zero, rng.STREAM_INIT, self.canvas, self.runner.vocab_size
        )
        self.canvas_idx[slots] = canvas_idx
        self.steps[slots] = 0
        self.history[slots] = -1
        self.soft[slots] = 0
        self.active[slots] = True

    def _bound(self, lengths: Iterable[int]) -> int | None:
        """An upper bound on committed lengths, in steps of 64 (few shapes); None (all) when compiled."""
        if self.compile:
            return None
        return -(-max(max(lengths), 1) // 64) * 64

    # ---- phases --------------------------------------------------------------------------------

    def _refill(self) -> None:
        """Free slots take the next prompts; their KV is written by the next `_encode`, after the
        shared prefix they start from (if any). A row longer than the cache holds waits (and the
        rows behind it: first in, first out) until the slots are empty."""
        admitted = []
        for s in range(self.num_slots):
            if not self.queue or self._slot_need(self.queue[0][2]) > self.cache.capacity:
                break
            if self.rows[s] is None:
                tag, i, req = self.queue.popleft()
                budget = max_new_tokens(req, self.params)
                self.rows[s] = _Row(tag, i, req, pending=list(req.prompt_ids), max_new_tokens=budget,
                                    max_canvases=num_canvases(budget, self.canvas))
                self.cache.lengths[s] = 0
                self.keys[s] = torch.tensor(rng.row_key(self.params.seed, req.row_id))
                self.stats.prompt_tokens += len(req.prompt_ids)
                admitted.append(s)
        if admitted and self.prefixes is not None:
            self._share(admitted)

    def _share(self, slots: list[int]) -> None:
        """Rows just admitted to `slots` start from the shared prefixes they have in common with
        their neighbours in the queue or with a kept prefix; only the rest of each prompt is encoded."""
        prompts = [_shareable(self.rows[s].request) for s in slots]
        after = prompts[1:] + [_shareable(self.queue[0][2]) if self.queue else None]
        before = [self._last_prompt] + prompts[:-1]
        self._last_prompt = prompts[-1]
        encoded = self.prefixes.encoded_tokens
        loaded = self.prefixes.admit(self.cache, slots, prompts, list(zip(before, after)), self._longest_prompt)
        self.stats.encoded_prompt_tokens += self.prefixes.encoded_tokens - encoded
        for s, k in zip(slots, loaded):
            if k:
                row = self.rows[s]
                row.length, row.pending = k, row.pending[k:]
                self.stats.shared_prefix_rows += 1

    def _pending(self) -> list[EncoderBatch]:
        """Pack every pending prompt and finished canvas into encoder passes (at most
        `max_prefill_tokens` new tokens each) and start those rows' next canvases, which the last
        of those passes may already denoise (`ModelRunner.forward`)."""
        todo = sorted((len(r.pending), s) for s, r in enumerate(self.rows) if r is not None and r.pending is not None)
        if not todo:
            return []
        passes: list[list[int]] = [[]]
        tokens = 0
        for t, s in todo:
            if not t:  # a whole prompt loaded from a shared prefix: nothing to encode
                continue
            if passes[-1] and tokens + t > self.max_prefill_tokens:
                passes.append([])
                tokens = 0
            passes[-1].append(s)
            tokens += t
        batches = []
        for slots in filter(None, passes):
            rows = [self.rows[s] for s in slots]
            batches.append(pack(self.cache, slots, [r.pending for r in rows], [r.length for r in rows], self._bound,
                                max_tokens=self.max_prefill_tokens, image_id=self.runner.image_token_id,
                                vision=[r.request.vision if r.length == 0 else None for r in rows]))
            for r in rows:
                if not r.canvases:
                    self.stats.encoded_prompt_tokens += len(r.pending)
                r.length += len(r.pending)
        for _, s in todo:
            self.rows[s].pending = None
        dev = self.runner.device
        slots = [s for _, s in todo]
        self._reset_canvas(torch.tensor(slots, device=dev),
                           torch.tensor([len(self.rows[s].canvases) for s in slots], device=dev))
        self.stats.encoder_calls += len(batches)
        return batches

    def _encode(self) -> None:
        """Encode every pending row in encoder-only passes (the compiled engine's path)."""
        for batch in self._pending():
            self.runner.encode(self.cache, batch)

    def _denoise(
        self, n: int, max_len: int | None = None, batch: EncoderBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoising step for slots [0, n) whose committed lengths are <= max_len (None: any),
        in the same model pass as encoding `batch` when given.

        Returns (done [n] bool, argmax canvas [n, C]). Slots without a denoising row compute scratch.
        """
        p = self.params
        keys, cidx, steps = self.keys[:n], self.canvas_idx[:n], self.steps[:n]
        logits = self.runner.forward(self.cache, n, self.tokens[:n], self.soft[:n], batch, max_len)  # [n, C, V] fp32
        u = rng.uniform(keys, cidx, steps, rng.STREAM_SAMPLE, self.canvas)  # [n, C]
        d = draft(logits, temperature(steps, p), u, self.runner)
        del logits
        accepted = accept_mask(d.entropy, p.entropy_bound)  # [n, C]
        noise = rng.random_tokens(keys, cidx, steps, rng.STREAM_RENOISE, self.canvas, self.runner.vocab_size)
        stop, history = stop_and_update_history(self.history[:n], d.argmax, d.entropy, p)
        self.tokens[:n] = renoise(d.denoised, accepted, noise)
        self.soft[:n] = d.soft
        self.history[:n] = history
        self.steps[:n] += 1
        done = self.active[:n] & (stop | (self.steps[:n] >= p.max_denoising_steps))
        return done, d.argmax

    def _finish(self, done_slots: list[int], host: list[list[int]]) -> list[Finished]:
        """Rows whose canvas holds EOS, or was their last, are output and leave their slot; the
        others' canvases wait for the next `_encode`."""
        out = []
        for s in done_slots:
            row = self.rows[s]
            canvas = host[s][1:]
            row.canvases.append(canvas)
            steps = row.forwards - row.canvas_start
            self.stats.canvas_steps[steps] = self.stats.canvas_steps.get(steps, 0) + 1
            row.canvas_start = row.forwards
            if has_eos(canvas, self.eos_ids) or len(row.canvases) == row.max_canvases:
                gen = to_generation(row.request.row_id, row.canvases, row.forwards, self.params, self.pad_id,
                                    self.eos_ids, row.max_new_tokens)
                out.append(Finished(row.tag, row.index, gen))
                self.rows[s] = None
            else:
                row.pending = canvas
        self.active[torch.tensor(done_slots, device=self.runner.device)] = False
        return out

    def _compact(self) -> None:
        """Queue dry: move rows into the lowest slots so a smaller decoder batch size covers them."""
        used = [s for s in range(self.num_slots) if self.rows[s] is not None]
        if not used:
            return
        target = next(b for b in self.sizes if b >= len(used))
        movers = [s for s in used if s >= target]
        holes = [s for s in range(target) if self.rows[s] is None]
        for src, dst in zip(movers, holes):
            self.cache.move(src, dst)
            for t in (self.tokens, self.soft, self.history, self.steps, self.canvas_idx, self.keys, self.active):
                t[dst] = t[src]
            self.active[src] = False
            self.rows[dst], self.rows[src] = self.rows[src], None

    # ---- driver --------------------------------------------------------------------------------

    @property
    def num_live(self) -> int:
        """Rows in a slot (denoising, or waiting for their canvas's commit)."""
        return sum(r is not None for r in self.rows)

    @property
    def busy(self) -> bool:
        """There is work: queued rows or rows in slots."""
        return bool(self.queue) or self.num_live > 0

    def submit(self, requests: Sequence[Request], tag: Hashable = None) -> None:
        """Queue `requests` behind everything submitted before; each comes back from `step` as
        `Finished(tag, its index in requests, generation)`. Safe between any two steps."""
        empty = [r.row_id for r in requests if not r.prompt_ids]
        if empty:
            raise ValueError(f"{len(empty)} request(s) have an empty prompt, e.g. row {empty[0]!r}")
        for i, r in enumerate(requests):
            self.queue.append((tag, i, r))
            self._need = max(self._need, self._slot_need(r))
            self._longest_prompt = max(self._longest_prompt, len(r.prompt_ids))

    def reserve(self, prompt_tokens: int) -> None:
        """Size the slots for prompts of up to `prompt_tokens` (a job's longest) before they come, so
        the cache is allocated once rather than grown when such a prompt arrives."""
        self._need = max(self._need, prompt_tokens + (self.max_canvases - 1) * self.canvas)
        self._longest_prompt = max(self._longest_prompt, prompt_tokens)

    def reset(self) -> list[tuple[Hashable, int, Request]]:
        """Drop every unfinished row (after a failed step, whose state is unknown); returns them,
        (tag, index, request), in slots then queue order, so a caller can run them again."""
        dropped = [(r.tag, r.index, r.request) for r in self.rows if r is not None] + list(self.queue)
        self.rows = [None] * self.num_slots
        self.active.zero_()
        self.queue.clear()
        self._last_prompt = None
        if self.prefixes is not None:  # a pass that failed may have left an entry half written
            self.prefixes.clear()
        return dropped

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One iteration of the loop (refill, one model pass, finish); the rows that finished in it."""
        if not self.busy:
            return []
        self._ensure_cache()
        self._refill()
        if not self.queue:
            self._compact()
        batches = self._pending()
        fused = batches.pop() if batches and not self.compile else None
        for batch in batches:  # encoder-only: under compile (a static step), or past max_prefill_tokens
            self.runner.encode(self.cache, batch)
        live = [s for s in range(self.num_slots) if self.rows[s] is not None]
        n = next(b for b in self.sizes if b > live[-1])
        bound = self._bound(self.rows[s].length for s in live)
        if self.compile:
            torch.compiler.cudagraph_mark_step_begin()
            done, argmax = self._step(n, bound)
        else:
            done, argmax = self._step(n, bound, fused)
        host = torch.cat([done[:, None].long(), argmax], dim=1).tolist()  # the step's one sync
        for s in live:
            self.rows[s].forwards += 1
        self.stats.decoder_calls += 1
        self.stats.computed_row_forwards += n
        self.stats.useful_row_forwards += len(live)
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        done_slots = [s for s in live if host[s][0]]
        return self._finish(done_slots, host) if done_slots else []

    def run(self, requests: Sequence[Request]) -> list[Generation]:
        """Generate every request (on an engine with nothing else submitted); outputs in request order."""
        if self.busy:
            raise RuntimeError("Engine.run needs an idle engine; it is streaming: use submit/step")
        if not requests:
            return []
        tag = object()
        self.submit(requests, tag)
        out: list[Generation | None] = [None] * len(requests)
        while self.busy:
            for f in self.step():
                out[f.index] = f.generation
        return out  # type: ignore[return-value]


def _shareable(request: Request) -> list[int] | None:
    """The prompt a row may share a prefix of: None for a row with images (an image's tokens may see
    each other both ways, so its K/V are not a causal prefix's)."""
    return None if request.vision is not None else list(request.prompt_ids)
