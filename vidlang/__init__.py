"""vidlang: adapt image CLIP models to video with interchangeable temporal blocks."""

__version__ = "0.1.0"
