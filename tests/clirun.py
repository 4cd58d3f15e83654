"""Run the ``cifarflow`` command in a subprocess, privileged or not, and check
the house rule for fixable errors: exit status 2 and exactly one line on stderr, ``error: ... (...)``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CIFARFLOW = os.path.join(os.path.dirname(sys.executable), "cifarflow")


def cli(*args, env: dict | None = None, unprivileged: bool = False, timeout: float = 300,
        **popen) -> subprocess.CompletedProcess:
    """``cifarflow *args`` with the test's environment plus ``env``.

    ``unprivileged``: file modes apply to the command. Root ignores them, so a
    root test runs it through util-linux ``setpriv`` without the capabilities
    that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER).
    """
    prefix = []
    if unprivileged and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            pytest.skip("running as root without util-linux setpriv: file modes cannot be made to apply")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    return subprocess.run([*prefix, CIFARFLOW, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **popen)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The process exited 2 with one stderr line ``error: <what> (<fix>)`` holding every fragment; returns it."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {err[-4000:]}"
    assert err.count("\n") == 1 and err.startswith("error: ") and err.rstrip().endswith(")"), err[-4000:]
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err.strip()
