"""The teacher: a vision LLM behind any OpenAI-compatible endpoint labels photos (DESIGN §6).

Labels cost money (or GPU time on a local server), so the package is built around never paying twice
and never keeping a bad answer. Its modules:

* `prompt`: what is asked (system prompt, answer schema, the photo as sent, the prompt version);
* `answers`: reading an answer leniently and checking it strictly;
* `cache`: the SQLite store of every paid answer, tied to the model that gave it;
* `sync`: the `Teacher`, one request per photo, `num_workers` at a time;
* `batch`: the OpenAI Batch API (half price), several batches in flight together;
* `pricing`: the config's price table, the estimate before a run and the bill after it;
* `results`: one verdict per photo and the run's counters.
"""

from .batch import BatchLabeler
from .prompt import prompt_version
from .results import LabelResult
from .sync import Teacher

__all__ = ["BatchLabeler", "LabelResult", "Teacher", "prompt_version"]
