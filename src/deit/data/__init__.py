"""Host input pipeline: webdataset shards -> decoded, cropped uint8 batches.

Modules, each importing only those above it:
  kept     a per-process map with a byte budget: the in-memory caches of shards and decode
  shards   shard specs -> URLs, tar members -> samples -> raw `Record`s, which samples are usable
           (an image and a readable label), sample counts, label parsing
  decode   image decoding (simplejpeg / Pillow) and the train / eval crop of each record
  prepare  writing shards: sklearn's digits (and their cache for `digits:` specs), ImageFolder trees
  order    which records a process reads in an epoch, in which (seeded, shuffled) order
  loader   `train_batches` / `valid_batches`: the background-thread `Loader`, worker pool, the
           train / valid streams, resume state (`STATE_KEYS`, `skip_state`); resolves `digits:` specs

Bad data: `loader.resolve_shards` checks a spec before anything is written (missing files, files
that are not complete tars, shards whose first samples all fail to decode: one-line ValueErrors);
bad samples (unreadable image, missing / non-integer / out-of-range label) are skipped and counted
in the loaders' `skipped`; see `shards`' docstring.
"""

