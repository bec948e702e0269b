"""The shape of the code a training ``batch_norm`` call runs (issue 20): few functions, one check.

A first (cache-cold) trace of ``jax.jit(lambda x, s: jaxbn.batch_norm(x, None, s, training=True))``
is profiled with ``sys.setprofile``: it passes at most 12 jaxbn functions outside the validation
module (lambdas count, comprehensions do not), in at most 3 files; it enters ``_validation`` once
(one call that checks every argument); and it builds at most 3 record types (NamedTuples or
dataclasses of jaxbn). ``docs/internals.md`` reads the path top to bottom. And no jaxbn module
reads another's private (``_``) name.
"""

import ast
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


def _private_names_reached(package_dir):
    """``(file, line, name)`` for every ``_name`` (not a dunder, not a module) of one jaxbn module
    that another reads: ``module._name`` or ``from jaxbn.module import _name``."""
    modules = {name[:-3] for name in os.listdir(package_dir) if name.endswith(".py")}
    private = lambda name: name.startswith("_") and not name.startswith("__")
    reached = []
    for file in sorted(modules):
        with open(os.path.join(package_dir, file + ".py")) as source_file:
            tree = ast.parse(source_file.read())
        bound = {"jaxbn": "__init__"}  # local name -> the jaxbn module it is
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):  # import jaxbn.module as name
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "jaxbn" and alias.asname and parts[-1] in modules:
                        bound[alias.asname] = parts[-1]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxbn"):
                source = (node.module.split(".", 1) + ["__init__"])[1]
                for alias in node.names:
                    if alias.name in modules:  # a module, private or not, is shared by design
                        bound[alias.asname or alias.name] = alias.name
                    elif private(alias.name) and source != file:
                        reached.append((file, node.lineno, f"{source}.{alias.name}"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not private(node.attr):
                continue
            owner = node.value
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name):
                module = owner.attr if owner.value.id == "jaxbn" and owner.attr in modules else None
            else:
                module = bound.get(owner.id) if isinstance(owner, ast.Name) else None
            if module is not None and module != file:
                reached.append((file, node.lineno, f"{module}.{node.attr}"))
    return reached


def test_no_module_reaches_for_another_modules_private_name():
    """What two jaxbn modules share lives in one place under a name that module exports
    (``DESIGN.md``): no module reads another's ``_name``."""
    assert _private_names_reached(PACKAGE) == []
