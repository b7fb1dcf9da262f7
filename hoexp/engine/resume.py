"""What may change when a run is resumed, and the check that nothing else did.

A checkpoint stores the run's composed config (``Spec.raw``). Resuming compares it with the new
command's config key by key: keys in :data:`RESUMABLE_KEYS` may differ (the change is recorded in
the checkpoint and ``summary.json``), any other difference is refused in one line naming the keys.
:data:`RUN_CONTROL_KEYS` change how a run is executed or shown, never what it computes, so
``hoexp report`` does not treat them as configuration differences either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hoexp.errors import HoexpError

# How a run is executed, shown and stored, not what it computes.
RUN_CONTROL_KEYS = frozenset(
    "resume progress threads checkpoint_every histogram_every log_every name dataset.data_root dataset.download".split()
)
# Also allowed to change on resume: outer_steps and max_time (extend or finish a run early), device (a requeued job
# may land on another kind of node; results then differ in the last bits, as between any two devices).
RESUMABLE_KEYS = RUN_CONTROL_KEYS | {"outer_steps", "max_time", "device"}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys (lists are leaves)."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every key that differs (``None``: absent)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) or (k in a) != (k in b)}


def _show(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume(old: Mapping[str, Any], new: Mapping[str, Any], folder: Any, step: int) -> dict[str, tuple[Any, Any]]:
    """The allowed changes from the checkpoint's config ``old`` to ``new``; anything else is a
    :class:`HoexpError` naming the differing keys. ``step``: the checkpoint's outer step."""
    changes = config_changes(old, new)
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_KEYS}
    # Another option of a group: name it, not each of its keys.
    swapped = {k[: -len(".name")] for k in refused if k.endswith(".name")}
    refused = {k: v for k, v in refused.items() if not any(k.startswith(g + ".") and k != g + ".name" for g in swapped)}
    if refused:
        shown = ", ".join(f"{k} ({_show(a)} → {_show(b)})" for k, (a, b) in list(refused.items())[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise HoexpError(
            f"cannot resume {folder}: the configuration differs from the checkpoint's in {shown}{more}; "
            f"only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume (start a new run in "
            "another folder instead)"
        )
    outer = new.get("outer_steps")
    if isinstance(outer, int) and outer < step:
        raise HoexpError(
            f"cannot resume {folder} with outer_steps={outer}: its checkpoint is at outer step {step}; "
            f"pass outer_steps >= {step}"
        )
    return {k: v for k, v in changes.items() if k != "resume"}
