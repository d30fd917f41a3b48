"""Fuzzing job.toml through `load_job`: random structures, wrong types, huge strings, deep
nesting, unicode, raw garbage. Each gives a loaded job or an `invalid_job` naming the key."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Settings
from engine.errors import ConfigError, JobError
from engine.images import png_bytes
from engine.job import JOB_FILE, MAX_JOB_FILE_BYTES
from engine.kinds.replicate import JobSpec
from engine.schema import Table, Tables
from tests.harness.strategies import (
    BASE_TABLE,
    JOB_CODES,
    KEY_PATHS,
    SECTION_PATHS,
    check_error,
    delete_path,
    keys,
    load_or_refuse,
    path_name,
    set_path,
    toml_values,
    write_job,
)
from tests.harness.toml_writer import dumps

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TINY_PNG = png_bytes(np.zeros((4, 4, 3), dtype=np.uint8))


def _folder(root: str, content) -> Path:
    folder = write_job(Path(root) / "alice", content)
    (folder / "a.png").write_bytes(TINY_PNG)
    return folder


mutations = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEY_PATHS + SECTION_PATHS), toml_values),
    st.tuples(st.just("delete"), st.sampled_from(KEY_PATHS + SECTION_PATHS), st.none()),
    # an unknown key anywhere a table is
    st.tuples(st.just("add"), st.sampled_from([(), *SECTION_PATHS]), st.tuples(keys, toml_values)),
)


@FUZZ
@given(mutation=mutations)
def test_one_mutation_of_a_good_job_is_loaded_or_named(mutation):
    kind, path, value = mutation
    table = copy.deepcopy(BASE_TABLE)
    if kind == "set":
        set_path(table, path, value)
        named = path_name(path)
    elif kind == "delete":
        delete_path(table, path)
        named = path_name(path)
    else:
        key, value = value
        set_path(table, path + (key,), value)
        named = path_name(path + (key,)) if path else key
    with tempfile.TemporaryDirectory() as root:
        result = load_or_refuse(_folder(root, table))
    if isinstance(result, JobError):
        check_error(result, JOB_CODES, (JOB_FILE,))
        # The problem is reported where the mutation was made (or at a table above it: a
        # wrong type for a whole table, a missing required [[render]]).
        # (a junk key longer than MAX_KEY_CHARS is shown cut: "aaaa…(300 characters)")
        wheres = [p.where.removeprefix(f"{JOB_FILE}: ").split("…(")[0] for p in result.problems]
        top = named.split(".")[0].split("[")[0]
        assert any(w.startswith(top) or named.startswith(w) for w in wheres), (named, wheres)


job_tables = st.dictionaries(keys, toml_values, max_size=6) | st.fixed_dictionaries(
    {}, optional={"subject": toml_values, "prepare": toml_values, "train": toml_values, "verify": toml_values, "render": toml_values}
)


@FUZZ
@given(table=job_tables)
def test_random_tables_are_loaded_or_refused(table):
    with tempfile.TemporaryDirectory() as root:
        result = load_or_refuse(_folder(root, table))
    if isinstance(result, JobError):
        check_error(result, JOB_CODES, (JOB_FILE,))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(content=st.one_of(st.text(max_size=300), st.binary(max_size=300), st.sampled_from([
    "", "[[render]]", "[[render]]\nprompt = 1", "render = 1", "[render]\nprompt = \"x\"", "\ufeff[[render]]\nprompt = \"x\"\n",
    "[[render]]\nprompt = \"x\"\n[[render]]\nprompt = \"y\"\n" * 9, "a = 1\na = 2", "[[render]]\nprompt = '''\n\n'''",
])))
def test_raw_text_and_bytes_are_loaded_or_refused(content):
    with tempfile.TemporaryDirectory() as root:
        result = load_or_refuse(_folder(root, content))
    if isinstance(result, JobError):
        check_error(result, JOB_CODES, (JOB_FILE,))


def _nested(depth: int, form: str) -> str:
    if form == "inline_table":
        return "[[render]]\nprompt = " + "{a = " * depth + "1" + "}" * depth + "\n"
    if form == "array":
        return "[[render]]\nprompt = " + "[" * depth + "]" * depth + "\n"
    if form == "dotted_key":
        return "[[render]]\nprompt." + "a." * depth + "a = 1\n"
    if form == "table_header":
        return "[[render]]\nprompt = \"x\"\n[subject." + ".".join(["a"] * depth) + "]\nb = 1\n"
    if form == "unknown_dotted":
        return "[[render]]\nprompt = \"x\"\n" + "a." * depth + "b = 1\n"
    raise ValueError(form)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(depth=st.one_of(st.integers(1, 60), st.sampled_from([500, 999, 1000, 5000, 60_000])),
       form=st.sampled_from(["inline_table", "array", "dotted_key", "table_header", "unknown_dotted"]))
def test_deep_nesting_is_refused_not_a_recursion_error(depth, form):
    text = _nested(depth, form)
    with tempfile.TemporaryDirectory() as root:
        started = time.monotonic()
        result = load_or_refuse(_folder(root, text))
        # tomllib is quadratic in the parts of a dotted key: 60,000 parts took 100 s before
        # read_toml refused them unparsed. A refusal must be quick, even on a loaded machine.
        assert time.monotonic() - started < 10, f"{time.monotonic() - started:.1f} s to refuse {form} x {depth}"
    if len(text.encode()) > MAX_JOB_FILE_BYTES:
        assert isinstance(result, JobError) and "bytes" in result.message
    assert isinstance(result, JobError), "a nested value is never a valid prompt/subject"
    check_error(result, JOB_CODES, (JOB_FILE,))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(size=st.sampled_from([1001, 70_000, 250_000, MAX_JOB_FILE_BYTES + 1]), where=st.sampled_from(["key", "value", "prompt", "photo"]),
       char=st.sampled_from(["x", "é", "\U0001F600", "\\n"]))
def test_huge_strings_give_a_short_clear_error(size, where, char):
    big = char * (size // len(char.encode()))
    if where == "key":
        text = f'[[render]]\nprompt = "x"\n[prepare]\n"{big}" = 1\n'
    elif where == "value":
        text = f'[[render]]\nprompt = "x"\n[prepare]\nsize = "{big}"\n'
    elif where == "prompt":
        text = f'[[render]]\nprompt = "{big}"\n'
    else:
        text = f'[[render]]\nprompt = "x"\n[subject]\nphotos = ["{big}.png"]\n'
    with tempfile.TemporaryDirectory() as root:
        result = load_or_refuse(_folder(root, text))
    assert isinstance(result, JobError)
    check_error(result, JOB_CODES, (JOB_FILE,))


config_job_tables = st.dictionaries(st.sampled_from(["prepare", "train", "verify", "render", "subject", "other"]), toml_values, max_size=3)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(defaults=st.one_of(config_job_tables, st.sampled_from([
    {"prepare": {"size": 256}, "render": {"count": 2}},
    {"render": {"mode": "two_pass", "steps": 3}},
    {"train": {"phases": [{"name": "ONLY"}]}},
])), table=job_tables)
def test_config_defaults_under_random_tables(defaults, table):
    """[job.*] defaults from config.toml are validated when the config is read (a ConfigError
    naming job.<section>), and whatever passes is merged under whatever the job says."""
    with tempfile.TemporaryDirectory() as root:
        try:
            config = Settings.from_table({"job": defaults}, root=Path(root))
        except ConfigError as error:
            check_error(error, {"invalid_config"}, ("config.toml: job",))
            return
        result = load_or_refuse(_folder(root, table), config.job_defaults)
    if isinstance(result, JobError):
        check_error(result, JOB_CODES, (JOB_FILE,))


def test_toml_writer_round_trips_the_base_job():
    import tomllib

    assert tomllib.loads(dumps(BASE_TABLE)) == BASE_TABLE


def _valid_value(check, rng):
    """A value the key's own rule accepts (None where the rule is not a plain scalar one)."""
    from engine.schema import Bool, Float, Int, Str

    if isinstance(check, Bool):
        return rng.random() < 0.5
    if isinstance(check, Int):
        low, high = check.low if check.low is not None else -1000, check.high if check.high is not None else 1000
        return rng.choice([low, high, rng.randint(low, min(high, low + 2000))])
    if isinstance(check, Float):
        low, high = check.low if check.low is not None else -10.0, check.high if check.high is not None else 10.0
        value = rng.uniform(low, high)
        return value if not (check.low_open and value <= low) else (low + high) / 2
    if isinstance(check, Str) and check.choices:
        return rng.choice(check.choices)
    if isinstance(check, Str) and check.pattern is None:
        return "portrait by a window"[: max(check.min_len, min(check.max_len, rng.randint(1, 20)))]
    return None


def _rule_of(path: tuple):
    cls, check = JobSpec, None
    for part in path:
        if isinstance(part, int):
            continue
        check = next(f for f in dataclasses.fields(cls) if f.name == part).metadata.get("check")
        if isinstance(check, (Tables, Table)):
            cls = check.item.cls if isinstance(check, Tables) else check.cls
    return check


def _spec_value(spec, path: tuple):
    value = spec
    for part in path:
        value = value[part] if isinstance(part, int) else getattr(value, part)
    return value


def test_valid_values_of_every_key_are_accepted_and_reach_the_spec():
    """The random tables above are nearly always refused (on `render`), so they say little about
    accepted input. Here each of 300 jobs sets 1-3 keys to values their own rules accept: the job
    must load with exactly those values in its spec, unless a cross-field rule refuses it (and
    then it names one of the keys that were set)."""
    import random

    rng = random.Random(13)
    candidates = [path for path in KEY_PATHS if _valid_value(_rule_of(path), rng) is not None]
    accepted = refused = 0
    for _ in range(300):
        table = copy.deepcopy(BASE_TABLE)
        chosen = {}
        for path in rng.sample(candidates, rng.randint(1, 3)):
            value = _valid_value(_rule_of(path), rng)
            set_path(table, path, value)
            chosen[path] = value
        with tempfile.TemporaryDirectory() as root:
            result = load_or_refuse(_folder(root, table))
        if isinstance(result, JobError):
            refused += 1
            check_error(result, JOB_CODES, (JOB_FILE,))
            wheres = " ".join(p.where for p in result.problems)
            assert any(path_name(path).split("[")[0].split(".")[0] in wheres for path in chosen), (chosen, wheres)
            continue
        accepted += 1
        for path, value in chosen.items():
            got = _spec_value(result.spec, path)
            got = list(got) if isinstance(got, tuple) else got
            assert got == value or (isinstance(value, float) and got == pytest.approx(value)), (path, value, got)
    print(f"valid-job fuzz: {accepted} accepted, {refused} refused by cross-field rules")
    assert accepted >= 0.6 * 300, (accepted, refused)  # a strategy of valid jobs must mostly make valid jobs
