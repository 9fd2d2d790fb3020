"""Choose between Option 1 and Option 2 from the inspected data."""

from __future__ import annotations

from dataclasses import dataclass, field

from .inspection import BreakingRows

CONTRACTS = "public.operator_contracts"


@dataclass
class Recommendation:
    """The fix the data allows, with the reasons and the command to run it."""

    option: int
    remap_invoice_rows: bool
    headline: str
    reasons: list[str] = field(default_factory=list)
    # None for a demo database, whose command is --demo instead of --confirm.
    database: str | None = "DATABASE"

    @property
    def command(self) -> str:
        remap = " --remap-invoice-rows" if self.remap_invoice_rows else ""
        target = "--demo" if self.database is None else f"--confirm {self.database}"
        return f".venv/bin/fkrunbook chain --option {self.option}{remap} {target}"

    def as_dict(self) -> dict:
        return {"option": self.option,
                "remap_invoice_rows": self.remap_invoice_rows,
                "headline": self.headline, "reasons": self.reasons,
                "command": self.command}


def recommend(keys: list[str], owners: dict[str, list[str]],
              breaking: list[BreakingRows],
              database: str | None = "DATABASE") -> Recommendation:
    """Recommend Option 1 only when every failing key and stored value fits it.

    Option 1 is safe when every failing key is an operator_contracts id and
    every stored value is one too, or can be remapped to one through
    ``invoices.contract_id``. Anything else gets Option 2. ``database`` goes
    into the command's ``--confirm``.
    """
    advice = _choose(keys, owners, breaking)
    advice.database = database
    return advice


def _choose(keys: list[str], owners: dict[str, list[str]],
            breaking: list[BreakingRows]) -> Recommendation:
    reasons = []
    outside = [key for key in keys if CONTRACTS not in owners.get(key, [])]
    if outside:
        return Recommendation(
            2, False,
            "Option 2: make invoice_id nullable and drop the FK.",
            [f"{len(outside)} failing key(s) are not operator_contracts ids "
             f"(first: {outside[0]}), so an FK to operator_contracts would "
             f"reject them as well."],
        )
    reasons.append(f"All {len(keys)} failing key(s) are operator_contracts ids.")

    unremappable = [b for b in breaking if b.unremappable]
    if unremappable:
        detail = ", ".join(f"{b.table}: {b.unremappable}" for b in unremappable)
        return Recommendation(
            2, False,
            "Option 2: make invoice_id nullable and drop the FK.",
            reasons + [f"Some stored values are neither contract ids nor "
                       f"invoice ids with a contract ({detail} rows), so "
                       f"VALIDATE CONSTRAINT would fail and remapping cannot "
                       f"fix them."],
        )

    remap = [b for b in breaking if b.remappable]
    if remap:
        detail = ", ".join(f"{b.table}: {b.remappable}" for b in remap)
        return Recommendation(
            1, True,
            "Option 1 with remap_invoice_rows=True: re-point the FK to "
            "operator_contracts(id) after rewriting old invoice ids to their "
            "contract.",
            reasons + [f"Stored invoice ids whose invoice has a contract "
                       f"({detail} rows) would fail VALIDATE; the remap "
                       f"rewrites them through invoices.contract_id in "
                       f"batches."],
        )

    return Recommendation(
        1, False,
        "Option 1: re-point the FK to operator_contracts(id) ON DELETE CASCADE.",
        reasons + ["Every stored invoice_id is already an operator_contracts "
                   "id, so VALIDATE CONSTRAINT will pass."],
    )
