"""`mga prepare`: DeepFashion In-Shop, Consumer-to-Shop or a retailer's CSV to catalog shards.

    mga prepare inshop        --root DIR --out URI   DeepFashion In-Shop
    mga prepare consumer2shop --root DIR --out URI   DeepFashion Consumer-to-Shop
    mga prepare manifest  --manifest CSV --out URI   path,item_id[,split,domain,category,x1,y1,x2,y2]

The driver parses the annotation files (a malformed one fails with file, line and what
was expected), resolves every listed image and plans shards; Ray tasks then read and
decode every image once, and stream the rows into Parquet shards of at most `--shard-mb`
(an item larger than that gets a shard of its own). Each task owns a contiguous range
of items sorted by `item_id`: every item's rows sit together in ONE shard, sorted by
(item_id, image_id), which is what the training stream's item grouping relies on (an
unlabelled query row is a unit of its own, after the items). The
catalog is committed to its Delta table in one transaction only after every shard is
written; the rejected rows go to their own Delta table beside it (`<out>_rejects`), which
the catalog's commit metadata names with its version.

Rules (what a user of the table can rely on):
- `image` holds the original encoded bytes, `sha256` their hash; `width`/`height` are the
  decoded image's after the EXIF orientation is applied (the frame `bbox` is in).
- Rejected, with `source_path` and `reason` in the rejects table: a missing file, an
  unreadable one, a 0-byte file, a file that is not an image, a truncated or otherwise
  undecodable image, one above `--max-pixels`, a path outside the root (checked on the
  real path, so symlinks cannot escape), and a path listed a second time (the first
  listing is kept; the second is rejected as "duplicate"). The summary reconciles
  `input = written + rejected`.
- Identical bytes under two different paths are NOT rejected: both rows are kept (the
  same garment photographed twice, or a re-upload, is a legitimate image of its item).
  The summary counts such copies within one item and across different items; the latter
  are worth a look because they make two items indistinguishable.
- `bbox` is [x1, y1, x2, y2] int32 in the decoded image, clipped to it; a box that has
  no area once clipped becomes null (counted as "degenerate"); no annotation -> null.
- `image_id` is the path relative to the root, as the annotation lists it
  (`img/WOMEN/Dresses/id_00000002/02_1_front.jpg`): stable and known to DeepFashion users.
  For a manifest, relative to `--root` (default: the CSV's directory); an image named by
  an absolute `s3://` URI has the URI as its id.

In-Shop: `split` is the evaluation status (train|query|gallery), `domain` is shop,
`category` comes from the path (`WOMEN/Dresses`). With `--layout img_highres` (or when
only `img_highres/` exists) the listed `img/...` paths are read from `img_highres/...`;
the annotated boxes are in the 256x256 frame of `img/` ("centered and resized, aspect
kept"), so they are mapped back to the high-resolution image.

Consumer-to-Shop: each image becomes one row however many pairs name it (input counts
distinct images). Test items: consumer images -> query, shop images -> gallery; train
items -> train; val items per `--val-as`: `val` (default, kept as split=val), `skip`
(not written, counted as skipped, not input), `query` (a second test set: consumer ->
query, shop -> gallery) or `gallery` (shop images join the gallery as distractors, as
in the dataset's own protocol "the gallery set are all the shop images in val + test";
consumer images stay split=val). Domain comes from the pair column (1 = consumer,
2 = shop); the bbox file's source_type is cross-checked and disagreements are counted.
If an image is named by pairs that disagree (other item, status or side), the first
pair wins and the conflict is counted and shown.

Manifest CSV: `path,item_id` required; optional `split` (train|query|gallery|val, or
`test` to apply the test rule below to that row's item). `item_id` may be empty on a row
whose split is `query`: an unlabelled photo to be matched (null item_id; it is embedded
and searched like any query, and left out of R@K/mAP); every other row needs an item.
Optional too: `domain` (shop|consumer,
default shop), `category` (default empty), and `x1,y1,x2,y2` (all four or none; empty
cells -> no box). Paths are local or `s3://`; a relative path resolves against the root.
Without a split column, items are split by a seeded hash of the item id: an item is a
test item when hash(seed, item_id) < `--test-fraction`, so the assignment of an item
never changes when the catalog grows (the fraction is met on average, not exactly).
Test items' images: shop -> gallery, consumer -> query. With no domain column every
image is shop and, for each test item, its first image by image_id (the path) is the
query and the rest are gallery.
"""

from pipelines.prepare.consumer2shop import list_consumer2shop
from pipelines.prepare.ingest import fit_bbox, plan_tasks
from pipelines.prepare.inshop import list_inshop
from pipelines.prepare.job import build_parser, main, run, run_args
from pipelines.prepare.listing import Entry, Listing
from pipelines.prepare.manifest import is_test_item, list_manifest

__all__ = ["Entry", "Listing", "build_parser", "fit_bbox", "is_test_item", "list_consumer2shop", "list_inshop", "list_manifest", "main", "plan_tasks", "run", "run_args"]
