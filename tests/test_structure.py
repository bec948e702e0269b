"""The shape of the code a training ``batch_norm`` call runs (issue 20): few functions, one check.

A first (cache-cold) trace of ``jax.jit(lambda x, s: jaxbn.batch_norm(x, None, s, training=True))``
is profiled with ``sys.setprofile``: it passes at most 12 jaxbn functions outside the validation
module (lambdas count, comprehensions do not), in at most 3 files; it enters ``_validation`` once
(one call that checks every argument); and it builds at most 3 record types (NamedTuples or
dataclasses of jaxbn). ``docs/internals.md`` reads the path top to bottom.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

import jaxbn

PACKAGE = os.path.dirname(jaxbn.__file__) + os.sep
COMPREHENSIONS = {"<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>"}


def _record_type(frame):
    """The jaxbn NamedTuple or dataclass a constructor frame builds, else None."""
    code = frame.f_code
    if code.co_name not in ("__new__", "__init__", "_make", "<lambda>") or not code.co_varnames:
        return None
    first = frame.f_locals.get(code.co_varnames[0])
    cls = first if isinstance(first, type) else type(first)
    if not cls.__module__.startswith("jaxbn"):
        return None
    namedtuple = issubclass(cls, tuple) and hasattr(cls, "_fields")
    return cls if namedtuple or dataclasses.is_dataclass(cls) else None


def _profile_first_trace():
    """(jaxbn code objects called, calls into _validation from outside it, record types built)."""
    x = jnp.ones((11, 3, 2, 5))  # a shape no other test uses: the jitted steps' caches are cold
    _, state = jaxbn.batch_norm_init(5)
    jax.clear_caches()
    called, entries, records = set(), [], set()

    def profile(frame, event, arg):
        if event != "call":
            return
        record = _record_type(frame)
        if record is not None:
            records.add(record)
        code = frame.f_code
        if not code.co_filename.startswith(PACKAGE):
            return
        called.add(code)
        caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
        if code.co_filename.endswith("_validation.py") and not caller.endswith("_validation.py"):
            entries.append(code.co_name)

    traced = jax.jit(lambda x, s: jaxbn.batch_norm(x, None, s, training=True))
    sys.setprofile(profile)
    try:
        traced.lower(x, state)
    finally:
        sys.setprofile(None)
    return called, entries, records


def test_a_training_call_is_a_short_path_with_one_check():
    called, entries, records = _profile_first_trace()
    outside = {code for code in called if not code.co_filename.endswith("_validation.py")}
    named = sorted(
        (os.path.basename(code.co_filename), code.co_name, code.co_firstlineno)
        for code in outside
        if code.co_name not in COMPREHENSIONS
    )
    files = {name for name, _, _ in named}
    assert len(named) <= 12, named
    assert len(files) <= 3, files
    assert entries == ["check_batch_norm"], entries
    assert len(records) <= 3, records
