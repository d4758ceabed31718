"""The engine: one thread that owns the model and advances every request one step at a time.

Each turn of its loop
1. drops requests whose submitters gave up (their KV memory goes with them; a prefill is also
   dropped between two of its pieces),
2. spends about `prefill_budget_s` on work in pieces: a vision block or a prompt chunk of the
   request being prefilled, or a VQ decoder block of an image request whose codes are drawn;
   when no row is decoding it runs whole prompts at once instead, exactly as `Janus.chat` does,
3. decodes one token for every running row, chat answers and image generations alike, in one
   pass of the decoder (`RaggedBatch`: shared matrix products, attention per request), with
   one product per output head (the language model's, the image head) for all rows that use it.
So a new request joins the running batch as soon as its prompt is in, a finished row leaves at
once, and neither a long prompt nor a 576-step image stalls the streams already running.
(The split of a thin API front end from an engine loop that owns the model follows vLLM and
nano-vllm.)
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

import torch

from .. import validation
from ..errors import CancelledError, OverloadedError, UnavailableError
from ..generation.image import check_image_args, check_image_memory, image_prompt_ids
from ..generation.sampling import ChatOptions
from ..messages import Messages
from ..models.kv_cache import RaggedBatch
from .feature_cache import FeatureCache, content_key
from .prefix_cache import PrefixCache
from .jobs import ChatJob, ImageJob, Job
from .metrics import Metrics
from .pacer import PrefillPacer
from .requests import ChatRequest, Event, Failed, ImageRequest, Request
from .stats import EngineStats, image_bytes, kv_totals

if TYPE_CHECKING:
    from ..api import Janus


class Engine:
    """Serve many chat and image requests at once from one `Janus` model.

    `max_batch` bounds the chat rows decoded together, `max_images` the images generated
    together, `max_queue` the requests waiting for room (`submit` raises OverloadedError beyond
    it). Call `start()` once, `close()` to drain and stop."""

    def __init__(self, janus: Janus, max_batch: int = 8, max_queue: int = 64, max_images: int = 16,
                 image_cache_mb: float = 256, prefill_budget_s: float = 0.75,
                 metrics: Metrics | None = None, prefix_cache_mb: float = 256) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("max_images", max_images)):
            validation.integer(name, value, minimum=1)
        validation.number("image_cache_mb", image_cache_mb, minimum=0)
        validation.number("prefix_cache_mb", prefix_cache_mb, minimum=0)
        validation.number("prefill_budget_s", prefill_budget_s, minimum=0)
        self.janus = janus
        self.model, self.processor, self.tokenizer = janus.model, janus.processor, janus.tokenizer
        self.max_batch, self.max_queue, self.max_images = max_batch, max_queue, max_images
        self.metrics = metrics or Metrics(enabled=False)
        self.features = FeatureCache(int(image_cache_mb * 2**20), self.metrics.cache_lookup)
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20), on_reuse=self.metrics.prefix_tokens.inc) \
            if prefix_cache_mb > 0 else None
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
        # Weak: they tell what is still alive of what was submitted, without keeping it alive.
        self._requests: weakref.WeakValueDictionary[int, Request] = weakref.WeakValueDictionary()
        self._jobs: weakref.WeakValueDictionary[int, Job] = weakref.WeakValueDictionary()
        self.metrics.kv_bytes.set_function(lambda: kv_totals()[1])
        self._thread = threading.Thread(target=self._loop, name="janusvl-engine", daemon=True)

    # ------------------------------------------------------------------ building requests

    def chat_request(self, messages: Messages | str, max_new_tokens: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, n: int = 1,
                     seed: int | None = None, stop: str | Sequence[str] | None = None,
                     plain_text: bool = False, length_name: str = "max_new_tokens") -> ChatRequest:
        """Check and preprocess a conversation (images are opened and resized here, in the
        caller's thread, once the prompt is known to fit). `max_new_tokens` None allows what the
        context leaves. With `plain_text`, special-token strings in the messages' text are
        ordinary text (the server's default: a user cannot end their turn or forge another by
        typing `<|Assistant|>`). `length_name` is what a context-length error calls
        `max_new_tokens` (the server's `max_tokens`)."""
        options = ChatOptions.check(max_new_tokens, temperature, top_p, top_k, seed, stop)
        n = validation.integer("n", n, minimum=1)
        prompt = self.janus.prompt(messages, plain_text=plain_text)
        if max_new_tokens is None:
            limit = self.model.config.language_config.max_position_embeddings
            max_new_tokens = max(limit - len(prompt.ids), 1)
        max_new_tokens = self.janus.check_room(prompt, max_new_tokens, length_name)
        keys = [content_key(bytes(im)) if isinstance(im, (bytes, bytearray, memoryview)) else None
                for im in prompt.images]
        one = self.processor.with_images(prompt.text, prompt.ids, prompt.images)
        return ChatRequest(inputs=self.processor.batchify([one]), image_keys=keys, max_new_tokens=max_new_tokens,
                           params=options.params, n=n, seed=options.seed, stop=options.stop)

    def image_request(self, prompt: str, n: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                      seed: int | None = None, plain_text: bool = False) -> ImageRequest:
        n, cfg_weight, temperature, seed = check_image_args(prompt, n, cfg_weight, temperature, seed)
        validation.integer("n", n, maximum=self.max_images)  # at most max_images images per request
        ids = image_prompt_ids(self.model, self.processor, prompt, self.janus.roles, plain_text)
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
            job: Job = ChatJob(request, self.model, self.tokenizer, self.features, self.prefixes)
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
            self._requests[request.id] = request
            self._jobs[request.id] = job
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._current or self._running or self._finishing)

    @property
    def running_rows(self) -> int:
        return sum(job.rows for job in self._running)

    def stats(self) -> EngineStats:
        """Queue and batch sizes, and the memory held by the requests submitted so far (objects
        not yet freed anywhere in the process: after a request ends, nothing of it should be)."""
        with self._cond:
            waiting = len(self._waiting)
            requests, jobs = list(self._requests.values()), list(self._jobs.values())
        current = self._current  # read once: the engine's thread may clear it meanwhile
        running = [*self._running, *self._finishing, *([current[0]] if current else [])]
        caches, kv_bytes = kv_totals()
        return EngineStats(waiting=waiting, running=len(running), rows=sum(j.rows for j in self._running),
                           requests_alive=len(requests), jobs_alive=len(jobs), kv_caches=caches,
                           kv_bytes=kv_bytes, image_bytes=image_bytes(requests, jobs),
                           feature_cache_bytes=self.features.bytes,
                           prefix_cache_bytes=self.prefixes.bytes if self.prefixes is not None else 0)

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
                    self._fail_all(exc, waiting=False)
        self._fail_all(UnavailableError("the server shut down before this request finished"))

    def _fail_all(self, exc: BaseException, waiting: bool = True) -> None:
        # A method of its own: a job left in a variable of `_loop`'s frame (which lives as long as
        # the engine) would keep that request's memory alive.
        for job in self._all_jobs(waiting):
            self._end(job, Failed(exc))

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
        self._drop_current_if_cancelled()
        for job in [j for j in (*self._running, *self._finishing) if j.request.cancelled]:
            if job in self._running:
                self._running.remove(job)
            else:
                self._finishing.remove(job)
            self._end(job, Failed(CancelledError("cancelled")))

    def _drop_current_if_cancelled(self) -> bool:
        if self._current is None or not self._current[0].request.cancelled:
            return False
        job, steps, _ = self._current
        steps.close()
        self._current = None
        self._end(job, Failed(CancelledError("cancelled")))
        return True

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
                self._start(self._finishing.popleft(), "finish")
            else:
                job = self._admit()
                if job is None:
                    return
                self.metrics.running.inc()
                job.admitted = True
                self._start(job, "prefill")
            now = time.perf_counter()
            if self._running and (now - start) + (now - began) > self.prefill_budget_s:
                return

    def _start(self, job: Job, kind: str) -> None:
        """Make `job` the one worked on in pieces (its prefill, or its image decoding)."""
        try:
            steps = job.prefill(self.pacer) if kind == "prefill" else job.finish()
        except Exception as exc:  # noqa: BLE001 - out of every list already: end it here or lose it
            self._end(job, Failed(exc))
            return
        self._current = (job, steps, kind)

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
        if self._drop_current_if_cancelled():  # its client left mid-prefill: stop between pieces
            return
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
            scores = heads(jobs, hidden[:, -1].split(batch.sizes))
        except Exception as exc:  # noqa: BLE001 - the shared pass failed: nothing tells whose fault
            for job in jobs:
                self._running.remove(job)
                self._end(job, Failed(exc))
            return
        for job, part in zip(jobs, scores, strict=True):
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


def heads(jobs: Sequence[Job], hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each job's scores from its hidden states, with one product per head for all the rows that
    share it: every chat row reads the language model's head (a fifth of the decoder's weights
    for Pro-1B) once per step, not once per request."""
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job.head), []).append(i)
    out: list[torch.Tensor] = [hidden[0]] * len(jobs)
    for members in groups.values():
        scores = jobs[members[0]].head(torch.cat([hidden[i] for i in members]))
        for i, part in zip(members, scores.split([hidden[i].shape[0] for i in members]), strict=True):
            out[i] = part
    return out
