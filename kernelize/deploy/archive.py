"""An artifact folder as one ``.tar.gz`` (:func:`pack`) and back (:func:`unpack`); :func:`extract`
also serves :func:`kernelize.deploy.artifact.load` of an archive. Standard library only, like
:mod:`kernelize.deploy.artifact`."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from kernelize.deploy import artifact
from kernelize.errors import KernelizeError


def pack(folder: str | os.PathLike, archive: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Verify ``folder`` and write it as one ``.tar.gz`` (default: beside it, named after it)
    holding a single top-level folder. Written to a temporary file and renamed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KernelizeError(f"artifact folder not found: {folder}")
    manifest = artifact.verify(folder)
    name = folder.resolve().name
    archive = Path(archive) if archive is not None else folder.resolve().parent / f"{name}{artifact.ARCHIVE_SUFFIX}"
    if archive.resolve().is_relative_to(folder.resolve()):
        raise KernelizeError(f"the archive {archive} cannot be inside the artifact folder {folder}")
    if archive.exists() and not force:
        raise KernelizeError(f"archive {archive} exists (use --force to replace it)")
    if not archive.resolve().parent.is_dir():
        raise KernelizeError(f"parent folder of the archive does not exist: {archive.resolve().parent}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.resolve().parent)
    try:
        import gzip

        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member in sorted([artifact.MANIFEST, *manifest["files"]]):
                info = tarfile.TarInfo(f"{name}/{member}")
                info.size = (folder / member).stat().st_size
                info.mode = 0o644
                with open(folder / member, "rb") as fh:
                    tar.addfile(info, fh)
        os.chmod(tmp_name, artifact.user_mode(0o666))  # mkstemp makes it private
        os.replace(tmp_name, archive)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return archive


def extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` (one top-level folder of plain files) into ``dest``; return that
    folder. Refuses links, devices and member paths that would land outside ``dest``."""
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise KernelizeError(f"cannot read archive {archive}: {str(err).splitlines()[0]}") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise KernelizeError(f"cannot read archive {archive}: {str(err).splitlines()[0] or 'truncated'}") from None
        root = dest.resolve()
        tops = set()
        for member in members:
            name = member.name
            parts = Path(name).parts
            if (not name or name.startswith(("/", "\\")) or ".." in parts or "\\" in name
                    or os.path.isabs(name) or not (root / name).resolve().is_relative_to(root)):
                raise KernelizeError(f"refusing archive {archive}: member {name!r} would be written outside "
                                     "the target folder")
            if not (member.isfile() or member.isdir()):
                raise KernelizeError(f"refusing archive {archive}: member {name!r} is a link or special file")
            tops.add(parts[0] if parts else "")
        if len(tops) != 1 or "" in tops or "." in tops:
            raise KernelizeError(f"not a kernelize artifact archive: {archive} must hold exactly one top-level "
                                 "folder")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tar.extractall(dest, members=members, **kwargs)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise KernelizeError(f"cannot extract archive {archive}: {str(err).splitlines()[0] or 'truncated'}") \
                from None
    folder = dest / tops.pop()
    if not folder.is_dir():
        raise KernelizeError(f"not a kernelize artifact archive: {archive} holds no folder")
    return folder


def unpack(archive: str | os.PathLike, dest: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Extract an artifact archive into the folder ``dest`` (default: beside the archive,
    named after it), atomically; verify it; return the folder."""
    archive = Path(archive)
    if not archive.is_file():
        raise KernelizeError(f"archive not found: {archive}")
    if dest is None:
        suffix = artifact.ARCHIVE_SUFFIX
        base = archive.name[: -len(suffix)] if archive.name.endswith(suffix) else archive.stem
        dest = archive.resolve().parent / base
    dest = Path(dest)
    parent = artifact.output_parent(dest, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    try:
        folder = extract(archive, tmp)
        artifact.verify(folder)
        artifact._replace(folder, dest, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest

