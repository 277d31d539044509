"""A training run's folder (``--workdir``): a local path or a ``gs://`` URI.

Every file the trainer keeps there goes through :class:`etils.epath.Path`, the layer Orbax
uses too: local paths are plain files, and ``gs://`` goes through gcsfs (``pip install -e
'.[gcs]'``) or, where TensorFlow is installed, its gfile.

Object storage has no append and no in-place rewrite, and TensorBoard's event writer needs a
real file it can keep open. For a remote workdir those writers therefore work in a local
:class:`Staging` folder, whose new or changed files :meth:`Staging.sync` uploads whole,
replacing the previous objects (a GCS object write is atomic: readers see the old file or
the new one, never a partial one).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from etils import epath

# is_remote and copy_tree serve checkpoints and workdirs alike: they live with the checkpoints.
from segsr_jax.checkpoint import is_remote

REMOTE_SCHEMES = ("gs",)  # the object stores checkpoint.py hands to Orbax as they are


def open_workdir(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an :class:`epath.Path`, checked before anything is built.

    A remote workdir is probed once (an existence check), so a missing filesystem package,
    missing credentials or a missing bucket fail here rather than after minutes of
    compiling. Local paths are returned as they are (nothing is created).

    Raises:
      ValueError: a URI scheme other than ``gs://``.
      ImportError: ``gs://`` without gcsfs (nor TensorFlow) installed.
    """
    path = epath.Path(workdir)
    if not is_remote(workdir):
        return path
    scheme = os.fspath(workdir).split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(
            f"--workdir {workdir}: use a local folder or gs://BUCKET/PATH "
            f"({scheme}:// is not supported)"
        )
    try:
        path.exists()
    except ImportError as e:
        raise ImportError(
            f"--workdir {workdir}: writing to gs:// needs gcsfs; install it "
            f"with: pip install -e '.[gcs]'"
        ) from e
    return path


class Staging:
    """A local folder mirrored to a remote one, for writers that need real files.

    Writers work under :attr:`local`; :meth:`sync` uploads every file that is new or changed
    (size or mtime) since it was last uploaded to the same relative path under ``remote``,
    whole. Files of ``remote`` named in ``download`` are copied into :attr:`local` first, so
    a resumed run appends to its earlier records. Only files this object wrote or downloaded
    are ever uploaded; other files of ``remote`` are left alone.

    Args:
      remote: the remote folder.
      download: relative paths of files to fetch from ``remote`` when they exist.
    """

    def __init__(self, remote: epath.Path, download: tuple[str, ...] = ()):
        self.remote = remote
        self.local = pathlib.Path(tempfile.mkdtemp(prefix="segsr_jax_staging_"))
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._made: set[str] = set()  # remote folders made (each mkdir may be a request)
        for rel in download:
            if (remote / rel).exists():
                dest = self.local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes((remote / rel).read_bytes())
                self._uploaded[rel] = _version(dest)

    def sync(self, skip: tuple[str, ...] = ()) -> list[str]:
        """Upload new and changed files, except those whose relative path starts with one of
        ``skip``; returns their relative paths."""
        done = []
        for file in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = file.relative_to(self.local).as_posix()
            if rel.startswith(skip):
                continue
            version = _version(file)  # before reading: a write in between is uploaded next time
            if self._uploaded.get(rel) == version:
                continue
            dest = self.remote / rel
            if str(dest.parent) not in self._made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(str(dest.parent))
            dest.write_bytes(file.read_bytes())
            self._uploaded[rel] = version
            done.append(rel)
        return done

    def close(self) -> None:
        """A last :meth:`sync`, then remove the local folder."""
        self.sync()
        shutil.rmtree(self.local)


def _version(file: pathlib.Path) -> tuple[int, int]:
    st = file.stat()
    return st.st_size, st.st_mtime_ns
