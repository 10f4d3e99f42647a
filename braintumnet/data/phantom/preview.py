"""The phantom's contact sheet: one axial slice of each tumour type at each site, mask outlined.

So a person sees at a glance how types differ (ring vs solid, intra- vs extra-axial, edema) and how sites differ
(slice thickness, noise, bias, contrast). Drawn with matplotlib's Agg canvas directly: no display, no pyplot state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from braintumnet.data.contract import EDEMA_LABEL, EXTERNAL_SITE, SITES, TUMOR_TYPES, TUMOUR_LABEL
from braintumnet.extras import require

TITLE = "SYNTHETIC PHANTOM: drawn from the MNI152 template with simulated tumours and scanners, NOT patient data"


def contact_sheet(panels: list[dict], path: Path) -> Path:
    """Write a PNG with one row per site and one column per tumour type.

    Args:
        panels: dicts with site, case_id, tumor_type, atypical, location, n_lesions, image (2-D ``(X, Y)``),
            mask (2-D, same shape), spacing (mm along X and Y) and scanner (a short description).
        path: the PNG to write.
    """
    sites = [s for s in (*SITES, EXTERNAL_SITE) if any(p["site"] == s for p in panels)]
    figure = require("matplotlib.figure", "the phantom's preview").Figure
    canvas = require("matplotlib.backends.backend_agg", "the phantom's preview").FigureCanvasAgg
    fig = figure(figsize=(4.2 * len(TUMOR_TYPES), 4.4 * len(sites) + 1.0), facecolor="black")
    canvas(fig)
    axes = fig.subplots(len(sites), len(TUMOR_TYPES), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for panel in panels:
        ax = axes[sites.index(panel["site"]), TUMOR_TYPES.index(panel["tumor_type"])]
        _draw(ax, panel)
    for row, site in enumerate(sites):
        scanner = next(p["scanner"] for p in panels if p["site"] == site)
        axes[row, 0].text(-0.06, 0.5, f"{site}\n{scanner}", transform=axes[row, 0].transAxes, rotation=90,
                          ha="right", va="center", color="white", fontsize=9)
    fig.suptitle(TITLE + "\nred: tumour (enhancing + necrotic core)   yellow: peritumoral edema", color="orange",
                 fontsize=11, fontweight="bold", y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=1 - 1.0 / fig.get_figheight(), wspace=0.04,
                        hspace=0.12)
    path = Path(path)
    fig.savefig(path, dpi=80, facecolor="black", metadata={"Software": None})
    return path


def _draw(ax, panel: dict) -> None:
    image, mask = panel["image"].T, panel["mask"].T  # rows = Y (posterior at the bottom), columns = X
    sx, sy = panel["spacing"]
    extent = (0, image.shape[1] * sx, 0, image.shape[0] * sy)  # mm, so thick-slice and anisotropic grids look right
    lo, hi = np.percentile(image, [1, 99.7])
    # Radiological convention: the patient's right on the viewer's left, i.e. X (towards Right) flipped.
    ax.imshow(image[:, ::-1], cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent, interpolation="nearest")
    for label, colour in ((TUMOUR_LABEL, "red"), (EDEMA_LABEL, "yellow")):
        if (mask == label).any():
            ax.contour((mask == label)[:, ::-1].astype(float), [0.5], colors=colour, linewidths=0.8, origin="lower",
                       extent=extent)
    tag = f", atypical: {panel['atypical']}" if panel["atypical"] else ""
    count = f", {panel['n_lesions']} lesions" if panel["n_lesions"] > 1 else ""
    ax.set_title(f"{panel['case_id']}: {panel['tumor_type']}{tag}\n{panel['location'].replace('_', ' ')}{count}",
                 color="white", fontsize=9)
