"""``torch.compile``'s first call without the messages known to be harmless here (everything else still shows).

* Dynamo's ``UserWarning`` that it traces through ``functools.lru_cache`` in ``fnmatch``: a family selects
  its parameters by name with :func:`fnmatch.fnmatchcase` (:func:`hoexp.hp.base.select`), whose cache only
  memoizes compiled patterns, so tracing the function beneath it gives the same result.
* ``torch.utils.cpp_extension``'s "No CUDA runtime is found, using CUDA_HOME=..." on a CUDA build of torch
  without a usable GPU: a CPU compile builds C++ kernels and needs no CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

FNMATCH_CACHE = r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function at 'fnmatch\.py"
NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def quiet_compile() -> Iterator[None]:
    """Around a compiled function's first call (tracing, kernels): the two messages above are dropped."""
    log = logging.getLogger("torch.utils.cpp_extension")
    drop = _Drop(NO_CUDA_RUNTIME)
    log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=FNMATCH_CACHE, category=UserWarning)
            yield
    finally:
        log.removeFilter(drop)
