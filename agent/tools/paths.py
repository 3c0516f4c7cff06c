"""Paths the tools take from their users: checked when the arguments are parsed, before any work starts.

A report is written at the end of a run (a twelve-second demo, a ten-minute bench), and a state or work
directory is made once the run has started: a destination whose directory does not exist, or a "directory"
that is a regular file, used to fail only then, with "unexpected error: FileNotFoundError" after all the
work. These argparse types refuse such a path at once with argparse's usage error (exit 2), one line naming
the path and what is wrong, and they change nothing on disk (a directory is made later, by the command).

    parser.add_argument("--json-out", type=output_file_argument)    # a file to create or replace
    parser.add_argument("--state-dir", type=directory_argument)     # a directory to use, or to create

They judge the path as it is now: a file system that changes during the run (a directory removed, a disk
filled) can still fail the write at the end.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _writable(path: Path) -> bool:
    # A directory takes a new entry when it is writable and searchable.
    return os.access(path, os.W_OK | os.X_OK) if path.is_dir() else os.access(path, os.W_OK)


def output_file_problem(path: Path) -> str | None:
    """Why a file cannot be created or replaced at `path` now, or None when it can."""
    if path.is_dir():
        return f"{path} is a directory: name a file"
    parent = path.parent
    if not parent.exists():
        return f"cannot write {path}: the directory {parent} does not exist (create it first)"
    if not parent.is_dir():
        return f"cannot write {path}: {parent} is not a directory"
    if not _writable(path if path.exists() else parent):
        return f"cannot write {path}: {path if path.exists() else parent} is not writable"
    return None


def directory_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a directory, or made as one (with its missing parents) now, or None."""
    # The nearest part of the path that exists: a relative path's parents end with ".", an absolute one's with "/".
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:  # the working directory itself is gone
        return f"cannot make the directory {path}: none of its parents exists"
    if existing == path:
        if not path.is_dir():
            return f"{path} is not a directory"
        return None if _writable(path) else f"cannot use {path}: it is not writable"
    if not existing.is_dir():
        return f"cannot make the directory {path}: {existing} is not a directory"
    return None if _writable(existing) else f"cannot make the directory {path}: {existing} is not writable"


def output_file_argument(text: str) -> Path:
    """An argparse type: a file the command will write (created or replaced), whose directory exists and is
    writable; argparse's usage error (exit 2) saying what is wrong otherwise."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    problem = output_file_problem(Path(text))
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def directory_argument(text: str) -> Path:
    """An argparse type: a directory the command will use, or make with its missing parents: not a regular file,
    nor under one, and writable; argparse's usage error (exit 2) saying what is wrong otherwise."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory name, got ''")
    problem = directory_problem(Path(text))
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


__all__ = ["directory_argument", "directory_problem", "output_file_argument", "output_file_problem"]
