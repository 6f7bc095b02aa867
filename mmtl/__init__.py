"""mmtl: multimodal (image-text) transfer learning on Ray."""

__version__ = "0.1.0"
