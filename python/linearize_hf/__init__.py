"""Load models converted by linearize in Hugging Face transformers without trust_remote_code:
`import linearize_hf` registers `model_type: linearize` with AutoConfig and AutoModelForCausalLM.
The same two files are copied into every export, where `trust_remote_code=True` loads them."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_linearize import LinearizeConfig
from .modeling_linearize import LinearizeCache, LinearizeForCausalLM, LinearizeModel

AutoConfig.register(LinearizeConfig.model_type, LinearizeConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizeConfig, LinearizeForCausalLM, exist_ok=True)

__all__ = ["LinearizeConfig", "LinearizeForCausalLM", "LinearizeModel", "LinearizeCache"]
