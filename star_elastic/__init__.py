"""star-elastic: many-in-one elastic LLMs (Nemotron-H hybrids and Llama) with zero-shot slicing."""

from .errors import StarElasticError
from .hf import load, load_tokenizer, save_pretrained
from .model import Model, ModelConfig

__all__ = ["Model", "ModelConfig", "StarElasticError", "load", "load_tokenizer", "save_pretrained"]
__version__ = "0.1.0"
