"""The engine: one thread that owns the model and advances every request one step at a time.

Each turn of its loop
1. drops requests whose submitters gave up (their KV memory goes with them),
2. spends about `prefill_budget_s` on work in pieces: a vision block or a prompt chunk of the
   request being prefilled, or a VQ decoder block of an image request whose codes are drawn;
   when no row is decoding it runs whole prompts at once instead, exactly as `Janus.chat` does,
3. decodes one token for every running row, chat answers and image generations alike, in one
   pass of the decoder (`RaggedBatch`: shared matrix products, attention per request).
So a new request joins the running batch as soon as its prompt is in, a finished row leaves at
once, and neither a long prompt nor a 576-step image stalls the streams already running.
(The split of a thin API front end from an engine loop that owns the model follows vLLM and
nano-vllm.)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING

import torch

from .. import validation
from ..errors import CancelledError, OverloadedError, UnavailableError
from ..generation.image import check_image_args, check_image_memory, image_prompt_ids
from ..generation.sampling import ChatOptions
from ..messages import Messages
from ..models.kv_cache import RaggedBatch
from .feature_cache import FeatureCache, content_key
from .jobs import ChatJob, ImageJob, Job
from .metrics import Metrics
from .requests import ChatRequest, Event, Failed, ImageRequest, Request

if TYPE_CHECKING:
    from ..api import Janus


class PrefillPacer:
    """Sizes prompt chunks to fit what is left of the engine's time budget while other rows wait
    to decode. A chunk's time is modelled as overhead + tokens x per-token cost, fitted to the
    recent chunks: on CPUs without native bf16 each chunk pays a large fixed cost (the weights
    are widened to fp32 per call), so time per token alone would shrink the chunks forever."""

    def __init__(self, busy: Callable[[], bool]) -> None:
        self.busy = busy
        self.deadline = 0.0
        self.samples: deque[tuple[int, float]] = deque(maxlen=12)

    def size(self) -> int | None:
        if not self.busy():
            return None
        sizes = {n for n, _ in self.samples}
        if len(sizes) < 2:  # two different sizes make the model identifiable
            return 32 if not sizes else (64 if 32 in sizes else 32)
        overhead, per_token = self.fit()
        remaining = self.deadline - time.perf_counter()
        return int(min(max((remaining - overhead) / per_token, 16), 4096))

    def fit(self) -> tuple[float, float]:
        """(seconds per chunk, seconds per token), least squares over the recent chunks."""
        n = torch.tensor([s[0] for s in self.samples], dtype=torch.float64)
        t = torch.tensor([s[1] for s in self.samples], dtype=torch.float64)
        dn = n - n.mean()
        per_token = float((dn * (t - t.mean())).sum() / (dn * dn).sum().clamp(min=1e-9))
        per_token = max(per_token, 1e-6)
        return max(float(t.mean()) - per_token * float(n.mean()), 0.0), per_token

    def record(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))


class Engine:
    """Serve many chat and image requests at once from one `Janus` model.

    `max_batch` bounds the chat rows decoded together, `max_images` the images generated
    together, `max_queue` the requests waiting for room (`submit` raises OverloadedError beyond
    it). Call `start()` once, `close()` to drain and stop."""

    def __init__(self, janus: Janus, max_batch: int = 8, max_queue: int = 64, max_images: int = 16,
                 image_cache_mb: float = 256, prefill_budget_s: float = 0.75,
                 metrics: Metrics | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_images", max_images)):
            validation.integer(name, value, minimum=1)
        validation.number("image_cache_mb", image_cache_mb, minimum=0)
        validation.number("prefill_budget_s", prefill_budget_s, minimum=0)
        self.janus = janus
        self.model, self.processor, self.tokenizer = janus.model, janus.processor, janus.tokenizer
        self.max_batch, self.max_queue, self.max_images = max_batch, max_queue, max_images
        self.metrics = metrics or Metrics(enabled=False)
        self.features = FeatureCache(int(image_cache_mb * 2**20), self.metrics.cache_lookup)
        self.pacer = PrefillPacer(lambda: bool(self._running))
        self.prefill_budget_s = prefill_budget_s
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        # The one job being worked on in pieces: its prefill, or its image decoding ("finish").
        self._current: tuple[Job, Generator[None, None, None], str] | None = None
        self._running: list[Job] = []
        self._finishing: deque[ImageJob] = deque()
        self._closed = False
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="janusvl-engine", daemon=True)

    # ------------------------------------------------------------------ building requests

    def chat_request(self, messages: Messages | str, max_new_tokens: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, n: int = 1,
                     seed: int | None = None, stop: str | Sequence[str] | None = None) -> ChatRequest:
        """Check and preprocess a conversation (images are opened and resized here, in the
        caller's thread, once the prompt is known to fit). `max_new_tokens` None allows what the
        context leaves."""
        options = ChatOptions.check(max_new_tokens, temperature, top_p, top_k, seed, stop)
        n = validation.integer("n", n, minimum=1)
        prompt = self.janus.prompt(messages)
        if max_new_tokens is None:
            limit = self.model.config.language_config.max_position_embeddings
            max_new_tokens = max(limit - len(prompt.ids), 1)
        max_new_tokens = self.janus.check_room(prompt, max_new_tokens)
        keys = [content_key(bytes(im)) if isinstance(im, (bytes, bytearray, memoryview)) else None
                for im in prompt.images]
        one = self.processor.with_images(prompt.text, prompt.ids, prompt.images)
        return ChatRequest(inputs=self.processor.batchify([one]), image_keys=keys, max_new_tokens=max_new_tokens,
                           params=options.params, n=n, seed=options.seed, stop=options.stop)

    def image_request(self, prompt: str, n: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                      seed: int | None = None) -> ImageRequest:
        n, cfg_weight, temperature, seed = check_image_args(prompt, n, cfg_weight, temperature, seed)
        validation.integer("n", n, maximum=self.max_images)  # at most max_images images per request
        ids = image_prompt_ids(self.model, self.processor, prompt, self.janus.roles)
        check_image_memory(self.model, n, len(ids))
        return ImageRequest(prompt_ids=torch.tensor(ids, dtype=torch.long), n=n, cfg_weight=cfg_weight,
                            temperature=temperature, seed=seed)

    # ------------------------------------------------------------------ front-end interface

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        """Queue a request; its events arrive through `request.emit`, from the engine's thread."""
        if isinstance(request, ChatRequest):
            job: Job = ChatJob(request, self.model, self.tokenizer, self.features)
        elif isinstance(request, ImageRequest):
            job = ImageJob(request, self.model, self.processor.pad_id)
        else:
            raise TypeError(f"cannot submit a {type(request).__name__}")
        with self._cond:
            if self._closed:
                self.metrics.rejected.labels("unavailable").inc()
                raise UnavailableError("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise OverloadedError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._current or self._running or self._finishing)

    @property
    def running_rows(self) -> int:
        return sum(job.rows for job in self._running)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop admitting, let the admitted requests finish for up to `timeout` seconds, then
        fail what is left and stop the thread. True when everything finished in time."""
        with self._cond:
            self._closed = True
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        drained = self.idle
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        return drained

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and self.idle:
                        self._cond.wait()
                    if self._stop:
                        break
                try:
                    self._drop_cancelled()
                    self._work()
                    if self._running:
                        self._decode()
                except Exception as exc:  # noqa: BLE001 - a bug in the loop itself: fail what it held, go on
                    for job in self._all_jobs(waiting=False):
                        self._end(job, Failed(exc))
        for job in self._all_jobs():
            self._end(job, Failed(UnavailableError("the server shut down before this request finished")))

    def _all_jobs(self, waiting: bool = True) -> list[Job]:
        """Take every job out of the engine (the waiting ones too, unless told otherwise)."""
        with self._cond:
            jobs = [*self._running, *self._finishing]
            if waiting:
                jobs += self._waiting
                self._waiting.clear()
        if self._current is not None:
            jobs.append(self._current[0])
        self._current, self._running, self._finishing = None, [], deque()
        return jobs

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [job for job in self._waiting if job.request.cancelled]
            for job in gone:
                self._waiting.remove(job)
            self.metrics.waiting.set(len(self._waiting))
        if self._current is not None and self._current[0].request.cancelled:
            job, steps, _ = self._current
            steps.close()
            self._current = None
            self._end(job, Failed(CancelledError("cancelled")))
        for job in [j for j in (*self._running, *self._finishing) if j.request.cancelled]:
            if job in self._running:
                self._running.remove(job)
            else:
                self._finishing.remove(job)
            self._end(job, Failed(CancelledError("cancelled")))

    def _work(self) -> None:
        """Prefill pieces and image decodings while rows are waiting to decode, as long as the
        next piece is likely to end within the time budget (without limit when none wait)."""
        start = time.perf_counter()
        self.pacer.deadline = start + self.prefill_budget_s
        while True:
            began = time.perf_counter()
            if self._current is not None:
                self._piece()
            elif self._finishing:
                job = self._finishing.popleft()
                self._current = (job, job.finish(), "finish")
            else:
                job = self._admit()
                if job is None:
                    return
                self.metrics.running.inc()
                job.admitted = True
                self._current = (job, job.prefill(self.pacer), "prefill")
            now = time.perf_counter()
            if self._running and (now - start) + (now - began) > self.prefill_budget_s:
                return

    def _admit(self) -> Job | None:
        """The first waiting request that fits next to the running ones (FIFO otherwise)."""
        chat_rows = sum(j.rows for j in self._running if isinstance(j, ChatJob))
        current = [self._current[0]] if self._current else []
        images = sum(j.request.n for j in (*self._running, *self._finishing, *current) if isinstance(j, ImageJob))
        with self._cond:
            for job in self._waiting:
                n = job.request.n
                fits = (chat_rows == 0 or chat_rows + n <= self.max_batch) if isinstance(job, ChatJob) \
                    else (images == 0 or images + n <= self.max_images)
                if fits:
                    self._waiting.remove(job)
                    self.metrics.waiting.set(len(self._waiting))
                    return job
        return None

    def _piece(self) -> None:
        """One piece of the current job; when its prefill is done it joins the running batch."""
        assert self._current is not None
        job, steps, kind = self._current
        try:
            next(steps)
            return
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
            self._current = None
            self._end(job, Failed(exc))
            return
        self._current = None
        if kind == "finish":
            self._completed(job)
            return
        self.metrics.prompt_tokens.inc(job.request.prompt_tokens)
        self._observe_first_token(job)
        if job.rows:
            self._running.append(job)
        else:  # ended at its first token
            self._completed(job)

    def _decode(self) -> None:
        jobs, embeds = [], []
        for job in list(self._running):
            try:
                embeds.append(job.next_embeds())
                jobs.append(job)
            except Exception as exc:  # noqa: BLE001
                self._running.remove(job)
                self._end(job, Failed(exc))
        if not jobs:
            return
        batch = RaggedBatch([job.cache for job in jobs])
        try:
            hidden = self.model.language_model.model(inputs_embeds=torch.cat(embeds), past_key_values=batch,
                                                     use_cache=True).last_hidden_state  # [rows, 1, D]
        except Exception as exc:  # noqa: BLE001 - the shared pass failed: nothing tells whose fault
            for job in jobs:
                self._running.remove(job)
                self._end(job, Failed(exc))
            return
        for job, part in zip(jobs, hidden.split(batch.sizes), strict=True):
            before = job.generated
            try:
                done = job.take(part)
            except Exception as exc:  # noqa: BLE001
                self._running.remove(job)
                self._end(job, Failed(exc))
                continue
            if isinstance(job, ChatJob):
                self.metrics.generated_tokens.inc(job.generated - before)
            else:
                self.metrics.image_steps.inc()
            if done:
                self._running.remove(job)
                if isinstance(job, ImageJob):
                    self._finishing.append(job)
                else:
                    self._completed(job)

    # ------------------------------------------------------------------ endings (one path each)

    def _observe_first_token(self, job: Job) -> None:
        if job.first_token_at is not None:
            self.metrics.ttft.observe(job.first_token_at - job.request.submitted)
            if isinstance(job, ImageJob):
                self.metrics.image_steps.inc()
            else:
                self.metrics.generated_tokens.inc(job.generated)

    def _completed(self, job: Job) -> None:
        now = time.perf_counter()
        kind = "image" if isinstance(job, ImageJob) else "chat"
        self.metrics.latency.labels(kind).observe(now - job.request.submitted)
        if kind == "image":
            self.metrics.images.inc(job.request.n)
        elif job.generated > job.request.n and job.first_token_at is not None:
            steps = job.generated / job.request.n - 1
            self.metrics.tpot.observe((now - job.first_token_at) / steps)
        job.release()
        self.metrics.running.dec()

    def _end(self, job: Job, event: Event) -> None:
        """A job that did not complete: free it, tell its submitter, count it."""
        job.release()
        if not isinstance(event, Failed) or not isinstance(event.error, CancelledError):
            self.metrics.failed.inc()
        if not job.request.cancelled:
            try:
                job.request.emit(event)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
                pass
        if job.admitted:
            self.metrics.running.dec()
