"""job.toml and config.toml validation: every problem named with its key path, all at once."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engine.config import Settings
from engine.errors import ConfigError, JobError
from engine.job import load_job
from engine.kinds.sections import DEFAULT_PHASES
from engine.schema import to_plain
from tests.harness.jobs import FAST_JOB, make_job

REPO = Path(__file__).resolve().parents[2]
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def _load(folder: Path, defaults: dict | None = None, denylist: tuple[str, ...] = ("nsfw",)):
    return load_job(folder, defaults or {}, EXTENSIONS, denylist)


def _problems(excinfo: pytest.ExceptionInfo[JobError]) -> dict[str, str]:
    return {p.where: p.reason for p in excinfo.value.problems}


def test_minimal_job_gets_defaults_and_folder_name(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, '[[render]]\nprompt = "x"\n')
    job = _load(folder)
    assert job.subject == "alice"
    assert job.spec.subject.photos == ("a.png",)
    assert job.spec.prepare.size == 768 and job.spec.train.phases == DEFAULT_PHASES
    assert job.spec.verify.seed_list == tuple(range(16))
    assert job.spec.render[0].mode == "three_pass"


def test_config_defaults_apply_under_the_job(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, '[prepare]\nsize = 256\n[[render]]\nprompt = "x"\n')
    defaults = {"prepare": {"size": 512, "padding": 1.5}, "verify": {"seeds": [7, 9]}, "render": {"count": 3}}
    job = _load(folder, defaults)
    assert job.spec.prepare.size == 256  # the job wins
    assert job.spec.prepare.padding == 1.5  # the config's default fills in
    assert job.spec.verify.seed_list == (7, 9)
    assert job.spec.render[0].count == 3


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path, astronaut_rgb):
    toml = """
[subject]
name = "../etc"
colour = "red"
[prepare]
size = 10
rotations = "ten"
[train]
rank = 8.5
[[train.phases]]
name = "COARSE"
lr = -1
loss = "l1"
min_steps = 10
max_steps = 5
[verify]
threshold = 3
[[render]]
mode = "one_pass"
"""
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, toml)
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    problems = _problems(excinfo)
    assert excinfo.value.code == "invalid_job"
    expected = {
        "job.toml: subject.name": "is not allowed",
        "job.toml: subject.colour": "unknown key",
        "job.toml: prepare.size": "at least 64",
        "job.toml: prepare.rotations": "expected an array",
        "job.toml: train.rank": "expected an integer",
        "job.toml: train.phases[0].lr": "greater than 0",
        "job.toml: train.phases[0].loss": "must be one of",
        "job.toml: verify.threshold": "at most 2",
        "job.toml: render[0].mode": "must be one of",
        "job.toml: render[0].prompt": "required key is missing",
    }
    for where, reason in expected.items():
        assert where in problems, f"{where} not reported; got {sorted(problems)}"
        assert reason in problems[where], (where, problems[where])


def test_cross_field_problems(tmp_path, astronaut_rgb):
    toml = '[train]\n[[train.phases]]\nname = "A"\nmin_steps = 10\nmax_steps = 5\n[[train.phases]]\nname = "A"\n[verify]\nseeds = [1, 1]\n[[render]]\nprompt = "x"\n'
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, toml)
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    problems = _problems(excinfo)
    assert "above max_steps" in problems["job.toml: train.phases[0].min_steps"]
    assert "used twice" in problems["job.toml: train.phases[1].name"]
    assert "distinct" in problems["job.toml: verify.seeds"]


def test_render_is_required(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, "[prepare]\nsize = 128\n")
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert "required" in _problems(excinfo)["job.toml: render"]


@pytest.mark.parametrize(
    "photos_value, reason",
    [
        ('["../outside.png"]', "points outside the job folder"),
        ('["/etc/passwd"]', "points outside the job folder"),
        ('["missing.png"]', "does not exist"),
        ('["notes.txt"]', "accepted image types"),
    ],
)
def test_photo_paths_are_checked(tmp_path, astronaut_rgb, photos_value, reason):
    (tmp_path / "outside.png").write_bytes(b"x")
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, f"[subject]\nphotos = {photos_value}\n[[render]]\nprompt = \"x\"\n")
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert reason in _problems(excinfo)["job.toml: subject.photos[0]"]


def test_symlink_escaping_the_folder_is_refused(tmp_path, astronaut_rgb):
    outside = make_job(tmp_path / "elsewhere", {"secret.png": astronaut_rgb})
    folder = make_job(tmp_path / "alice", {}, '[[render]]\nprompt = "x"\n')
    (folder / "link.png").symlink_to(outside / "secret.png")
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert "outside the job folder" in _problems(excinfo)["link.png"]


def test_photo_count_limits(tmp_path, astronaut_rgb):
    empty = make_job(tmp_path / "empty", {}, '[[render]]\nprompt = "x"\n')
    with pytest.raises(JobError) as excinfo:
        _load(empty)
    assert "no photo found" in _problems(excinfo)["job.toml: subject.photos"]
    (empty / "IMG_0042.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")  # an iPhone's photo, not an accepted type
    with pytest.raises(JobError) as excinfo:
        _load(empty)
    said = _problems(excinfo)["job.toml: subject.photos"]
    assert "no photo found" in said and "IMG_0042.HEIC" in said and "job.toml" not in said.split("not used")[1]
    many = make_job(tmp_path / "many", {f"{i}.png": astronaut_rgb[:64, :64] for i in range(4)}, '[[render]]\nprompt = "x"\n')
    with pytest.raises(JobError) as excinfo:
        _load(many)
    assert "4 photos found" in _problems(excinfo)["job.toml: subject.photos"]


def test_hidden_and_partial_files_are_not_photos(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb, ".b.png": astronaut_rgb, "~c.png": astronaut_rgb}, '[[render]]\nprompt = "x"\n')
    (folder / "d.png.part").write_bytes(b"partial")
    assert _load(folder).spec.subject.photos == ("a.png",)


def test_unsafe_folder_name_needs_a_subject_name(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "Ali ce (copy)", {"a.png": astronaut_rgb}, '[[render]]\nprompt = "x"\n')
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert "set subject.name" in _problems(excinfo)["job.toml: subject.name"]
    (folder / "job.toml").write_text('[subject]\nname = "alice"\n[[render]]\nprompt = "x"\n')
    assert _load(folder).subject == "alice"


def test_denylisted_prompt_is_refused(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, '[[render]]\nprompt = "an NSFW scene"\n[[render]]\nprompt = "nsfwish is a different word"\n')
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    problems = _problems(excinfo)
    assert "denied term 'nsfw'" in problems["job.toml: render[0].prompt"]
    assert "job.toml: render[1].prompt" not in problems


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'[[render]\nprompt = "x"\n', "not valid TOML"),
        (b"\xff\xfe[render]", "not UTF-8"),
        (b"[a]\n" + b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests too deeply"),
    ],
)
def test_bad_toml_gives_a_clear_error(tmp_path, astronaut_rgb, content, fragment):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    (folder / "job.toml").write_bytes(content)
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert excinfo.value.code == "invalid_job"
    assert fragment in excinfo.value.message and "job.toml" in excinfo.value.message


def test_missing_job_toml(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb})
    (folder / "job.toml").unlink()
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert excinfo.value.code == "missing_job_file"


def test_spec_is_frozen(tmp_path, astronaut_rgb):
    job = _load(make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, FAST_JOB))
    with pytest.raises(AttributeError):
        job.spec.prepare.size = 1  # type: ignore[misc]


def test_repository_config_equals_built_in_defaults():
    """config.toml documents the defaults; the two must not drift apart."""
    loaded = Settings.load(REPO / "config.toml")
    builtin = Settings()
    for section in ("paths", "faces", "input", "background", "embed", "render", "models", "kinds"):
        assert getattr(loaded, section) == getattr(builtin, section), section
    from engine.job import job_default_sections

    for section, values in loaded.job_defaults.items():
        default = to_plain(job_default_sections()[section]())
        for key, value in values.items():
            assert default[key] == value, f"[job.{section}] {key}"


def test_bad_config_names_file_and_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[faces]\ndetect_size = "big"\nbogus = 1\n[job.prepare]\nsize = 1\n[job.nonsense]\n')
    with pytest.raises(ConfigError) as excinfo:
        Settings.load(path)
    wheres = {p.where for p in excinfo.value.problems}
    assert {f"{path}: faces.detect_size", f"{path}: faces.bogus", f"{path}: job.prepare.size", f"{path}: job.nonsense"} <= wheres


def test_daemon_section_is_passed_through(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nanything = 1\n')
    assert Settings.load(path).foreign == {"daemon": {"anything": 1}}
    assert tomllib.loads(path.read_text())  # sanity


def test_convergence_settings_that_could_never_act_are_refused(tmp_path, astronaut_rgb):
    """A window longer than a phase silently disabled the convergence exit; a min_steps shorter
    than the first judged step never acted. Both are refused, naming the key."""
    phases = '[[train.phases]]\nname = "ONLY"\nmin_steps = {min}\nmax_steps = {max}\n'
    cases = {
        "train.plateau_window": ("[train]\nplateau_window = 20\nprobe_every = 10\n", 0, 400, "needs at least 3"),
        "train.phases[0].max_steps": ("[train]\nprobe_every = 10\n", 0, 20, "could only stop at its cap"),
        "train.phases[0].min_steps": ("[train]\nprobe_every = 10\n", 25, 400, "never acts"),
    }
    for key, (train, low, high, said) in cases.items():
        folder = make_job(tmp_path / key.replace("[", "").replace("]", ""), {"a.png": astronaut_rgb},
                          train + phases.format(min=low, max=high) + '[[render]]\nprompt = "x"\n')
        with pytest.raises(JobError) as excinfo:
            _load(folder)
        assert said in _problems(excinfo)[f"job.toml: {key}"], _problems(excinfo)
    # The old rule: a phase shorter than its window could never plateau.
    folder = make_job(tmp_path / "old", {"a.png": astronaut_rgb},
                      '[train]\nconvergence = "no_visible_trend"\nplateau_window = 50\n' + phases.format(min=0, max=40) + '[[render]]\nprompt = "x"\n')
    with pytest.raises(JobError) as excinfo:
        _load(folder)
    assert "could only stop at its cap" in _problems(excinfo)["job.toml: train.phases[0].max_steps"]
    ok = make_job(tmp_path / "ok", {"a.png": astronaut_rgb}, "[train]\nprobe_every = 10\n" + phases.format(min=30, max=400) + '[[render]]\nprompt = "x"\n')
    assert _load(ok).spec.train.phases[0].min_steps == 30
    assert _load(make_job(tmp_path / "defaults", {"a.png": astronaut_rgb}, '[[render]]\nprompt = "x"\n')).spec.train.convergence == "improvement_bound"


def test_the_trigger_is_checked_against_the_denylist_and_is_what_verify_renders(tmp_path, astronaut_rgb):
    from engine.kinds.replicate import verify_prompt

    denied = make_job(tmp_path / "denied", {"a.png": astronaut_rgb}, '[train]\ntrigger = "nsfw person"\n[[render]]\nprompt = "x"\n')
    with pytest.raises(JobError) as excinfo:
        _load(denied)
    assert "denied term 'nsfw'" in _problems(excinfo)["job.toml: train.trigger"]
    custom = _load(make_job(tmp_path / "custom", {"a.png": astronaut_rgb}, '[train]\ntrigger = "zqx woman"\n[[render]]\nprompt = "x"\n'))
    assert verify_prompt(custom.spec) == "a photo of zqx woman, portrait, neutral background"  # not the default's "sks person"
    own = _load(make_job(tmp_path / "own", {"a.png": astronaut_rgb}, '[verify]\nprompt = "studio photo of {trigger}"\n[[render]]\nprompt = "x"\n'))
    assert verify_prompt(own.spec) == "studio photo of sks person"


def test_kind_is_replicate_by_default_and_an_unknown_kind_is_refused_listing_the_known(tmp_path, astronaut_rgb):
    folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, '[[render]]\nprompt = "x"\n')
    assert _load(folder).kind == "replicate"
    for value in ('"retouche"', "3", '["replicate"]'):
        (folder / "job.toml").write_text(f'kind = {value}\n[[render]]\nprompt = "x"\n')
        with pytest.raises(JobError) as excinfo:
            _load(folder)
        assert _problems(excinfo)["job.toml: kind"].endswith("is not a job kind; known kinds: evaluate, replicate, restore, retouch")


def test_a_section_of_another_kind_is_refused_naming_the_key_and_its_kind(tmp_path, astronaut_rgb):
    """The defaults of another kind's sections (config.toml's [job.train]) do not reach a job of
    this kind; a section the job itself gives is refused, with the kind it belongs to."""
    from dataclasses import dataclass

    from engine.kinds.sections import KindSpec
    from engine.kinds import Kind, register_kind, unregister_kind

    @dataclass(frozen=True, kw_only=True)
    class PrepareOnly(KindSpec):
        pass

    register_kind(Kind(name="prepare_only", stages=("prepare",), spec=PrepareOnly))
    try:
        folder = make_job(tmp_path / "alice", {"a.png": astronaut_rgb}, 'kind = "prepare_only"\n[prepare]\nsize = 256\n')
        job = _load(folder, defaults={"train": {"rank": 4}, "prepare": {"padding": 1.5}})
        assert job.kind == "prepare_only" and job.spec.prepare.size == 256 and job.spec.prepare.padding == 1.5
        (folder / "job.toml").write_text('kind = "prepare_only"\n[train]\nrank = 4\n[[render]]\nprompt = "x"\n[colour]\nx = 1\n')
        with pytest.raises(JobError) as excinfo:
            _load(folder)
        problems = _problems(excinfo)
        assert problems["job.toml: train"] == "belongs to kind 'evaluate' and 'replicate', not to this job's kind 'prepare_only' (its sections: subject, prepare)"
        assert problems["job.toml: render"].startswith("belongs to kind 'replicate'")
        assert problems["job.toml: colour"].startswith("unknown key")
    finally:
        unregister_kind("prepare_only")


def test_a_restore_job_names_its_damage_once(tmp_path, astronaut_rgb):
    for job, reason in (('kind = "restore"\n[restore]\nseeds = [0]\n', "name the damage once"),
                        ('kind = "restore"\n[restore]\nmask = "m.png"\npainted = "p.png"\n', "not both"),
                        ('kind = "restore"\n[restore]\nmask = "m.jpg"\n', "is a .png file")):
        folder = make_job(tmp_path / f"case{len(reason)}", {"a.png": astronaut_rgb}, job)
        with pytest.raises(JobError) as excinfo:
            _load(folder)
        assert any(reason in text for text in _problems(excinfo).values()), _problems(excinfo)


def test_a_recorded_spec_is_rebuilt_as_it_was_for_its_kinds_planned_work():
    """Status and the metrics count a stage's planned work with the kind's own function, on the
    spec the job_started line records (plain JSON): rebuilt, it equals the loaded spec, and an
    older record without a later section takes that section's default."""
    from engine.job import parse_job_table
    from engine.kinds import kind_named
    from engine.kinds.replicate import IdentitySpec
    from engine.schema import from_plain

    tables = {
        "replicate": {"render": [{"prompt": "a"}], "verify": {"seeds": [3, 5]}, "subject": {"face_index": {"a.png": 1}}},
        "retouch": {"retouch": {"masks": {"chin": "chin.png"}}},
        "restore": {"restore": {"mask": "mask.png"}},
        "evaluate": {"evaluate": {"group": [{"name": "one", "photos": ["a.png"]}, {"name": "main", "phase": "final"}]}, "mine": {"enabled": True}},
    }
    for name, table in tables.items():
        spec, problems = parse_job_table({"kind": name, **table}, {}, "alice")
        assert spec is not None and not problems, problems
        kind = kind_named(name)
        assert from_plain(kind.spec, to_plain(spec)) == spec, name
        assert all(kind.planned_work(spec, stage) is not None for stage, _ in kind.progress), name
    replicate, _ = parse_job_table({"render": [{"prompt": "a"}], "identity": {"method": "faceid"}}, {}, "alice")
    older = {key: value for key, value in to_plain(replicate).items() if key != "identity"}
    assert from_plain(kind_named("replicate").spec, older).identity == IdentitySpec()
    assert kind_named("replicate").planned_work(replicate, "train") == 0  # FaceID alone trains nothing
    evaluate, _ = parse_job_table({"kind": "evaluate", **tables["evaluate"]}, {}, "alice")
    assert kind_named("evaluate").planned_work(evaluate, "train") == 2 * evaluate.train.max_steps  # the job's LoRA (mining) and group one's
