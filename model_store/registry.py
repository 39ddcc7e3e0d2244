"""The model store on disk: immutable numbered versions, aliases, atomic publishing, hash verification.

Layout under the root:
    <name>/<version>/manifest.json, model.safetensors, tokenizer.json, ...   (immutable once renamed in)
    <name>/aliases.json                                                       ({"prod": 3, ...})
    <name>/.lock                                                              (serialises publish/promote)
    .staging/<name>.<pid>.<random>/                                           (being written; never listed)

A version becomes visible only by one rename(2) of a complete, fsynced, hash-verified directory, so a
process killed at any point leaves either no new version or a complete one. This module knows nothing
of GPT-2 weights: importers write files into a staging directory and call `commit`.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import IntegrityError, NotFoundError, StoreError
from .manifest import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    AdapterInfo,
    ArchConfig,
    Lineage,
    Manifest,
    TokenizerInfo,
    describe_file,
    sha256_file,
)
from .refs import LATEST, ModelRef, parse_ref, validate_alias, validate_name

ALIASES_FILE = "aliases.json"
STAGING_DIR = ".staging"
_LOCK_FILE = ".lock"


def default_root() -> Path:
    """The store folder inside the repository: bundled models plus user-imported ones."""
    return Path(__file__).resolve().parent.parent / "models"


def store_root(value: str | None) -> Path:
    """The root for a MODEL_STORE_ROOT value; unset or empty means the repository's `models/`."""
    return Path(value).expanduser() if value else default_root()


@dataclass(frozen=True)
class StoredVersion:
    """A resolved, existing version; `manifest` is read from disk but its files are not yet verified."""

    path: Path
    manifest: Manifest

    @property
    def ref(self) -> str:
        return self.manifest.ref


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # --- reading -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        model_dir = self.root / validate_name(name)
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file())

    def aliases(self, name: str) -> dict[str, int]:
        path = self.root / validate_name(name) / ALIASES_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"cannot read aliases of {name!r} ({path}): {exc}") from None
        return {str(k): int(v) for k, v in data.items()}

    def resolve(self, ref: str | ModelRef) -> StoredVersion:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        versions = self.versions(ref.name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise NotFoundError(f"no model named {ref.name!r} in store {self.root} (models: {known})")
        version = self._select(ref, versions)
        path = self.root / ref.name / str(version)
        manifest = Manifest.read(path / MANIFEST_FILE)
        if (manifest.name, manifest.version) != (ref.name, version):
            raise IntegrityError(f"{path}/{MANIFEST_FILE} describes {manifest.ref}, not {ref.name}@{version}")
        return StoredVersion(path, manifest)

    def verify(self, ref: str | ModelRef) -> StoredVersion:
        """Resolve and check every file's size and sha256; raises IntegrityError naming the first bad file.
        An adapter's base must be in the store with the weights the adapter was made for (the base's own
        files are checked when it is verified itself)."""
        stored = self.resolve(ref)
        verify_files(stored.path, stored.manifest)
        if stored.manifest.adapter is not None:
            self.adapter_base(stored.manifest)
        return stored

    def adapter_base(self, manifest: Manifest) -> StoredVersion:
        """The base version an adapter was made for (resolved, not verified); IntegrityError if it is gone
        or its weights are not the ones the adapter names."""
        info = manifest.adapter
        assert info is not None
        try:
            base = self.resolve(info.base)
        except NotFoundError as exc:
            raise IntegrityError(f"{manifest.ref}: its base {info.base} is not in the store ({exc})") from None
        weights = {f.path: f.sha256 for f in base.manifest.files}.get(WEIGHTS_FILE)
        if weights != info.base_sha256:
            raise IntegrityError(f"{manifest.ref}: its base {info.base} has other weights than it was made for")
        return base

    def _select(self, ref: ModelRef, versions: list[int]) -> int:
        listed = ", ".join(map(str, versions))
        if ref.selector == LATEST:
            return versions[-1]
        if ref.version is not None:
            if ref.version not in versions:
                raise NotFoundError(f"{ref.name} has no version {ref.version} (versions: {listed})")
            return ref.version
        aliases = self.aliases(ref.name)
        if ref.selector not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise NotFoundError(f"{ref.name} has no alias {ref.selector!r} (aliases: {known}; versions: {listed})")
        version = aliases[ref.selector]
        if version not in versions:
            raise NotFoundError(f"alias {ref} points to version {version}, which does not exist")
        return version

    # --- writing -------------------------------------------------------------------------------

    def promote(self, ref: str | ModelRef, alias: str) -> StoredVersion:
        """Point `alias` at the version `ref` resolves to (creating or moving the alias)."""
        validate_alias(alias)
        stored = self.resolve(ref)
        name = stored.manifest.name
        with self._lock(name):
            aliases = self.aliases(name)
            aliases[alias] = stored.manifest.version
            _atomic_write(self.root / name / ALIASES_FILE, json.dumps(aliases, indent=2, sort_keys=True) + "\n")
        return stored

    def record_metrics(self, ref: str | ModelRef, metrics: dict[str, Any]) -> StoredVersion:
        """Add `metrics` (key -> JSON-able value) to a version's manifest as a new manifest revision.

        Only manifest.json is replaced (atomically, under the name's lock, re-read inside it so concurrent
        recorders never lose each other's entries); the files it lists and their hashes are untouched.
        A key recorded again shows its latest value in `metrics`; every earlier value stays in `history`.
        """
        stored = self.resolve(ref)
        with self._lock(stored.manifest.name):
            current = Manifest.read(stored.path / MANIFEST_FILE)
            revision = current.revision + 1
            entry = {"revision": revision, "recorded_at": _utc_now(), "metrics": dict(metrics)}
            updated = dataclasses.replace(
                current,
                revision=revision,
                metrics={**current.metrics, **metrics},
                history=(*current.history, entry),
            )
            _atomic_write(stored.path / MANIFEST_FILE, updated.to_json())
        return StoredVersion(stored.path, updated)

    @contextlib.contextmanager
    def publish(self, name: str) -> Iterator["Staging"]:
        """Open a staging directory for a new version of `name`; `Staging.commit` makes it visible.

        Leaving the block without committing (an exception included) deletes the staging directory.
        """
        validate_name(name)
        staging_root = self.root / STAGING_DIR
        staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()
        path = staging_root / f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
        path.mkdir()
        try:
            yield Staging(self, name, path)
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _commit(self, staging: "Staging", draft: dict[str, Any]) -> StoredVersion:
        files = sorted(
            str(p.relative_to(staging.path)) for p in staging.path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
        )
        for rel in files:
            os.chmod(staging.path / rel, 0o444)  # immutable once published, against accidental edits
            _fsync_file(staging.path / rel)
        entries = tuple(describe_file(staging.path, rel) for rel in files)
        model_dir = self.root / staging.name
        with self._lock(staging.name):
            version = 1 + max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0)
            manifest = Manifest(name=staging.name, version=version, created_at=_utc_now(), files=entries, **draft)
            _atomic_write(staging.path / MANIFEST_FILE, manifest.to_json())
            verify_files(staging.path, Manifest.read(staging.path / MANIFEST_FILE))
            _fsync_dir(staging.path)
            final = model_dir / str(version)
            os.rename(staging.path, final)
            _fsync_dir(model_dir)
        return StoredVersion(final, manifest)

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        with open(model_dir / _LOCK_FILE, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _remove_stale_staging(self) -> None:
        """Delete staging directories left by publishers that died (their pid no longer runs)."""
        for path in (self.root / STAGING_DIR).iterdir():
            parts = path.name.rsplit(".", 2)
            if len(parts) == 3 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                shutil.rmtree(path, ignore_errors=True)


class Staging:
    """A directory being filled with one new version's files. Write into `path`, then `commit`."""

    def __init__(self, store: ModelStore, name: str, path: Path) -> None:
        self.store, self.name, self.path = store, name, path

    def commit(
        self,
        *,
        config: ArchConfig,
        dtype: str,
        tokenizer: TokenizerInfo,
        lineage: Lineage,
        metrics: dict[str, Any] | None = None,
        adapter: AdapterInfo | None = None,
    ) -> StoredVersion:
        from . import __version__

        draft = dict(
            config=config,
            dtype=dtype,
            tokenizer=tokenizer,
            lineage=lineage,
            metrics=dict(metrics or {}),
            package_version=__version__,
            adapter=adapter,
        )
        return self.store._commit(self, draft)


def verify_files(path: Path, manifest: Manifest) -> None:
    for entry in manifest.files:
        file = path / entry.path
        if not file.resolve().is_relative_to(path.resolve()):
            raise IntegrityError(f"{manifest.ref}: manifest lists a file outside the version: {entry.path!r}")
        if not file.is_file():
            raise IntegrityError(f"{manifest.ref}: {entry.path} is missing")
        size = file.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"{manifest.ref}: {entry.path} is {size} bytes, manifest says {entry.size}")
        if sha256_file(file) != entry.sha256:
            raise IntegrityError(f"{manifest.ref}: {entry.path} fails its sha256 check (file changed or corrupt)")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
