"""Charts shown by the notebooks."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def plot_provenance(provenance: pd.DataFrame):
    """Bar chart of stored invoice_id values by the table they are found in."""
    wide = provenance.pivot(index="found_in", columns="table_name", values="rows")
    wide = wide.reindex(provenance["found_in"].drop_duplicates())
    fig, ax = plt.subplots(figsize=(7, 3.2))
    wide.plot.bar(ax=ax, rot=0)
    ax.set_xlabel("where the stored invoice_id is found")
    ax.set_ylabel("rows")
    ax.set_title("Provenance of stored invoice_id values")
    ax.legend(title=None, fontsize="small")
    fig.tight_layout()
    # Closed so the inline backend does not show it a second time; the
    # notebook displays the returned figure itself.
    plt.close(fig)
    return fig
