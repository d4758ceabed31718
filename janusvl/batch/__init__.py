"""Batch jobs: caption a folder or a table of images, render a file of prompts.

Each job is the engine plus a reader and a writer (see `jobs.py`); the Ray backend runs the
same callables (`Captioner`, `Renderer`) in Ray Data's `map_batches`. In a notebook:

    from janusvl import Janus
    from janusvl.batch import Captioner, caption_job, read_inputs

    janus = Janus.from_pretrained("deepseek-ai/Janus-Pro-1B")
    captioner = Captioner(janus, batch_size=8, max_new_tokens=64)
    for record in captioner.stream(read_inputs("photos/").rows()):
        print(record["id"], record["answer"])
    captioner.close()

    caption_job(janus, "photos/", "captions.parquet")   # the CLI's job: resumable, with progress
"""

from .caption import Captioner
from .imagine import ImagineInput, Renderer, read_prompts
from .inputs import DEFAULT_PROMPT, CaptionInput, InputSet, read_inputs
from .jobs import Backend, Summary, caption_job, imagine_job
from .outputs import CAPTION_COLUMNS, CaptionSink, caption_schema

__all__ = ["Captioner", "Renderer", "CaptionInput", "ImagineInput", "InputSet", "read_inputs", "read_prompts",
           "caption_job", "imagine_job", "Backend", "Summary", "CaptionSink", "CAPTION_COLUMNS", "caption_schema",
           "DEFAULT_PROMPT"]
