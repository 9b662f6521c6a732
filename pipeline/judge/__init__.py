"""The judge: a small classifier that reads the embedded corpus's ground truth off an image.

The corpus knows the truth of every caption (CORPUS.md), so generated images can be scored
on what text-to-image systems are usually judged by eye: the named colors, shapes, sizes,
positions and relations. The judge is trained on real corpus images only, and kept apart from
the pipeline's CLIP, so that what it says of generated images does not share CLIP's blind
spots. Its own accuracy on real test images is reported beside everything it scores.

- ``labels``: ground truth <-> the judge's heads, and scoring an image against a caption's truth;
- ``network``: the classifier;
- ``stage``: the `judge` stage (train, measure on real test images, save) and ``Judge``, the
  loaded model that ``evaluate`` and ``unclip judge`` use.
"""
