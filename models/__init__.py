"""Neural network modules (BLIP ViT / ITM / captioner, UnifiedQA FiD T5, ...) and checkpoint
loaders. Models never import stages or the runtime."""
