"""The synthetic fine-grained fashion catalog (DESIGN.md), drawn procedurally: no download needed.

`planning` decides the items, their looks and details, and the images of each split;
`drawing` renders one planned image to JPEG bytes. `mga synth` (pipelines.synth) writes
the catalog table with Ray.
"""

from pipelines.synthetic.drawing import render_image
from pipelines.synthetic.planning import DETAIL_OPTIONS, MAX_ITEMS_PER_GROUP, PlannedImage, SynthSpec, item_details, plan_catalog

__all__ = ["DETAIL_OPTIONS", "MAX_ITEMS_PER_GROUP", "PlannedImage", "SynthSpec", "item_details", "plan_catalog", "render_image"]
