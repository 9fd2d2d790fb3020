"""Per-notebook set-up: the target, its connection and the output folder."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from . import connection, report
from .errors import ParameterError, RunbookError
from .paths import OUTPUTS_DIR

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One notebook's connection to its target and where it writes."""

    step: str
    target: connection.Target = field(repr=False)
    conn: psycopg.Connection = field(repr=False)
    output_dir: Path
    target_info: dict

    @property
    def is_demo(self) -> bool:
        return self.target.is_demo

    def record(self, data: dict) -> Path:
        """Write this step's results for the chain's summary.json."""
        return report.write_result(self.output_dir, self.step,
                                   {"target": self.target_info, **data})

    def close(self) -> None:
        self.conn.close()


def utc_stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def resolve_output_dir(output_dir, step: str) -> Path:
    """Return ``output_dir``, or a new ``outputs/<UTC time>-<step>`` when empty."""
    if output_dir in (None, ""):
        path = OUTPUTS_DIR / f"{utc_stamp()}-{step}"
    elif not isinstance(output_dir, (str, Path)):
        raise ParameterError(
            f"output_dir must be a folder path, got {type(output_dir).__name__} "
            f"{output_dir!r}.")
    else:
        path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ParameterError(
            f"output_dir {str(path)!r} is a file, not a folder; give a folder "
            f"(it is created if missing) or leave it empty.")
    path.mkdir(parents=True, exist_ok=True)
    return path


def start(step: str, output_dir="", demo_stage: str = "incident") -> Run:
    """Resolve the target, connect, and describe it (never with its password)."""
    folder = resolve_output_dir(output_dir, step)
    target = connection.resolve_target(demo_stage=demo_stage)
    conn = connection.connect(target)
    info = connection.describe_target(conn)
    info["mode"] = "demo" if target.is_demo else "target"
    info["source"] = target.source
    return Run(step, target, conn, folder, info)


def use_short_errors() -> None:
    """Show runbook errors in IPython as their message alone, without a traceback.

    The message names what failed, the value and the next step, and a
    traceback through the package would hide it. The cell still fails, so
    papermill and nbval see the error. Outside IPython this does nothing.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def show_message(shell, etype, value, tb, tb_offset=None):
        text = f"{etype.__name__}: {value}"
        if hasattr(shell, "_showtraceback"):
            shell._showtraceback(etype, value, [text])
        else:
            print(text)

    shell.set_custom_exc((RunbookError,), show_message)
