"""A fake search objective for tests/test_compare.py, in a module of its own so that spawned
search workers import only this (not torch) to unpickle it."""

import math
import time


class Sleepy:
    """Sleeps ``seconds`` per trial in ``steps`` reports; value (log10 x + 3)² (lowest at x = 1e-3);
    trials numbered in ``bad`` report 100 at every step."""

    def __init__(self, seconds=0.1, steps=5, bad=()):
        self.seconds, self.steps, self.bad = seconds, steps, set(bad)

    def __call__(self, ctx):
        x = ctx.params["x"]
        final = (math.log10(x) + 3) ** 2
        ctx.attrs["reported"] = 0
        for step in range(1, self.steps + 1):
            time.sleep(self.seconds / self.steps)
            value = 100.0 if ctx.number in self.bad else final + 1.0 / step
            ctx.attrs["reported"] = step
            ctx.report(step, value)
        return 100.0 if ctx.number in self.bad else final


class StopsAt(Sleepy):
    """:class:`Sleepy`, but trial number ``at`` is stopped by Ctrl-C after ``after`` reports (as a run
    stopped by a signal: the search must leave it RUNNING); records every (number, x) it runs."""

    def __init__(self, at, after=2, **kw):
        super().__init__(**kw)
        self.at, self.after, self.calls = at, after, []

    def __call__(self, ctx):
        self.calls.append((ctx.number, ctx.params["x"]))
        if ctx.number == self.at:
            for step in range(1, self.after + 1):
                ctx.report(step, 1.0)
            raise KeyboardInterrupt
        return super().__call__(ctx)


class Flat(Sleepy):
    """:class:`Sleepy` whose good trials all report the same curve 1/step and return 0 (whatever x), so a
    pruner that compares trials at a step has only the ``bad`` ones to stop."""

    def __call__(self, ctx):
        ctx.attrs["reported"] = 0
        for step in range(1, self.steps + 1):
            time.sleep(self.seconds / self.steps)
            ctx.attrs["reported"] = step
            ctx.report(step, 100.0 if ctx.number in self.bad else 1.0 / step)
        return 100.0 if ctx.number in self.bad else 0.0
