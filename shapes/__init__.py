"""The synthetic shapes data, shared by the ``shapes`` source, the trainers and the quality
report (none of them reaches into another for it).

    scene.py         scenes of 2-4 coloured shapes on plain or textured backgrounds, exact masks
    questions.py     colour / shape / count / position / existence questions, ten human answers
    dataset.py       ShapesParams, render_scene(seed, index), iter_samples(params): the records
    captions.py      which objects a set of patches shows, and its caption
    patch_labels.py  colour and shape classes per ViT patch, and the training probe's loss
"""
