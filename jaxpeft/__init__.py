"""jaxpeft: parameter-efficient fine-tuning for JAX/Flax, interoperable with Hugging Face PEFT."""

from jaxpeft.convert.hf import save_hf_folder
from jaxpeft.convert.load import from_pretrained, from_transformers
from jaxpeft.methods.builtins import register_builtins
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.llama import LlamaForCausalLM

register_builtins()  # the one explicit registration of the built-in methods and their model hooks

__all__ = ["LlamaConfig", "LlamaForCausalLM", "from_pretrained", "from_transformers", "save_hf_folder"]
__version__ = "0.1.0"
