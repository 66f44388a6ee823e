"""Training commands (``runtime train MODEL``): the project's own weights for the ``shapes``
presets, and models that have no published weights.

    loop.py     the training loop every command runs: options, seeding, resume, LR schedule,
                checkpoint / evaluation cadence, progress, loss log and plot, run records
    sam.py      ``runtime train sam``: EfficientSAM under point prompts
    itm.py      ``runtime train itm``: a BLIP ITM model (ITM on hard negatives + ITC)
    caption.py  ``runtime train caption``: the BLIP captioner on captions of sampled patches
    fid.py      ``runtime train fid``: the Fusion-in-Decoder T5 on shapes questions
    qavit.py    ``runtime train qavit``: QA-ViT (answer + grounding)
    fusion.py   ``runtime train fusion``: BLIP + SAM fusion modules on image-question matching
    common.py   option groups, initial BLIP weights, AdamW groups, LR schedule
    pairs.py    positive / hard-negative (image, question) pairs
    data.py     training samples from any dataset source; frozen-feature store
    outputs.py  checkpoint (atomic, weights_only), loss.csv, loss.png, config.json, metrics.json
    bundle.py   ``runtime train bundle``: ship a run's weights as a shapes preset
"""
