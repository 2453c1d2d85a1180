"""gpt4: a CPU-first PyTorch GPT system: model, real weights, training, generation, serving, evaluation."""

from .config import GPT4Config
from .errors import GPT4Error, ModelFileError, ModelNotFoundError
from .generation import GenerationConfig
from .model import GPT4LMHeadModel
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["GPT4Config", "GPT4LMHeadModel", "GenerationConfig", "Tokenizer", "GPT4Error", "ModelFileError",
           "ModelNotFoundError"]
