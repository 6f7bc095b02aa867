"""mmtl: multimodal (image-text) transfer learning on Ray."""
import os as _os

# Ray reads this once, when it is first imported: set before anything in mmtl can import ray, so that every
# local Ray instance started by mmtl listens on 127.0.0.1 only (a laptop must not expose Ray's ports).
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

__version__ = "0.1.0"
