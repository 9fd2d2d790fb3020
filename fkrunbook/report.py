"""Write each notebook's results and the chain's summary.json."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from pathlib import Path

import pandas as pd

RESULTS_FOLDER = "results"


def _default(value):
    if isinstance(value, pd.DataFrame):
        return value.to_dict(orient="records")
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID, Path)):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(data) -> str:
    return json.dumps(data, indent=2, default=_default, ensure_ascii=False) + "\n"


def write_result(output_dir: Path, step: str, data: dict) -> Path:
    """Write ``results/<step>.json`` in the run's output folder."""
    folder = Path(output_dir) / RESULTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{step}.json"
    path.write_text(to_json(data), encoding="utf-8")
    return path


def read_result(output_dir: Path, step: str) -> dict | None:
    path = Path(output_dir) / RESULTS_FOLDER / f"{step}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def build_summary(output_dir: Path, option: int, notebooks: list[dict]) -> dict:
    """Combine the notebooks' results into the run's summary."""
    reproduce = read_result(output_dir, "reproduce") or {}
    inspect = read_result(output_dir, "inspect") or {}
    migrate = read_result(output_dir, "migrate") or {}
    verify = read_result(output_dir, "verify") or {}
    recover = read_result(output_dir, "recover")
    # After the fix the 23503 can no longer be reproduced; that is no failure.
    reproduced = None if reproduce.get("already_fixed") else reproduce.get("reproduced")
    checks = {
        "reproduced_23503": reproduced,
        "keys_in_operator_contracts": reproduce.get("keys_in_operator_contracts"),
        "migration_converged": migrate.get("converged"),
        "insert_succeeds": verify.get("insert_succeeds"),
        "attempt_on_top_of_history": verify.get("on_top"),
    }
    if recover is not None:
        checks["lost_attempts_recovered"] = recover_complete(recover)
    return {
        "option": option,
        "target": reproduce.get("target") or migrate.get("target"),
        "keys": reproduce.get("keys", []),
        "key_tables": reproduce.get("owners", {}),
        "root_cause": reproduce.get("root_cause"),
        "recommendation": inspect.get("recommendation"),
        "changes": migrate.get("applied", []),
        "mode": migrate.get("mode"),
        "constraints_after": migrate.get("constraints_after", []),
        "realtime": verify.get("realtime"),
        "recovery": None if recover is None else {
            key: recover.get(key) for key in
            ("mode", "lost", "inserted", "already_present", "blocked")},
        "checks": checks,
        "checks_passed": all(value is True for value in checks.values()
                             if value is not None),
        "checks_failed": [name for name, value in checks.items()
                          if value is not None and value is not True],
        "notebooks": notebooks,
    }


def write_summary(output_dir: Path, summary: dict) -> Path:
    path = Path(output_dir) / "summary.json"
    path.write_text(to_json(summary), encoding="utf-8")
    return path


def recover_complete(recover: dict) -> bool:
    """Return whether the recover step inserted or found every lost attempt."""
    return (recover.get("mode") == "apply" and not recover.get("blocked")
            and not recover.get("warnings")
            and (recover.get("inserted") or 0) + (recover.get("already_present") or 0)
            == (recover.get("lost") or 0))
