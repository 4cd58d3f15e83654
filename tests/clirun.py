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


# Python's default warning filters (no -W option): what a fresh `cifarflow` process starts with.
_DEFAULT_WARNING_FILTERS = [("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                            ("ignore", ImportWarning), ("ignore", ResourceWarning)]


def _all_loggers():
    import logging

    return [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                   if isinstance(lg, logging.Logger))]


def in_process(capfd, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cifarflow *args`` run by ``cifarflow.cli.main`` in this process (no new interpreter importing
    TensorFlow again), returned as the process it stands for: exit status and what the user would see.

    What a fresh process would show is shown here too: stdout and stderr at the file-descriptor level
    (``capfd``: native code's lines as well); library log handlers bound to a stream before this test
    (pytest's capture of an earlier one) write into this capture, and pytest's root handlers are off, so a
    record with no handler reaches stderr as in a process (``logging.lastResort``); warnings are filtered
    by Python's defaults plus what the command sets, and any shown is a stderr line; an exception that
    would end the process with a traceback is a traceback on stderr and exit status 1. Environment
    (``env``) and logger settings are restored afterwards (cifarflow's loggers made during the call are
    reset: the progress echo of `train`/`tune` does not outlive the command). What is left in-process: once-per-process
    native log lines already printed by an earlier test (see test_what_users_see for real processes).
    """
    import logging
    import traceback
    import warnings

    from cifarflow.cli import main

    argv = [str(a) for a in args]
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    loggers = _all_loggers()
    saved = {lg: (lg.handlers[:], lg.level, lg.propagate, lg.disabled, lg.filters[:]) for lg in loggers}
    streams = {h: h.stream for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler}
    capfd.readouterr()
    out, err = sys.stdout, sys.stderr
    for h, stream in streams.items():  # bound to an earlier capture: write into this one
        h.stream = out if stream is sys.__stdout__ or getattr(stream, "name", "") == "<stdout>" else err
    logging.getLogger().handlers = []  # pytest's; a fresh process has none
    shown = []
    code = 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            for action, category in _DEFAULT_WARNING_FILTERS:
                warnings.simplefilter(action, category)
            try:
                main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 (what a process would die of)
                sys.stderr.write(traceback.format_exc())
                code = 1
            shown = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught]
    finally:
        for lg in _all_loggers():  # cifarflow's loggers first made during the call: as new (e.g. the progress echo)
            if lg not in saved and (lg.name == "cifarflow" or lg.name.startswith("cifarflow.")):
                saved[lg] = ([], logging.NOTSET, True, False, [])
        for lg, (handlers, level, propagate, disabled, filters) in saved.items():
            lg.handlers, lg.level, lg.propagate, lg.disabled, lg.filters = handlers, level, propagate, disabled, filters
        for h, stream in streams.items():
            h.stream = stream
        for lg in _all_loggers():  # handlers made during the call: off this test's capture, which closes
            for h in lg.handlers:
                if type(h) is logging.StreamHandler and h.stream in (out, err):
                    h.stream = sys.__stdout__ if h.stream is out else sys.__stderr__
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        captured = capfd.readouterr()
    return subprocess.CompletedProcess(["cifarflow", *argv], code, captured.out, captured.err + "".join(shown))
