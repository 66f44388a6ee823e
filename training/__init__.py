"""Training commands (``runtime train ...``): models that have no published weights.

    fusion.py   ``runtime train fusion``: BLIP + SAM fusion modules on image-question matching
    itm.py      ``runtime train itm``: a BLIP ITM model (ITM on hard negatives + ITC)
    caption.py  ``runtime train caption``: the BLIP captioner on captions of sampled patches
    pairs.py    positive / hard-negative (image, question) pairs
    data.py     training samples from any dataset source; frozen-feature store
    outputs.py  checkpoint (atomic, weights_only), loss.csv, loss.png
"""
