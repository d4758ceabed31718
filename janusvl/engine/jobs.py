"""A request's life inside the engine: prefill in pieces, then one decode step at a time.

A job's `prefill()` is a generator: each `next()` does one piece of work (a vision block, a
chunk of the prompt) so the engine can decode running rows in between. Once it is exhausted the
job holds a KV cache and joins the running batch, where each step the engine asks it for its
rows' next input embeddings (`next_embeds`), runs every job's `head` once over all the rows
that share it, and hands each job its rows' scores (`take`). Both
jobs are built from the library's own functions (`prefill`, `sample`, `TextStream`, the
guided draw of `generation.image`), so a job alone computes what `Janus.chat` and
`generate_images` compute.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Protocol

import torch

from ..generation.image import cfg_input_ids, decode_image_tokens_steps, image_grid, multinomial_sampler
from ..generation.sampling import make_generator, sample
from ..generation.stream import TextStream
from ..generation.text import prefill
from ..models.janus import MultiModalityCausalLM
from ..models.kv_cache import KVCache
from ..processing.tokenizer import JanusTokenizer
from .feature_cache import FeatureCache
from .prefix_cache import PrefixCache
from .requests import ChatRequest, Delta, Finished, ImageRequest, ImagesDone, Progress, Request, RowDone

class Pacer(Protocol):
    def size(self) -> int | None:
        """Prompt tokens the next prefill chunk may take; None: all that remain, in one call."""

    def record(self, tokens: int, seconds: float) -> None:
        """How long a chunk took, so later chunks fit the time budget."""


class Job:
    request: Request
    head: torch.nn.Module  # turns the decoder's last hidden states into this job's scores
    cache: KVCache | None = None
    first_token_at: float | None = None
    admitted = False  # taken from the queue (counted as running)
    generated = 0  # tokens (chat) or image steps drawn so far

    @property
    def rows(self) -> int:
        """Rows this job adds to the running batch now."""
        return 0 if self.cache is None else self.cache.batch

    def prefill(self, pacer: Pacer) -> Generator[None, None, None]:
        raise NotImplementedError

    def next_embeds(self) -> torch.Tensor:
        raise NotImplementedError

    def take(self, scores: torch.Tensor) -> bool:
        """Consume `head`'s output for this job's rows [rows, V]; True when no row is left."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop the KV cache (finished, cancelled or failed)."""
        self.cache = None


class ChatJob(Job):
    def __init__(self, request: ChatRequest, model: MultiModalityCausalLM, tokenizer: JanusTokenizer,
                 features: FeatureCache, prefixes: PrefixCache | None = None) -> None:
        self.request = request
        self.model, self.lm, self.features, self.prefixes = model, model.language_model, features, prefixes
        self.head = self.lm.lm_head
        self.eos = tokenizer.eos_token_id
        self.generator = make_generator(request.seed, model.device)
        self.streams = [TextStream(tokenizer, request.stop) for _ in range(request.n)]
        self.counts = [0] * request.n
        self.alive = list(range(request.n))  # rows still generating, in cache order
        self.ids: torch.Tensor | None = None  # [alive] the last sampled ids

    def prefill(self, pacer: Pacer) -> Generator[None, None, None]:
        req, model = self.request, self.model
        inputs = req.inputs.to(model.device, model.dtype)
        features = yield from self._image_features(inputs.pixel_values[0])
        embeds = model.prepare_inputs_embeds(**inputs, image_features=features)  # [1, T, D]
        T = embeds.shape[1]
        # Room for a typical answer; a longer one grows the cache (max_new_tokens may be the
        # whole context, which most answers never use).
        cache = self.lm.model.new_cache(1, T + min(req.max_new_tokens, 256), growable=True)
        ids, images = inputs.input_ids[0].tolist(), inputs.images_seq_mask[0]
        start = self.prefixes.restore(ids, images, cache) if self.prefixes is not None else 0
        while start < T:
            size, began = pacer.size(), time.perf_counter()
            if start == 0 and (size is None or size >= T):
                logits = prefill(self.lm, embeds, inputs.attention_mask, cache)  # what Janus.chat runs
                pacer.record(T, time.perf_counter() - began)
                break
            size = T - start if size is None else min(size, T - start)
            positions = torch.arange(start, start + size, device=embeds.device)[None]
            out = self.lm(inputs_embeds=embeds[:, start:start + size], position_ids=positions,
                          past_key_values=cache, logits_to_keep=1)
            logits = out.logits[:, -1].float()
            pacer.record(size, time.perf_counter() - began)
            start += size
            if start < T:
                yield
        if self.prefixes is not None:
            self.prefixes.put(ids, images, cache)
        self.cache = cache.repeat(req.n) if req.n > 1 else cache
        self._sample(logits.expand(req.n, -1))

    def _image_features(self, pixels: torch.Tensor) -> Generator[None, None, torch.Tensor | None]:
        """Each image's aligned features [k, N, D], from the cache or encoded one image at a time."""
        if not self.request.image_keys:
            return None
        out = []
        for key, image in zip(self.request.image_keys, pixels, strict=True):
            found = self.features.get(key)
            if found is None:
                found = (yield from self.model.encode_images_steps(image[None]))[0]
                self.features.put(key, found)
            out.append(found)
        return torch.stack(out)

    def next_embeds(self) -> torch.Tensor:
        return self.lm.get_input_embeddings()(self.ids)[:, None]  # [rows, 1, D]

    def take(self, scores: torch.Tensor) -> bool:
        self._sample(scores.float())
        return not self.alive

    def _sample(self, logits: torch.Tensor) -> None:
        """Draw each alive row's next token, stream its text, and retire rows that ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        ids = sample(logits, self.request.params, self.generator)
        keep = []
        for i, (row, token) in enumerate(zip(self.alive, ids.tolist(), strict=True)):
            stream = self.streams[row]
            self.counts[row] += 1
            self.generated += 1
            text = stream.push(token)
            reason = "stop" if token == self.eos or stream.stopped else \
                "length" if self.counts[row] == self.request.max_new_tokens else None
            if reason is not None:
                text += stream.finish()
            # One Delta per token, even when its text is held back (an incomplete character, a
            # possible stop string): streams show progress and time to first token is visible.
            self.request.emit(Delta(row, text))
            if reason is None:
                keep.append(i)
            else:
                self.request.emit(RowDone(row, reason, self.counts[row]))
        if len(keep) < len(self.alive):
            self.alive = [self.alive[i] for i in keep]
            if self.alive and self.cache is not None:  # a finished row's memory goes at once
                self.cache.select(torch.tensor(keep, device=ids.device))
        self.ids = ids[keep] if keep else ids[:0]
        if not self.alive:
            self.release()
            self.request.emit(Finished(self.request.prompt_tokens, sum(self.counts)))


class ImageJob(Job):
    """Classifier-free guidance over 2n rows, as `generation.image.image_token_steps` runs it."""

    def __init__(self, request: ImageRequest, model: MultiModalityCausalLM, pad_id: int) -> None:
        self.request = request
        self.model = model
        self.head = model.gen_head
        self.steps = image_grid(model) ** 2
        self.input_ids = cfg_input_ids(request.prompt_ids.tolist(), request.n, pad_id).to(model.device)
        self.sampler = multinomial_sampler(request.temperature, make_generator(request.seed, model.device))
        self.tokens = torch.empty(request.n, self.steps, dtype=torch.long, device=model.device)

    def prefill(self, pacer: Pacer) -> Generator[None, None, None]:
        lm = self.model.language_model
        B, T = self.input_ids.shape
        cache = lm.model.new_cache(B, T + self.steps)
        x = lm.get_input_embeddings()(self.input_ids)  # [2n, T, D]
        h = lm.model(inputs_embeds=x, use_cache=True, past_key_values=cache).last_hidden_state
        self.cache = cache
        self.first_token_at = time.perf_counter()
        self.take(self.head(h[:, -1]))
        yield from ()  # an image prompt is short: one piece

    def next_embeds(self) -> torch.Tensor:
        ids = self.tokens[:, self.generated - 1]
        # Both rows of a pair continue with the code the pair drew.
        return self.model.prepare_gen_img_embeds(ids.repeat_interleave(2))[:, None]  # [2n, 1, D]

    def take(self, scores: torch.Tensor) -> bool:
        cond, uncond = scores[0::2], scores[1::2]  # [n, V] in the model's dtype, as DeepSeek's
        self.tokens[:, self.generated] = self.sampler(uncond + self.request.cfg_weight * (cond - uncond))
        self.generated += 1
        self.request.emit(Progress(self.generated, self.steps))
        if self.generated == self.steps:
            self.release()
            return True
        return False

    def finish(self) -> Generator[None, None, None]:
        """Turn the drawn codes into images (VQ-16 decoding, in pieces) and send them."""
        images = yield from decode_image_tokens_steps(self.model, self.tokens)
        self.request.emit(ImagesDone(images))
        self.request.emit(Finished(self.request.prompt_tokens, self.steps * self.request.n))
