__version__ = "0.1.0"
# Hand-written (nbdev keeps only the version line up to date): the package's public API.
from .sampling_params import SamplingParams
from .llm import LLM
