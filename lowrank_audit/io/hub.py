"""Find a Hugging Face hub model in the local cache, offline: ``org/name`` -> its snapshot folder.

The cache is the one ``huggingface_hub`` fills (``hf download``, ``from_pretrained``); its layout is
documented and stable (https://huggingface.co/docs/huggingface_hub/guides/manage-cache)::

    <cache>/models--<org>--<name>/          # "models--gpt2" for an id without an org
        blobs/<sha256 or git sha1>          # the file contents, one per distinct file
        refs/main                           # a branch or tag name -> a file holding its 40-hex commit
        refs/refs/pr/1                      # revision "refs/pr/1" (a pull request) nests like any name
        snapshots/<commit>/<files>          # relative symlinks into ../../blobs (copies on Windows)

:func:`resolve` returns ``snapshots/<commit>``, a Hugging Face model folder that
:func:`lowrank_audit.io.checkpoint.open_checkpoint` reads as it is.

Offline guarantee: this module only reads the file system. It never downloads, never opens a
socket and never imports ``huggingface_hub`` (an optional extra here); a model or revision that
is not cached is a :class:`~lowrank_audit.errors.CheckpointError` telling the user how to fetch it.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from lowrank_audit.errors import CheckpointError

# huggingface_hub's validate_repo_id, restricted to ASCII: 1-96 characters of [A-Za-z0-9._-],
# neither starting nor ending with '.' or '-'; "--" and ".." are refused separately because
# "--" would make folder names collide ("a--b/c" and "a/b--c" are both models--a--b--c).
_COMPONENT = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
# Names that are files this tool reads, never model ids; Qwen/Qwen2.5-0.5B must still pass.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz", ".parquet", ".json")
_FULL_HASH = re.compile(r"[0-9a-f]{40}")
_SHORT_HASH = re.compile(r"[0-9a-f]{7,39}")
# Leftovers huggingface_hub ignores in refs/ and snapshots/ (macOS metadata; its atomic ref writes
# go through "<ref>.<8 hex>.tmp" and may be left behind by a killed process).
_IGNORED = {".DS_Store"}
_TMP_REF = re.compile(r".*\.[0-9a-f]{8}\.tmp")
_MAX_REF_BYTES = 128  # a commit hash is 40; anything much longer is not one, whatever it holds


def _is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) <= 2 and all(_COMPONENT.fullmatch(part) for part in parts) and "--" not in text and ".." not in text
    )


def looks_like_hub_id(text: str) -> bool:
    """Whether a command-line argument names a hub model (``org/name`` or ``name``) rather than a file.

    True for one or two ``/``-separated components of ``[A-Za-z0-9._-]`` that the hub would accept
    (no leading ``/``, ``.`` or ``~``; no ``--`` or ``..``; at most 96 characters each), whose last
    component does not end like a checkpoint or report file (``.safetensors``, ``.bin``, ``.pt``,
    ``.pth``, ``.npz``, ``.parquet``, ``.json``), and that is **not** an existing local path:
    anything at that path, relative to the current folder, wins over the hub, so a local folder
    named ``gpt2`` is never shadowed. This function handles that check; callers need not.

    Example:
        >>> looks_like_hub_id("Qwen/Qwen2.5-0.5B"), looks_like_hub_id("out/model.safetensors")
        (True, False)
    """
    if not _is_repo_id(text) or text.lower().endswith(_FILE_SUFFIXES):
        return False
    return not os.path.lexists(text)  # lexists: a dangling local symlink is still the user's file


def _env_path(name: str) -> Path | None:
    # Empty counts as unset: huggingface_hub would take "" as the current folder, never what is meant.
    value = os.environ.get(name)
    return Path(os.path.expandvars(os.path.expanduser(value))) if value else None


def cache_root() -> Path:
    """The hub cache folder, chosen as ``huggingface_hub.constants.HF_HUB_CACHE`` chooses it.

    In order: ``HF_HUB_CACHE``; the legacy ``HUGGINGFACE_HUB_CACHE``; ``$HF_HOME/hub``;
    ``$XDG_CACHE_HOME/huggingface/hub``; ``~/.cache/huggingface/hub``. ``~`` and ``$VARS`` in the
    values are expanded. Unlike huggingface_hub, which reads them once at import, the variables are
    read on every call, and an empty one is treated as unset. The folder need not exist.
    """
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if (path := _env_path(name)) is not None:
            return path
    if (home := _env_path("HF_HOME")) is not None:
        return home / "hub"
    xdg = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return xdg / "huggingface" / "hub"


def _fetch_hint(repo_id: str, revision: str | None, verb: str = "fetch") -> str:
    command = f"hf download {repo_id}" + (f" --revision {shlex.quote(revision)}" if revision else "")
    return f"lowrank-audit never downloads: {verb} it with `{command}` first"


def _valid_revision(revision: str) -> bool:
    # Branch and tag names may nest ("refs/pr/1") but must stay inside refs/: no absolute path,
    # no empty, "." or ".." component, no backslash (a separator on Windows), no control character.
    parts = revision.split("/")
    return (
        0 < len(revision) <= 255
        and all(part not in ("", ".", "..") for part in parts)
        and "\\" not in revision
        and all(ord(c) >= 32 and c != "\x7f" for c in revision)
    )


def _ref_names(refs: Path) -> list[str]:
    names = []
    # os.walk does not descend into symlinked folders: listing never leaves the model's folder.
    for folder, _, files in os.walk(refs):
        for file in files:
            if file not in _IGNORED and not _TMP_REF.fullmatch(file):
                names.append((Path(folder) / file).relative_to(refs).as_posix())
    return sorted(names)


def _snapshot_commits(snapshots: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(snapshots) if _FULL_HASH.fullmatch(e.name) and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _short(commits: list[str]) -> list[str]:
    # As git abbreviates: 7 hex digits, more while two known commits would read the same.
    n = 7
    while len({c[:n] for c in commits}) < len(commits):
        n += 1
    return [c[:n] for c in commits]


def _read_ref(repo_id: str, model: Path, ref: Path, revision: str, asked: str | None, root: Path) -> str:
    where = f"model {repo_id!r}: refs/{revision} in the cache at {root}"
    # Read the ref as text and validate it; never follow it out of the model's refs/ folder.
    target = ref.resolve()
    if not target.is_relative_to(model.resolve() / "refs"):
        raise CheckpointError(f"{where} leads outside {model.name}/refs (to {target}); refusing to read it")
    try:
        with open(target, "rb") as file:
            raw = file.read(_MAX_REF_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc.strerror or exc}") from exc
    # huggingface_hub writes the bare hash; trailing whitespace from a hand edit is forgiven.
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _MAX_REF_BYTES or not _FULL_HASH.fullmatch(text):
        shown = text[:48] + ("..." if len(text) > 48 else "")
        raise CheckpointError(
            f"{where} holds {shown!r}, not a 40-hex commit hash; " + _fetch_hint(repo_id, asked, "refetch")
        )
    return text


def resolve(repo_id: str, revision: str | None = None, *, cache: Path | str | None = None) -> Path:
    """The cached snapshot folder of a hub model at a revision, without any network access.

    Args:
        repo_id: ``org/name`` or ``name`` (``gpt2`` is cached as ``models--gpt2``).
        revision: A branch or tag (``main``, ``v1``, ``refs/pr/1``), looked up in ``refs/<revision>``,
            which must hold a 40-hex commit hash; else a full commit hash, or a prefix of at least 7
            hex digits matching exactly one folder in ``snapshots/``. ``None`` means ``main``. Refs
            win over hashes, as in huggingface_hub.
        cache: The hub cache folder; :func:`cache_root` when ``None``.

    Returns:
        ``<cache>/models--<org>--<name>/snapshots/<commit>``, not symlink-resolved (its files are
        symlinks into ``blobs/``, which readers follow).

    Raises:
        CheckpointError: One line naming the cache folder and what is missing: an invalid model id
            or revision name, a model not in the cache, an unknown revision (the known ones are
            listed), an ambiguous hash prefix, a ref that does not hold a commit hash or leads
            outside the model's ``refs/`` folder, or a snapshot folder that is missing.

    Example:
        >>> resolve("org/name", "v1", cache=cache)  # doctest: +SKIP
        PosixPath('.../models--org--name/snapshots/1a2b3c4d...')
    """
    if not _is_repo_id(repo_id):
        raise CheckpointError(
            f"{repo_id!r} is not a Hugging Face model id (name or org/name, letters, digits, '.', '_' and '-')"
        )
    root = Path(cache) if cache is not None else cache_root()
    asked = revision  # for the fetch hint: only a revision the user gave is repeated to them
    revision = "main" if revision is None else revision
    if not _valid_revision(revision):
        raise CheckpointError(f"model {repo_id!r}: {revision!r} is not a revision name (a branch, tag or commit hash)")
    folder = "models--" + repo_id.replace("/", "--")
    model = root / folder
    if not model.is_dir():
        raise CheckpointError(
            f"model {repo_id!r} is not in the Hugging Face cache at {root} (looked for {folder}); "
            + _fetch_hint(repo_id, asked)
        )
    snapshots = model / "snapshots"
    commits = _snapshot_commits(snapshots)
    ref = model / "refs" / revision
    source = f"refs/{revision}"
    if ref.is_file():
        commit = _read_ref(repo_id, model, ref, revision, asked, root)
    elif _FULL_HASH.fullmatch(revision.lower()):
        commit, source = revision.lower(), "commit"
    elif _SHORT_HASH.fullmatch(revision.lower()) and (
        matches := [c for c in commits if c.startswith(revision.lower())]
    ):
        if len(matches) > 1:
            shown = ", ".join(matches[:4]) + (f" and {len(matches) - 4} more" if len(matches) > 4 else "")
            raise CheckpointError(
                f"model {repo_id!r}: revision {revision!r} is ambiguous in the cache at {root}: "
                f"it starts commits {shown}; give more hex digits"
            )
        commit, source = matches[0], "commit"
    else:
        commit = ""
    if not commit or (source == "commit" and commit not in commits):
        known = _ref_names(model / "refs") + _short(commits)
        raise CheckpointError(
            f"model {repo_id!r} has no revision {revision!r} in the cache at {root} "
            f"(known: {', '.join(known) or 'none'}); " + _fetch_hint(repo_id, revision)
        )
    snapshot = snapshots / commit
    if not snapshot.is_dir():
        raise CheckpointError(
            f"model {repo_id!r}: revision {revision!r} is commit {commit} ({source}), but its snapshot folder "
            f"{folder}/snapshots/{commit} is missing from the cache at {root}; " + _fetch_hint(repo_id, asked)
        )
    return snapshot


def local(path: str | Path, revision: str | None = None) -> Path:
    """``path`` as a local path: itself when it exists (or is no hub id: the reader says it is
    missing), else the cached snapshot of the model it names (:func:`resolve`).

    Raises:
        OptionError: ``revision`` given with a local path.
        CheckpointError: A hub id that is not in the cache (see :func:`resolve`).
    """
    from lowrank_audit.errors import OptionError

    text = str(path)
    if not looks_like_hub_id(text):
        if revision is not None:
            raise OptionError(f"--revision {revision} applies to a model named by hub id; {text} is a local path")
        return Path(path)
    try:
        return resolve(text, revision)
    except CheckpointError as err:
        raise CheckpointError(f"{text}: no such file or folder, and {err}") from None
