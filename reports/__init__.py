"""Reports built on top of the runtime and the training code (``runtime quality``)."""
