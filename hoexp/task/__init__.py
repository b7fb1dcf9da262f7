"""Tasks: the bilevel problem's losses as pure functions of ``(params, raw, batch)``, plus its data.

``classification`` (Iris, MNIST: an MLP, cross-entropy, accuracy) and ``language_model`` (PTB: an
LSTM, BPTT windows, perplexity); ``streams`` holds the checkpointable batch streams both draw from.
"""

from hoexp.task.base import BatchStream, DropoutModel, Task
from hoexp.task.classification import Classification
from hoexp.task.language_model import LanguageModel, LMData

__all__ = ["BatchStream", "Classification", "DropoutModel", "LMData", "LanguageModel", "Task"]
