"""job.toml -> a frozen, validated spec of its kind, with every problem reported at once: the
generic loader. It hardens the reading of the TOML file, merges config.toml's `[job.*]`
defaults (engine.config) under the job's table, dispatches by the job's `kind` to the kind's
spec, checks and folder checks (engine.kinds: each kind's module owns those), screens the
prompts and finds the photos. It names no kind.

Deeper code trusts a loaded spec: ranges, types, photo paths and prompts have all been checked here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import JobError, Problem
from engine.fsutil import TreeLimit, utf8_safe, walk_tree
from engine.kinds import DEFAULT_KIND, KindSpec, all_kinds, kind_named, known_kinds, sections_of_other_kinds
from engine.kinds.sections import MAX_PHOTOS, SAFE_NAME, SAFE_NAME_DOC, inside_folder
from engine.schema import INVALID, Table, Tables, build, key_text, merge_tables

JOB_FILE = "job.toml"
MAX_JOB_FILE_BYTES = 256 * 1024
MAX_NESTING = 32  # tables/arrays inside each other; a real job needs 4


def job_default_sections() -> dict[str, type]:
    """The sections config.toml's [job.<section>] tables may give defaults for (every kind's
    `config_defaults`) -> the dataclass of the section (of each entry, for an array of tables)."""
    sections: dict[str, type] = {}
    for kind in all_kinds():
        fields = {f.name: f for f in dataclasses.fields(kind.spec)}
        for name in kind.config_defaults:
            check = fields[name].metadata["check"]
            sections.setdefault(name, check.item.cls if isinstance(check, Tables) else check.cls)
    return sections


def check_job_defaults(section: str, value: Any, where: str, problems: list[Problem]) -> None:
    """Check config.toml's [job.<section>] (`section` one of job_default_sections()). For an array
    of tables, the table gives defaults for every entry: its keys are checked, none is required."""
    cls = job_default_sections()[section]
    if not _is_array_of_tables(section):
        Table(cls)(value, where, problems)
    elif not isinstance(value, dict):
        problems.append(Problem(where, f"expected a table of defaults for every [[{section}]] entry"))
    else:
        found: list[Problem] = []
        build(cls, value, where, found)
        missing = {f"{where}.{f.name}" for f in dataclasses.fields(cls) if f.name not in value}
        problems += [p for p in found if not (p.where in missing and p.reason == "required key is missing")]


def _is_array_of_tables(section: str, spec: type | None = None) -> bool:
    """Whether `section` of `spec` (of any kind's spec, for None) is an array of tables ([[render]])."""
    specs = [spec] if spec is not None else [kind.spec for kind in all_kinds()]
    return any(isinstance(f.metadata.get("check"), Tables) for cls in specs for f in dataclasses.fields(cls) if f.name == section)


def read_toml(path: Path, where: str, max_bytes: int = MAX_JOB_FILE_BYTES) -> dict[str, Any]:
    """Parse a TOML file, turning every way it can be wrong into a JobError naming the file."""
    try:
        # O_NONBLOCK: a FIFO named job.toml must be refused, not block the daemon forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise JobError("missing_job_file", f"{where} is missing: every job folder needs one") from None
    except OSError as exc:
        raise JobError("invalid_job", f"{where} cannot be read ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise JobError("invalid_job", f"{where} is not a regular file ({_file_kind(info.st_mode)})")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > max_bytes:
            raise JobError("invalid_job", f"{where} is {info.st_size} bytes; at most {max_bytes} are accepted")
        data = handle.read(max_bytes + 1)  # it may still be growing (a copy in progress)
    if len(data) > max_bytes:
        raise JobError("invalid_job", f"{where} is over {max_bytes} bytes; at most {max_bytes} are accepted")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobError("invalid_job", f"{where} is not UTF-8 text (byte {exc.start})") from None
    # tomllib takes time quadratic in the parts of one dotted key (60,000 parts: minutes), and
    # anything past MAX_NESTING parts is refused below anyway: refuse it before parsing.
    if deep := _DEEP_DOTTED_KEY.search(text):
        line = text.count("\n", 0, deep.start()) + 1
        raise JobError("invalid_job", f"{where} line {line}: a dotted key of more than {MAX_NESTING} parts nests too deeply")
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobError("invalid_job", f"{where} is not valid TOML: {exc}") from None
    except RecursionError:
        raise JobError("invalid_job", f"{where} nests too deeply to parse") from None
    # Dotted keys (a.a.a... = 1) nest without recursing in the parser, but every later
    # walk (validation, repr in messages) would recurse: refuse them here.
    if _nesting_depth(table, MAX_NESTING) > MAX_NESTING:
        raise JobError("invalid_job", f"{where} nests tables or arrays more than {MAX_NESTING} levels deep")
    return table


# One TOML key part (bare, "basic" or 'literal'), and a chain of more than MAX_NESTING of them
# joined by dots. Possessive quantifiers and the look-behind keep the search linear in the text.
# It may also match inside a string value (33 dot-joined words): no prompt looks like that.
_KEY_PART = r"""(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
_DEEP_DOTTED_KEY = re.compile(rf"(?<![A-Za-z0-9_-]){_KEY_PART}(?:[ \t]*+\.[ \t]*+{_KEY_PART}){{{MAX_NESTING},}}+")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return kind
    return "not a plain file"


def _nesting_depth(value: Any, limit: int) -> int:
    """How deep tables/arrays nest (a scalar is 0), counted without recursion; stops past `limit`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def parse_job_table(
    table: dict[str, Any],
    defaults: dict[str, Any],
    folder_name: str,
    where: str = JOB_FILE,
) -> tuple[KindSpec | None, list[Problem]]:
    """Merge config defaults under the job's table and validate it as its kind's spec (engine.kinds);
    returns (spec, problems). Defaults apply to the kind's own sections only; a section of
    another kind is refused, naming it and its kind."""
    problems: list[Problem] = []
    name = table.get("kind", DEFAULT_KIND)
    if not isinstance(name, str) or name not in known_kinds():
        return None, [Problem(f"{where}: kind", f"{name!r:.80} is not a job kind; known kinds: {', '.join(known_kinds())}")]
    kind = kind_named(name)
    foreign = sections_of_other_kinds(kind)
    for key in table:
        if key in foreign:
            owners = " and ".join(repr(owner) for owner in foreign[key])
            problems.append(Problem(f"{where}: {key_text(key)}", f"belongs to kind {owners}, not to this job's kind {kind.name!r} "
                                    f"(its sections: {', '.join(kind.sections)})"))
    table = {key: value for key, value in table.items() if key not in foreign}
    # A default table applies to the kind's section of that name; for an array of tables ([[render]]), to each entry.
    own = {k: v for k, v in defaults.items() if k in kind.sections}
    per_entry = {k for k in own if _is_array_of_tables(k, kind.spec)}
    merged = merge_tables({k: v for k, v in own.items() if k not in per_entry}, table)
    for section in sorted(per_entry):
        if isinstance(merged.get(section), list):
            merged[section] = [merge_tables(own[section], entry) if isinstance(entry, dict) else entry for entry in merged[section]]
    spec_problems: list[Problem] = []
    spec = build(kind.spec, merged, "", spec_problems)
    problems += [Problem(f"{where}: {p.where}", p.reason) for p in spec_problems]
    if spec is INVALID:
        return None, problems
    if not spec.subject.name and not re.fullmatch(SAFE_NAME, folder_name):
        problems.append(
            Problem(f"{where}: subject.name", f"the folder name {folder_name!r:.80} is not a safe subject name; set subject.name ({SAFE_NAME_DOC})")
        )
    problems += kind.checks(spec, where)
    return spec, problems


def check_prompts(spec: KindSpec, denylist: tuple[str, ...], where: str = JOB_FILE) -> list[Problem]:
    """Refuse prompts holding a denylisted term (whole words, any case): every text its kind says
    reaches a pipeline as a prompt (engine.kinds.Kind.prompts)."""
    problems: list[Problem] = []
    for key, prompt in kind_named(spec.kind).prompts(spec):
        for term in denylist:
            if re.search(rf"(?<!\w){re.escape(term)}(?!\w)", prompt, flags=re.IGNORECASE):
                problems.append(Problem(f"{where}: {key}", f"contains the denied term {term!r} (config render.denylist)"))
    return problems


def resolve_photos(folder: Path, spec: KindSpec, extensions: tuple[str, ...], where: str = JOB_FILE) -> tuple[tuple[Path, ...], list[Problem]]:
    """The photo files of a job: listed in subject.photos, or every image in the folder but the
    files its kind's sections name (a mask is never taken for a photo).

    Every path must stay inside the folder after resolving symbolic links; the count must
    be 1 to the kind's `max_photos` (MAX_PHOTOS at most).
    """
    kind = kind_named(spec.kind)
    most, not_photos = kind.max_photos, set(kind.named_files(spec))
    problems: list[Problem] = []
    root = folder.resolve()
    photos: list[Path] = []
    if spec.subject.photos:
        for i, name in enumerate(spec.subject.photos):
            key = f"{where}: subject.photos[{i}]"
            candidate = folder / name
            if Path(name).is_absolute() or not inside_folder(candidate, root):
                problems.append(Problem(key, f"{name!r} points outside the job folder"))
                continue
            if not candidate.is_file():
                problems.append(Problem(key, f"{name!r} does not exist in the job folder" if not candidate.exists() else f"{name!r} is not a regular file"))
                continue
            if candidate.suffix.lower() not in extensions:
                problems.append(Problem(key, f"{name!r} is not one of the accepted image types ({', '.join(extensions)})"))
                continue
            photos.append(candidate)
        if len(set(p.name for p in photos)) != len(photos):
            problems.append(Problem(f"{where}: subject.photos", "the same photo is listed twice"))
    ignored: list[str] = []  # files that are not of an accepted type: named when no photo is found
    if not spec.subject.photos:
        for candidate in sorted(folder.iterdir()):
            if is_hidden_name(candidate.name) or candidate.suffix.lower() not in extensions:
                if not is_hidden_name(candidate.name) and candidate.name != JOB_FILE and candidate.is_file():
                    ignored.append(utf8_safe(candidate.name))
                continue
            if not inside_folder(candidate, root):
                continue  # reported by links_leaving(), as load_job calls it
            if utf8_safe(candidate.name) != candidate.name:
                problems.append(Problem(utf8_safe(candidate.name), "the file name is not UTF-8 text (an old encoding?); rename the file"))
                continue
            if candidate.is_file() and candidate.name not in not_photos:
                photos.append(candidate)
    if not problems:
        if not photos:
            skipped = (f"; not used, as their type is not accepted: {', '.join(ignored[:10])}" + (f" and {len(ignored) - 10} more" if len(ignored) > 10 else "")
                       + " (convert them, e.g. HEIC to JPEG or PNG)") if ignored else ""
            problems.append(Problem(f"{where}: subject.photos", f"no photo found: put {_photo_count(most)} ({', '.join(extensions)}) in the job folder{skipped}"))
        elif len(photos) > most:
            problems.append(Problem(f"{where}: subject.photos", f"{len(photos)} photos found; a {kind.name} job takes {_photo_count(most)} "
                                    "(list them in subject.photos)"))
    known = {p.relative_to(folder).as_posix() for p in photos}
    for name, _ in spec.subject.face_index:
        if name not in known:
            problems.append(Problem(f"{where}: subject.face_index.{key_text(name)}", "names no photo of this job"))
    return tuple(photos), problems


def _photo_count(most: int) -> str:
    return "one image" if most == 1 else f"1 to {most} images"


MAX_FOLDER_ENTRIES = 10_000  # files and folders in a job folder; a job is 1 to MAX_PHOTOS photos and job.toml
MAX_FOLDER_DEPTH = 16  # levels of sub-folders in a job folder (notes, raw files...); deeper is refused as too_deep


def links_leaving(folder: Path) -> list[Problem]:
    """Every symbolic link under `folder` whose target is outside it (or cannot be resolved).

    Such a job is refused as a whole, used link or not: its inputs would not be what the lab
    dropped, the failed/ copy and the audit could not hold them, and a photo linked to another
    folder may change under a running job. Links that stay inside the folder are fine."""
    root = folder.resolve()
    problems: list[Problem] = []
    try:
        links = [entry for entry in walk_tree(folder, max_entries=MAX_FOLDER_ENTRIES) if entry.kind == "link"]
    except TreeLimit:
        return [Problem(utf8_safe(folder.name), f"holds more than {MAX_FOLDER_ENTRIES} files and folders; a job folder holds 1 to {MAX_PHOTOS} photos and {JOB_FILE}")]
    for entry in links:
        path = Path(entry.path)
        try:
            if path.resolve().is_relative_to(root):
                continue
            target = utf8_safe(os.readlink(path))
            problems.append(Problem(entry.rel, f"is a link to {target!r:.120}, outside the job folder; copy the file in instead"))
        except (OSError, RuntimeError):  # a loop of links
            problems.append(Problem(entry.rel, "is a link that cannot be followed (a loop of links?); copy the file in instead"))
    return problems


def is_hidden_name(name: str) -> bool:
    """Names that copy tools use while a transfer is in progress, and hidden files."""
    return name.startswith(".") or is_temporary_name(name)


def is_temporary_name(name: str) -> bool:
    """The names copy tools give a file or folder while it is being transferred."""
    return name.startswith("~") or name.endswith((".tmp", ".part", ".partial", ".crdownload"))


@dataclass(frozen=True)
class LoadedJob:
    """A validated job: its spec with the subject name and photo list filled in."""

    folder: Path
    spec: Any  # its kind's spec (a subclass of KindSpec, engine.kinds.Kind.spec)
    photos: tuple[Path, ...]

    @property
    def subject(self) -> str:
        return self.spec.subject.name

    @property
    def kind(self) -> str:
        return self.spec.kind


def load_job(folder: Path, job_defaults: dict[str, Any], extensions: tuple[str, ...], denylist: tuple[str, ...],
             folder_name: str | None = None) -> LoadedJob:
    """Read and validate `folder/job.toml`. Raises one JobError listing every problem.

    `folder_name` is the name the folder was dropped under (the subject's default), when
    `folder` is the job's own copy of it (engine.jobfolder.INPUTS_DIR)."""
    folder = Path(folder)
    folder_name = folder.name if folder_name is None else folder_name
    if not folder.is_dir():
        raise JobError("invalid_job", f"{folder} is not a folder")
    link_problems = links_leaving(folder)
    if any(p.where == JOB_FILE for p in link_problems):  # never read a file from outside the job
        raise JobError("invalid_job", f"{JOB_FILE} is a link to a file outside the job folder; copy the file in instead", problems=tuple(link_problems))
    try:
        table = read_toml(folder / JOB_FILE, JOB_FILE)
    except JobError as error:
        if not link_problems:
            raise
        problems = link_problems + [Problem(JOB_FILE, error.message)]
        raise JobError(error.code, f"the job folder has {len(problems)} problems: " + "; ".join(map(str, problems[:3])), problems=tuple(problems)) from None
    spec, problems = parse_job_table(table, job_defaults, folder_name)
    problems = link_problems + problems
    if utf8_safe(folder_name) != folder_name:
        problems.append(Problem(utf8_safe(folder_name), "the folder name is not UTF-8 text (an old encoding?); rename the folder"))
    photos: tuple[Path, ...] = ()
    if spec is not None:
        problems += check_prompts(spec, denylist)
        photos, photo_problems = resolve_photos(folder, spec, extensions)
        problems += photo_problems
        if not photo_problems:
            problems += kind_named(spec.kind).folder_checks(spec, folder, tuple(p.relative_to(folder).as_posix() for p in photos), JOB_FILE)
    if problems or spec is None:
        raise JobError(
            "invalid_job",
            f"{JOB_FILE} has {len(problems)} problem{'s' * (len(problems) != 1)}: " + "; ".join(map(str, problems[:3])) + (" ..." if len(problems) > 3 else ""),
            problems=tuple(problems),
        )
    name = spec.subject.name or folder_name
    photo_names = tuple(p.relative_to(folder).as_posix() for p in photos)
    spec = dataclasses.replace(spec, subject=dataclasses.replace(spec.subject, name=name, photos=photo_names))
    return LoadedJob(folder=folder, spec=spec, photos=photos)


def safe_subject_name(folder_name: str) -> str:
    """A subject name for paths when the job itself could not be read (failed/<name>/...)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", folder_name).lstrip("._-")[:64]
    return cleaned or "unnamed"
