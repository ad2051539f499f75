"""Host input pipeline: webdataset shards -> decoded, cropped uint8 batches.

Modules, each importing only those above it:
  shards   shard specs -> URLs, tar members -> samples -> raw `Record`s, which samples are usable
           (an image and a readable label), sample counts, label parsing
  decode   image decoding (simplejpeg / Pillow) and the train / eval crop of each record
  prepare  writing shards: sklearn's digits (and their cache for `digits:` specs), ImageFolder trees
  order    which records a process reads in an epoch, in which (seeded, shuffled) order
  loader   `train_batches` / `valid_batches`: the background-thread `Loader`, worker pool, the
           train / valid streams, resume state (`STATE_KEYS`, `skip_state`); resolves `digits:` specs
"""

