"""Captioners: one caption per image from a vision-language model (BLIP, Florence-2, any
transformers image-text-to-text model), registered by name like the annotators."""
