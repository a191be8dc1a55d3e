"""What a submission stages as the job's ``working_dir``: the recipe and its local inputs (files, folders, globs,
model folders), less what must never travel. Secrets stay behind: what the inputs' .gitignore/.rayignore files
exclude and, whatever they say, NEVER_STAGED; a private key under any name stops the submission. The plan is made
before anything is copied, so ``submit --dry-run`` can print it and a refusal costs nothing."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable

import pyarrow.fs as pafs
import yaml
from pathspec import PathSpec

from ..pipelines.paths import glob_base, glob_matches, is_glob, is_uri
from ..pipelines.recipe import Recipe, travelling_recipe

# The dashboard refuses request bodies above this (ray_constants.DASHBOARD_CLIENT_MAX_SIZE): the zipped working_dir.
UPLOAD_LIMIT_BYTES = 100 * 1024**2


class StagingRefused(ValueError):
    """An input must not travel (a secret, a private key, a folder left empty); found before anything is sent."""


class TooLargeToUpload(RuntimeError):
    """The staged inputs are more than the Ray Jobs API takes."""


# Never staged, whatever a folder's .gitignore or .rayignore says (gitignore patterns): a working_dir is unpacked on
# every node of the cluster, readable by every job there, and kept in the cluster's storage, so these files would
# hand out credentials: env files, git remotes with tokens, Ray's auth token, SSH and TLS keys, cloud and package
# registry logins. (ssh keys by their key types, not 'id_*': that would also drop data such as id_map.jsonl.)
NEVER_STAGED = (
    ".env*", ".git/", ".ray/", ".ssh/", ".aws/", ".azure/", "**/.config/gcloud/", ".kube/", "**/.docker/config.json",
    "*.pem", "*.key", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", ".netrc", "*credentials*", ".pypirc",
    ".npmrc",
)
# Ray's packaging of a working_dir honours these files: copied along, they could leave inputs out of the upload.
# Staging applies them itself and leaves them behind.
IGNORE_FILES = (".gitignore", ".rayignore")
IGNORE_FILE_REASON = "ignore file (staging applies it; Ray's packaging would too)"
# Ray's own switch (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1: .gitignore files are not honoured; .rayignore files are).
IGNORE_GITIGNORE_ENV = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"
# Every PEM private key (RSA, EC, DSA, OPENSSH, ENCRYPTED, PKCS#8's plain PRIVATE KEY) has this line; it comes
# first in a key file, so the first few KB of each file are enough (staging stays fast on big corpora).
PRIVATE_KEY_LINE = re.compile(rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
KEY_SCAN_BYTES = 8192

_NEVER_STAGED_SPECS = [(pattern, PathSpec.from_lines("gitignore", [pattern])) for pattern in NEVER_STAGED]


@dataclass
class StagedFile:
    source: str
    target: str  # relative to the staging folder
    size: int
    input: str  # the recipe's path it belongs to


@dataclass
class LeftOut:
    target: str  # where it would have gone, relative to the staging folder; a folder's ends in '/'
    reason: str
    files: int = 1


@dataclass
class StagedInput:
    slot: str  # the path that names it in the staging folder, e.g. inputs/0/corpus
    fields: list[str]  # the recipe's fields that name it


@dataclass
class StagingPlan:
    """What a submission's working_dir would hold, worked out before anything is copied."""
    recipe_text: str = ""  # recipe.yaml, its local paths rewritten to the staged copies
    inputs: dict[str, StagedInput] = field(default_factory=dict)  # by the recipe's path
    files: list[StagedFile] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why staging cannot go ahead, one line each
    notes: list[str] = field(default_factory=list)

    def total_bytes(self) -> int:
        return len(self.recipe_text.encode()) + sum(f.size for f in self.files)


def stage(recipe: Recipe, into: str, echo: Callable[[str], None] = print, plan: StagingPlan | None = None) -> str:
    """Write ``into/recipe.yaml`` with every local input copied under ``into/inputs`` (less what ``plan_staging``
    leaves out; ``plan``: one made already); returns the recipe's name there. Nothing is copied when a check fails."""
    plan = plan or plan_staging(recipe)
    check_plan(plan)
    for note in plan.notes:
        echo(note)
    if plan.left_out:
        left_out = _files(sum(o.files for o in plan.left_out))
        echo(f"left out {left_out} of the inputs (secrets, ignore files and what they exclude): domainsynth submit "
             f"--dry-run lists them")
    for staged in plan.files:
        target = os.path.join(into, staged.target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(staged.source, target)
    with open(os.path.join(into, "recipe.yaml"), "w", encoding="utf-8") as f:
        f.write(plan.recipe_text)
    return "recipe.yaml"


def plan_staging(recipe: Recipe) -> StagingPlan:
    """Which files of the recipe's local inputs (files, folders, globs, model folders) would travel and where, which
    are left out and why (NEVER_STAGED, the inputs' .gitignore/.rayignore files) and which stop the submission (a
    private key, an input that is itself a secret, a folder with nothing left). ``run_dir`` stays where it is (a
    URI, or a local path the cluster's machines write to)."""
    plan = StagingPlan()

    def place(field_name: str, path: str) -> str:
        if path not in plan.inputs:
            plan.inputs[path] = StagedInput(_plan_input(plan, path, f"inputs/{len(plan.inputs)}"), [])
        plan.inputs[path].fields.append(field_name)
        return "./" + plan.inputs[path].slot

    raw = travelling_recipe(recipe, place)
    if recipe.run_dir and not is_uri(recipe.run_dir):
        raw["run_dir"] = os.path.abspath(recipe.run_dir)
        plan.notes.append(f"run_dir {raw['run_dir']} is a local path: the job writes it on the cluster's machines "
                          f"(right for a local cluster or a volume they share; use s3://... or gs://... for a "
                          f"remote one)")
    plan.recipe_text = yaml.safe_dump(raw, sort_keys=False)
    return plan


def check_plan(plan: StagingPlan) -> None:
    """Raise when the plan must not be sent: a refusal (StagingRefused) or more than the Jobs API takes."""
    if plan.refused:
        raise StagingRefused("staging refused, nothing was sent:\n  " + "\n  ".join(plan.refused))
    total = sum(staged.size for staged in plan.files)  # recipe.yaml's few hundred bytes aside
    if total > UPLOAD_LIMIT_BYTES:
        sizes: dict[str, int] = {}
        for staged in plan.files:
            sizes[staged.input] = sizes.get(staged.input, 0) + staged.size
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise TooLargeToUpload(f"the recipe's local inputs come to {_size(total)}; the Ray Jobs API uploads at most "
                          f"{_size(UPLOAD_LIMIT_BYTES)}: put the big ones ("
                          + ", ".join(f"{p} {_size(sizes[p])}" for p in largest) + ") on s3:// or gs://")


def _plan_input(plan: StagingPlan, path: str, slot: str) -> str:
    """Add a file, a folder or a glob's matches (as the stages expand it) to the plan under ``slot``; the path,
    relative to the staging folder, that names the same input there."""
    if is_glob(path):
        base = glob_base(path)
        rules = IgnoreRules(base)
        for match in glob_matches(pafs.LocalFileSystem(), path):
            rel = os.path.relpath(match, base)
            _plan_file(plan, path, match, f"{slot}/{rel}", rules.file_left_out(rel))
        _refuse_if_emptied(plan, path, slot)
        return f"{slot}/{os.path.relpath(path, base)}"
    name = os.path.basename(path.rstrip("/"))
    target = f"{slot}/{name}"
    named_secret = _never_staged(name + "/" if os.path.isdir(path) else name)
    if named_secret:
        plan.refused.append(f"{path}: the recipe names it and it is never staged ({named_secret})")
    elif os.path.isdir(path):
        for rel, reason, count in _walk_folder(path, IgnoreRules(path)):
            if rel.endswith("/"):
                plan.left_out.append(LeftOut(f"{target}/{rel}", reason, count))
            else:
                _plan_file(plan, path, os.path.join(path, rel), f"{target}/{rel}", reason)
        _refuse_if_emptied(plan, path, target)
    else:
        _plan_file(plan, path, path, target, None)
    return target


def _plan_file(plan: StagingPlan, input_path: str, source: str, target: str, reason: str | None) -> None:
    if not reason and not os.path.isfile(source):  # reading a pipe would hang; copying one fails
        reason = "not a regular file (a pipe, a socket or a broken link)"
    if reason:
        plan.left_out.append(LeftOut(target, reason))
    elif holds_private_key(source):
        named, fix = (("the recipe names it and it", "take it out of the recipe") if source == input_path else
                      ("it", "move it out of the input, or list it in a .rayignore there"))
        plan.refused.append(f"{source}: {named} holds a private key (a '-----BEGIN ... PRIVATE KEY-----' line); {fix}")
    else:
        plan.files.append(StagedFile(source, target, os.path.getsize(source), input_path))


def _refuse_if_emptied(plan: StagingPlan, path: str, target: str) -> None:
    """A folder whose every file is left out would reach the job empty: say so now, not on the cluster."""
    inside = target.rstrip("/") + "/"
    if any(f.target.startswith(inside) for f in plan.files):
        return
    reasons = sorted({o.reason for o in plan.left_out if o.target.startswith(inside)} - {IGNORE_FILE_REASON})
    if not reasons:
        return
    hint = ""
    if any(reason.startswith(".gitignore in") for reason in reasons):
        hint = (f"; a data folder kept out of git can go with {IGNORE_GITIGNORE_ENV}=1 (Ray's switch: .gitignore "
                f"files are not honoured, .rayignore files and the built-in list still are)")
    plan.refused.append(f"{path}: every file of it is left out ({'; '.join(reasons)}){hint}")


def holds_private_key(path: str) -> bool:
    with open(path, "rb") as f:
        return PRIVATE_KEY_LINE.search(f.read(KEY_SCAN_BYTES)) is not None


def _never_staged(path: str) -> str | None:
    """'built-in: PATTERN' when a path (a folder's ends in '/') is on NEVER_STAGED."""
    for pattern, spec in _NEVER_STAGED_SPECS:
        if spec.match_file(path):
            return f"built-in: {pattern}"
    return None


class IgnoreRules:
    """What staging leaves out of one input folder: the ignore files themselves, NEVER_STAGED, and what the
    .gitignore and .rayignore of the folder, and of each folder on the way down to a file, exclude (each file's
    patterns matched against the path relative to its own folder, as git reads them; pathspec does the matching).
    A path that any of them excludes is left out, as Ray's packaging does: a deeper file's '!' does not bring back
    what a higher one excluded."""

    def __init__(self, root: str):
        self.root = root
        self.names = IGNORE_FILES if os.environ.get(IGNORE_GITIGNORE_ENV) != "1" else (".rayignore",)
        self._specs: dict[str, list[tuple[str, PathSpec]]] = {}

    def left_out(self, rel: str, is_dir: bool) -> str | None:
        """Why ``rel`` (relative to the root) is left out, or None; its parent folders are not looked at."""
        if not is_dir and os.path.basename(rel) in IGNORE_FILES:
            return IGNORE_FILE_REASON
        path = rel + "/" if is_dir else rel
        reason = _never_staged(path)
        if reason:
            return reason
        parts = rel.split("/")
        for depth in range(len(parts)):
            folder = "/".join(parts[:depth])
            below = "/".join(parts[depth:]) + ("/" if is_dir else "")
            for name, spec in self._specs_in(folder):
                if spec.match_file(below):
                    return f"{name} in {os.path.join(self.root, folder).rstrip('/')}"
        return None

    def file_left_out(self, rel: str) -> str | None:
        """``left_out`` for a file, its parent folders included (a glob's matches come without a walk)."""
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            reason = self.left_out("/".join(parts[:depth]), is_dir=True)
            if reason:
                return reason
        return self.left_out(rel, is_dir=False)

    def _specs_in(self, folder: str) -> list[tuple[str, PathSpec]]:
        if folder not in self._specs:
            self._specs[folder] = []
            for name in self.names:
                ignore_file = os.path.join(self.root, folder, name)
                if os.path.isfile(ignore_file):
                    with open(ignore_file, encoding="utf-8", errors="replace") as f:
                        self._specs[folder].append((name, PathSpec.from_lines("gitignore", f.read().splitlines())))
        return self._specs[folder]


def _walk_folder(root: str, rules: IgnoreRules):
    """(path relative to root, why it is left out or None, how many files) for each file under root, sorted; a
    folder left out is one entry, its path ending in '/'. Links are followed, as copying them would."""
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subfolders[:] = []
            continue
        seen.add(real)
        rel_folder = os.path.relpath(folder, root)
        prefix = "" if rel_folder == "." else rel_folder + "/"
        subfolders.sort()
        for name in list(subfolders):
            reason = rules.left_out(prefix + name, is_dir=True)
            if reason:
                subfolders.remove(name)
                yield prefix + name + "/", reason, sum(len(f) for _, _, f in os.walk(os.path.join(folder, name)))
        for name in sorted(files):
            yield prefix + name, rules.left_out(prefix + name, is_dir=False), 1


def describe(plan: StagingPlan) -> str:
    """The --dry-run listing: every file that would be staged with its size, the total, what is left out and why,
    and what would stop the submission."""
    rows = [("recipe.yaml", len(plan.recipe_text.encode()))] + [(f.target, f.size) for f in plan.files]
    width = max(len(_size(size)) for _, size in rows)
    lines = ["Dry run: nothing is sent and no cluster is contacted.", "Inputs:"]
    lines += [f"  {staged.slot}  <-  {path} ({', '.join(staged.fields)})" for path, staged in plan.inputs.items()]
    lines += ["Would stage (the job's working_dir):"]
    lines += [f"  {_size(size).rjust(width)}  {target}" for target, size in rows]
    lines += [f"  {_files(len(rows))}, {_size(plan.total_bytes())} (the Ray Jobs API takes at most "
              f"{_size(UPLOAD_LIMIT_BYTES)})"]
    if plan.left_out:
        shown = [(o.target + (f" ({_files(o.files)})" if o.target.endswith("/") else ""), o.reason)
                 for o in plan.left_out]
        name_width = max(len(name) for name, _ in shown)
        lines += [f"Left out ({_files(sum(o.files for o in plan.left_out))}):"]
        lines += [f"  {name.ljust(name_width)}  {reason}" for name, reason in shown]
    if plan.refused:
        lines += ["Refused (submit would stop here):"] + [f"  {line}" for line in plan.refused]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _size(n: int) -> str:
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1024**power:
            return f"{n / 1024**power:,.1f} {unit}"
    return f"{n:,} B"
