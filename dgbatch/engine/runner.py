"""The two model passes the engine needs, on transformers' modules and the slot cache.

- `encode`: the encoder (causal, windowed on sliding layers) over new tokens of some rows, after
            each row's committed prefix; stores their K/V. New prompts (empty prefix) and finished
            canvases (C tokens) go through the same pass, so one loop iteration needs one call.
            The last layer only has to produce K/V (nothing reads its output): its attention and
            feed-forward are skipped.
- `decode`: the decoder over the current canvases of slots [0, n) (bidirectional over the prefix
            and the canvas); returns softcapped fp32 logits. Its shapes depend only on n (and on
            `max_len` when the caller bounds the prefix read).
"""

from __future__ import annotations

import torch

from dgbatch.engine.attention import attend, layer_forward, project_qkv
from dgbatch.engine.cache import SlotKVCache, layer_specs


class ModelRunner:
    def __init__(self, model):
        text = model.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise NotImplementedError("use_bidirectional_attention='all' (a bidirectional encoder) is not supported")
        enc = model.model.encoder.language_model
        dec = model.model.decoder
        self.model = model
        self.enc_embed, self.enc_layers, self.enc_rope = enc.embed_tokens, enc.layers, enc.rotary_emb
        self.dec_embed, self.dec_layers, self.dec_rope = dec.embed_tokens, dec.layers, dec.rotary_emb
        self.self_conditioning, self.dec_norm = dec.self_conditioning, dec.norm
        self.lm_head = model.lm_head
        self.softcap = model.final_logit_softcapping
        self.layer_types = list(text.layer_types)
        self.sliding_window = text.sliding_window
        self.canvas = model.config.canvas_length
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.specs = layer_specs(model)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dec_embed.weight.dtype

    def new_cache(self, num_slots: int, capacity: int) -> SlotKVCache:
        return SlotKVCache(self.specs, num_slots, capacity, self.sliding_window, self.canvas, self.dtype, self.device)

    def _rope(self, rope, h: torch.Tensor, positions: torch.Tensor) -> dict:
        return {t: rope(h, positions, t) for t in set(self.layer_types)}

    def encode(
        self, cache: SlotKVCache, rows: torch.Tensor, ids: torch.Tensor, new: torch.Tensor, max_len: int | None = None
    ) -> None:
        """Encode new tokens after each row's committed prefix and store their K/V.

        rows: [N] slots; ids: [N, T] right-padded; new: [N] real tokens per row; max_len: an upper
        bound on the rows' committed lengths (reads fewer prefix entries), default all. A prompt is a
        row with an empty prefix, a finished canvas one with T = C: one pass serves both.
        """
        lengths = cache.lengths[rows]  # [N]
        t = ids.shape[1]
        positions = lengths[:, None] + torch.arange(t, device=ids.device)[None, :]  # [N, T]
        masks = {s: cache.encoder_mask(lengths, t, s, max_len) for s in (False, True)}  # [N, 1, T, prefix + T]
        h = self.enc_embed(ids)  # [N, T, hidden]
        rope = self._rope(self.enc_rope, h, positions)
        last = len(self.enc_layers) - 1
        for i, layer in enumerate(self.enc_layers):
            cos, sin = rope[self.layer_types[i]]

            def attention(attn, x, i=i, cos=cos, sin=sin):
                q, k, v = project_qkv(attn, x, cos, sin)
                keys, values = cache.encoder_kv(i, rows, k, v, max_len)
                cache.append(i, rows, k, v, lengths, new)
                return attend(attn, q, keys, values, masks[self.specs[i].sliding])

            if i == last:  # nothing reads the last layer's output: only its K/V are needed
                _, k, v = project_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin)
                cache.append(i, rows, k, v, lengths, new)
            else:
                h = layer_forward(layer, h, attention)
        cache.grow(rows, new)

    def soft_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """Self-conditioning input from a softmax [N, C, V] (fp32): probs @ E * embed_scale -> [N, C, hidden]."""
        w = self.dec_embed.weight
        return torch.matmul(probs.to(w.dtype), w) * self.dec_embed.embed_scale.to(w.dtype)

    def decode(
        self, cache: SlotKVCache, n: int, canvas: torch.Tensor, soft: torch.Tensor, max_len: int | None = None
    ) -> torch.Tensor:
        """Decoder pass over slots [0, n): canvas [n, C], soft embeddings [n, C, hidden] -> logits [n, C, V] fp32.

        max_len: an upper bound on the rows' committed lengths (full-attention layers then read a
        shorter view), default all: one static shape. The soft embeddings are zeros at a canvas's
        first step, which is what transformers' decoder computes for `self_conditioning_logits=None`.
        """
        lengths = cache.lengths[:n]  # [n]
        positions = lengths[:, None] + torch.arange(self.canvas, device=canvas.device)[None, :]  # [n, C]
        masks = {s: cache.decoder_mask(lengths, s, max_len) for s in (False, True)}  # [n, 1, 1, C + prefix]
        h = self.self_conditioning(self.dec_embed(canvas), soft)  # [n, C, hidden]
        rope = self._rope(self.dec_rope, h, positions)
        for i, layer in enumerate(self.dec_layers):
            cos, sin = rope[self.layer_types[i]]

            def attention(attn, x, i=i, cos=cos, sin=sin):
                q, k, v = project_qkv(attn, x, cos, sin)
                cache.write_canvas(i, n, k, v)
                keys, values = cache.decoder_kv(i, n, max_len)  # views: no copy
                return attend(attn, q, keys, values, masks[self.specs[i].sliding])

            h = layer_forward(layer, h, attention)
        logits = self.lm_head(self.dec_norm(h)).float()  # [n, C, V]; a no-op cast for fp32 weights
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits
