"""glmjax: GLM-130B (and ChatGLM) in JAX/Flax, sharded over device meshes."""
from glmjax.config import PRESETS, GLMConfig, resolve

__all__ = ["GLMConfig", "PRESETS", "resolve"]
__version__ = "0.1.0"
